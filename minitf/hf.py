"""GPT-2 checkpoints of HF transformers, in and out: the same model under the same names.

minitf's parameters are GPT-2's: `h.0.attn.c_attn.weight` is the same (in, out) matrix in
transformers' Conv1D and in minitf, so a checkpoint maps over name by name. Only the
embeddings differ (`wte.weight`, an nn.Embedding, is minitf's `wte`) and the prefix of
GPT2LMHeadModel files (`transformer.`). Nothing here downloads anything: fetch a model with the
HF tools (`huggingface-cli download gpt2 --local-dir gpt2`) and point `--model` at it.

Import: `read_hf_directory(DIR)` reads a directory written by
`GPT2LMHeadModel.save_pretrained(DIR)` or fetched from the hub (gpt2, gpt2-medium,
distilgpt2, ...); `minitf.checkpoint.load_checkpoint` calls it when `is_hf_directory(DIR)`, so
every `--model DIR` accepts one, and `python -m minitf.convert --from-hf` turns it into a
minitf checkpoint.

    config.json                    model_type "gpt2"; mapped by `config_from_hf`
    model.safetensors              or the shards that model.safetensors.index.json lists
    tokenizer.json                 GPT-2's byte-level BPE (read by minitf.tokenizer)

- Tensor names with and without the `transformer.` prefix (GPT2LMHeadModel and GPT2Model
  files) are accepted, the same tensor under both is refused.
- `h.N.attn.bias` and `h.N.attn.masked_bias`, the causal-mask buffers that older files
  store, are dropped: the mask is not a weight (minitf builds its own).
- `lm_head.weight`, absent when tied (what save_pretrained writes), must equal `wte` when
  present: minitf ties the head to the embedding (one matrix), so an untied head is refused.
- Weights are read with safetensors only; a pickle file (pytorch_model.bin) can run code when
  loaded and is never read. float16/32/64 tensors load; bfloat16 ones are refused (numpy has
  no bfloat16), as the message says with the transformers command that rewrites them.

What minitf cannot run is refused naming the config field (`config_from_hf`): a model_type
other than "gpt2"; an `activation_function` other than GPT-2's tanh-approximated GELU;
`n_inner` other than 4 * n_embd; `scale_attn_weights` false; `scale_attn_by_inverse_layer_idx`,
`reorder_and_upcast_attn` or `add_cross_attention` true. `layer_norm_epsilon` becomes
`layer_norm_eps`, `n_positions` `block_size`, `n_embd` `d_model`; a field that is absent takes
GPT2Config's default, as transformers does. Dropout and the other training-only fields do not
change the forward pass at inference and are not read.

The activation: minitf computes GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
(Hendrycks & Gimpel 2016, the tanh approximation). transformers calls it "gelu_new";
"gelu_pytorch_tanh" is torch's own kernel for the same formula, and "gelu_fast" is the same
formula with sqrt(2/pi) written to 10 digits (3e-12 off, far below float32's resolution), so
all three import (tests/test_hf.py compares them with minitf's). "gelu" (the exact, erf form,
up to 1e-3 apart), "relu", "silu", ... are refused.

Export: `save_hf_directory(DIR, params, config, tokenizer)` writes what
`GPT2LMHeadModel.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load without
a warning: config.json (`config_to_hf`), model.safetensors (float32, names as save_pretrained
writes them, `transformer.` prefix, no lm_head since it is tied, metadata {"format": "pt"}),
generation_config.json, tokenizer.json (minitf's own file is a plain `tokenizers` file) and
tokenizer_config.json (`tokenizer_config`). transformers keeps no checksum in its files, so
this export carries none either.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from minitf.config import GPTConfig, param_shapes
from minitf.fileio import fsync_dir, read_json, save_json_atomic, write_bytes_atomic
from minitf.tokenizer import TOKENIZER_FILE, TokenizerError, load_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILE,
                TOKENIZER_CONFIG_FILE)
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PREFIX = "transformer."  # GPT2LMHeadModel's name for its GPT2Model
HEAD = "lm_head.weight"
END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token
# GPT-2's tanh-approximated GELU under its three transformers names (module docstring)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# minitf's config fields under their transformers names, where the two differ
HF_NAMES = {"block_size": "n_positions", "d_model": "n_embd", "layer_norm_eps": "layer_norm_epsilon"}
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# GPT2Config's defaults for the fields minitf reads (GPT-2 small); an absent field takes these
HF_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
               "n_head": 12, "n_inner": None, "activation_function": "gelu_new",
               "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
               "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
               "add_cross_attention": False, "tie_word_embeddings": True}


class HFError(ValueError):
    """A transformers directory minitf cannot run, or a directory it cannot export to."""


# ----------------------------------------------------------------------------------------
# Config


def is_hf_directory(directory: str | os.PathLike) -> bool:
    """True if `directory` holds a transformers config.json (it has "model_type"; minitf's
    own config.json never has)."""
    path = Path(directory) / CONFIG_FILE
    try:
        d = read_json(path)  # one line for any JSON, a deeply nested one too
    except ValueError:
        return False
    return isinstance(d, dict) and "model_type" in d


def config_from_hf(hf: dict, where: str = CONFIG_FILE) -> GPTConfig:
    """The GPTConfig of a transformers GPT-2 config.json (a dict), or HFError naming the field
    minitf cannot run (module docstring: what is refused and why). `where` names the file."""
    if not isinstance(hf, dict):
        raise HFError(f"{where}: must be a JSON object, got {type(hf).__name__}")
    get = lambda key: hf.get(key, HF_DEFAULTS[key])  # noqa: E731 - an absent field: GPT2Config's default
    if hf.get("model_type") != "gpt2":
        raise HFError(f"{where}: model_type {hf.get('model_type')!r} is not GPT-2; minitf runs "
                      f"model_type 'gpt2' only")
    if get("activation_function") not in TANH_GELU:
        raise HFError(f"{where}: activation_function {get('activation_function')!r}: minitf runs "
                      f"GPT-2's tanh-approximated GELU, one of {', '.join(TANH_GELU)}")
    for key, runs in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if bool(get(key)) != runs:
            raise HFError(f"{where}: {key}={get(key)!r}: minitf runs GPT-2's attention, "
                          f"{key}={str(runs).lower()}")
    eps = get("layer_norm_epsilon")
    try:
        config = GPTConfig(vocab_size=get("vocab_size"), block_size=get("n_positions"),
                           n_layer=get("n_layer"), n_head=get("n_head"), d_model=get("n_embd"),
                           layer_norm_eps=float(eps) if isinstance(eps, (int, float)) else eps)
    except ValueError as e:  # GPTConfig names its own fields: say which HF field it was
        message = re.sub(r"\b(block_size|d_model|layer_norm_eps)\b", lambda m: HF_NAMES[m[1]], str(e))
        raise HFError(f"{where}: {message}") from None
    if get("n_inner") not in (None, config.d_ff):
        raise HFError(f"{where}: n_inner={get('n_inner')!r}: minitf's MLP is 4 * n_embd wide "
                      f"(n_inner null or {config.d_ff})")
    return config


def config_to_hf(config: GPTConfig, end_of_text_id: int | None = None) -> dict:
    """A transformers GPT-2 config.json (a dict) for `config`.

    `end_of_text_id` becomes bos_token_id and eos_token_id (GPT-2 uses <|endoftext|> for
    both); None for a tokenizer without one (a character tokenizer), where GPT2Config's
    default 50256 would name a token outside the vocabulary. Dropout is 0.0: minitf models
    are trained without it.
    """
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": end_of_text_id,
        "eos_token_id": end_of_text_id,
        "dtype": "float32",
    }


# ----------------------------------------------------------------------------------------
# Tensor names


def name_to_hf(name: str) -> str:
    """minitf's name -> the name save_pretrained writes ("wte" -> "transformer.wte.weight")."""
    return PREFIX + (name + ".weight" if name in ("wte", "wpe") else name)


def params_to_hf(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{minitf name: array} -> {transformers name: the same array}; the tied head stays out."""
    return {name_to_hf(name): a for name, a in params.items()}


def params_from_hf(tensors: dict[str, np.ndarray], config: GPTConfig,
                   where: str = WEIGHTS_FILE) -> dict[str, np.ndarray]:
    """{transformers name: array} -> {minitf name: array} in `param_shapes(config)` order.

    Drops the attention-mask buffers, checks that lm_head (if present) equals wte.
    Raises HFError naming the tensors for missing, unknown or duplicate names and for an
    untied head. Shapes, dtypes and finiteness are `load_checkpoint`'s checks.
    """
    expected = param_shapes(config)
    ours = {name_to_hf(n).removeprefix(PREFIX): n for n in expected}  # unprefixed HF -> minitf
    params, sources, unknown, head = {}, {}, [], None
    for name, a in tensors.items():
        short = name.removeprefix(PREFIX)
        if name == HEAD:
            head = a
        elif MASK_BUFFER.fullmatch(short):
            continue  # the causal mask, a buffer of older files
        elif short in ours:
            if ours[short] in params:
                raise HFError(f"{where}: {sources[ours[short]]} and {name} are the same tensor; "
                              f"keep one")
            params[ours[short]], sources[ours[short]] = a, name
        else:
            unknown.append(name)
    if unknown:
        raise HFError(f"{where}: tensors {_names(sorted(unknown))} are not part of GPT-2's "
                      f"language model (a head for another task, or another architecture)")
    missing = [name_to_hf(n) for n in expected if n not in params]
    if missing:
        raise HFError(f"{where}: missing tensors {_names(missing)}")
    if head is not None and not (head.shape == params["wte"].shape and np.array_equal(head, params["wte"])):
        raise HFError(f"{where}: {HEAD} differs from {sources['wte']}: an untied output head; "
                      f"minitf ties the head to the token embedding (one matrix) and cannot run it")
    return {n: params[n] for n in expected}


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------
# Reading a directory


def read_hf_directory(directory: str | os.PathLike, dtype=np.float32):
    """Read a transformers GPT-2 directory -> (params, config, tokenizer, meta).

    params is {minitf name: array} in `dtype` (None: as stored); meta records where the model
    came from. Raises HFError with one line naming the file and the field or tensor for
    everything the module docstring refuses, for a missing or damaged file, and for a
    tokenizer whose vocabulary is not the config's.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    hf_config = read_json(config_path, HFError, "config file")
    config = config_from_hf(hf_config, str(config_path))
    tokenizer = _read_tokenizer(directory, config)
    tensors = _read_weights(directory)
    where = str(directory / (WEIGHTS_FILE if (directory / WEIGHTS_FILE).is_file() else WEIGHTS_INDEX_FILE))
    if not hf_config.get("tie_word_embeddings", HF_DEFAULTS["tie_word_embeddings"]) and HEAD not in tensors:
        raise HFError(f"{config_path}: tie_word_embeddings=false but there is no {HEAD}: the "
                      f"head would be random in transformers; minitf ties it to wte")
    params = params_from_hf(tensors, config, where)
    if dtype is not None:
        params = {n: a.astype(dtype, copy=False) for n, a in params.items()}
    meta = {"converted_from": {"format": "transformers", "model_type": "gpt2",
                               "architectures": hf_config.get("architectures"),
                               "directory": str(directory.resolve())}}
    return params, config, tokenizer, meta


def _read_tokenizer(directory: Path, config: GPTConfig):
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise HFError(f"{path}: not found; minitf needs the tokenizer.json of a fast tokenizer "
                      f"(AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes one)")
    try:
        tokenizer = load_tokenizer(path)
    except TokenizerError as e:
        raise HFError(str(e)) from None
    if tokenizer.vocab_size != config.vocab_size:
        raise HFError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but "
                      f"{directory / CONFIG_FILE} says vocab_size={config.vocab_size}; minitf "
                      f"needs them equal")
    return tokenizer


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors, or of the shards its index lists, by name."""
    single, index_path = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if single.is_file():
        return _read_safetensors(single)
    if not index_path.is_file():
        pickles = [name for name in PICKLE_FILES if (directory / name).is_file()]
        if pickles:
            raise HFError(f"{directory}: only {pickles[0]} holds the weights, a pickle file, which "
                          f"can run code when loaded and which minitf never reads; rewrite it as "
                          f"safetensors with transformers: GPT2LMHeadModel.from_pretrained(DIR)"
                          f".save_pretrained(DIR)")
        raise HFError(f"{directory}: no {WEIGHTS_FILE} and no {WEIGHTS_INDEX_FILE}")
    index = read_json(index_path, HFError, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFError(f'{index_path}: must hold a "weight_map" object {{tensor name: shard file}}')
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in (".", ".."):
            raise HFError(f"{index_path}: shard {shard!r} is not a file name in {directory}")
        for name, a in _read_safetensors(directory / shard).items():
            if name in tensors:
                raise HFError(f"{index_path}: tensor {name} is in more than one shard")
            tensors[name] = a
    listed, found = set(weight_map), set(tensors)
    if listed != found:
        diff = sorted(listed - found) or sorted(found - listed)
        what = "lists tensors its shards lack" if listed - found else "omits tensors its shards hold"
        raise HFError(f"{index_path}: the index {what}: {_names(diff)}")
    return tensors


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file (memory-mapped while read), or HFError naming it."""
    if not path.is_file():
        raise HFError(f"{path}: file not found")
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                if f.get_slice(name).get_dtype() == "BF16":
                    raise HFError(f"{path}: tensor {name} is bfloat16, which numpy cannot hold; "
                                  f"rewrite the model as float32 with transformers: GPT2LMHeadModel"
                                  f".from_pretrained(DIR, dtype=torch.float32).save_pretrained(OUT)")
            return {name: f.get_tensor(name) for name in f.keys()}
    except HFError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error for any damage
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HFError(f"{path}: corrupt or truncated safetensors file: {msg}") from None


# ----------------------------------------------------------------------------------------
# Export


def tokenizer_config(tokenizer, config: GPTConfig) -> dict:
    """tokenizer_config.json for `tokenizer` (a minitf CharTokenizer or BPETokenizer).

    PreTrainedTokenizerFast reads tokenizer.json as it is (the GPT-2 tokenizer class would
    rebuild a byte-level BPE from its parts, wrong for the character tokenizer), and
    clean_up_tokenization_spaces=false keeps decoding exact (cleaning removes the space before
    punctuation). GPT-2's <|endoftext|>, if the vocabulary has it, is bos, eos and unk.
    """
    d = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size,
         "clean_up_tokenization_spaces": False}
    if end_of_text_id(tokenizer) is not None:
        d.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)
    return d


def end_of_text_id(tokenizer) -> int | None:
    """The id of the special token <|endoftext|>, or None if the tokenizer has none."""
    return tokenizer.special_tokens().get(END_OF_TEXT)


def save_hf_directory(directory: str | os.PathLike, params: dict[str, np.ndarray],
                      config: GPTConfig, tokenizer) -> Path:
    """Write a transformers GPT-2 directory (module docstring) for float `params`; returns it.

    The files are written into a hidden sibling directory that is then renamed to
    `directory`, so an interrupted export leaves nothing half-written. `directory` must not
    exist or be empty: an export never replaces files. Raises HFError for a non-empty
    `directory`, a parameter that is not a float array, or a tokenizer/config mismatch.
    """
    directory = Path(directory).resolve()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise HFError(f"{directory}: exists and is not an empty directory; an export never "
                      f"replaces files: choose a new directory or remove this one")
    bad = [n for n, a in params.items() if not np.issubdtype(np.asarray(a).dtype, np.floating)]
    if bad:
        raise HFError(f"parameters {_names(bad)} are not float (an int8 model?): transformers' "
                      f"GPT2LMHeadModel holds float weights")
    if tokenizer.vocab_size != config.vocab_size:
        raise HFError(f"the tokenizer has {tokenizer.vocab_size} tokens, the config "
                      f"vocab_size={config.vocab_size}")
    eot = end_of_text_id(tokenizer)
    tensors = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in params_to_hf(params).items()}
    tmp = directory.with_name(f".{directory.name}.minitf-export-tmp")
    if tmp.exists():  # left by an export that was interrupted
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_json_atomic(tmp / CONFIG_FILE, config_to_hf(config, eot))
        # the generation defaults transformers would derive from config.json, written out
        save_json_atomic(tmp / GENERATION_CONFIG_FILE, {"bos_token_id": eot, "eos_token_id": eot})
        write_bytes_atomic(tmp / WEIGHTS_FILE, safetensors.numpy.save(tensors, metadata={"format": "pt"}))
        tokenizer.save(tmp / TOKENIZER_FILE)
        save_json_atomic(tmp / TOKENIZER_CONFIG_FILE, tokenizer_config(tokenizer, config))
        fsync_dir(tmp)
        os.replace(tmp, directory)  # onto an empty directory too (POSIX rename)
        fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
