"""Inference: prefill the prompt in one pass, then decode one token at a time with a KV cache,
one sequence or several together, past the context too.

Every hot operation goes through a kernel backend (`minitf.kernels`: numpy, numba, cython),
so the same model runs on any of them. The KV cache is laid out (row, layer, position,
d_model) as in llama2.c, one row per sequence: head h of a cached key is columns
h*HS:(h+1)*HS of its row.

The forward pass of inference is written once, `Engine._run`: embedding, the blocks, ln_f
and the tied head, over a *path* that supplies the operations:

- `UnfusedPath`: each operation one checked call into the backend, returning a new array
  (numpy always; numba and cython with fused=False). The reference the fused path is
  tested against.
- `FusedPath` (numba and cython): the prefill runs the same `_run` on buffers allocated
  once, with BLAS for the large float matmuls, a compiled causal softmax and a fast GELU;
  the decode step is `_run` compiled for one token per sequence (kernels/numba_fused.py
  `decode_rows`, kernels/_cython_fused.pyx), one call per step for every sequence, which
  allocates nothing and reads each weight once for all of them. The weights are packed
  once for it (kernels/layout.py) and the engine's arrays are views into them.

An int8 tied head (`quantize --int8-head`: wte int8 with a scale per row, `wte_scale`) is
read as it is stored on both paths: the embedding dequantizes the rows of the tokens, the
head runs `matmul_nt_int8` in the model's int8 mode. The fused path's W8A8 head runs on the
int8 tiles of wte.T, which are then wte's only copy: the embedding gathers a token's row
from them, and `Engine.wte` rebuilds the (V, C) array on request.

A prefill that only needs the last position's logits (generation) computes the last layer
for the last position only: its keys and values still go to the cache for every position,
but its attention output, MLP and the head are one row (`_run`, last_only).

A hook (`trace`, `capture_attention`, `attention_out`) never changes the path: both paths
report each operation to `trace` (the fused decode step as one operation) and write the
prefill's attention weights.

Past the context (block_size tokens) generation goes on in one of two context modes
(`CONTEXT_MODES`; docs/generation.md):

- "shift" (default): when the cache is full, keep the last `keep` tokens (default
  block_size // 2), re-prefill them once at positions 0..keep-1 and decode on with the
  cache; the model sees between keep and block_size tokens of history;
- "exact": every token sees exactly the last block_size tokens, as nanoGPT's `generate`
  crops them: once the window is full, each token re-prefills it (shift with keep =
  block_size).

Either way the window is re-prefilled, never shifted in place: GPT-2's positions are
learned absolute embeddings added to the input, so every cached key and value depends on
the position its token had; once the window moves they are the keys of other positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import kernels
from .checkpoint import load_checkpoint
from .config import GPTConfig, check_memory, is_int
from .kernels import get_backend, layout
from .kernels._threads import kernel_threads
from .kernels.numpy_ref import dequantize_rows
from .sampling import sample_rows
from .tensors import (INT8_MODES, LINEARS, check_tensors, checkpoint_layout, infer_quantization,
                      inference_bytes, scale_name, tensor_layout)

# The small pretrained TinyShakespeare model that ships inside the package.
DEFAULT_MODEL_DIR = Path(__file__).parent / "pretrained"


@dataclass
class Linear:
    """A float32 linear layer y = x @ weight + bias, weight (K, M) as GPT-2 stores it (on the
    fused path a view into the packed weights, F-contiguous for an F32T layer: layout.py)."""

    weight: np.ndarray  # (K, M) float32
    bias: np.ndarray  # (M,) float32

    def __call__(self, kb, x: np.ndarray) -> np.ndarray:
        return kb.matmul(x, self.weight, self.bias)


@dataclass
class Int8Linear:
    """An int8 linear layer: int8 weights (K, M) with a float32 scale per output channel.

    No dequantized float copy is kept: the int8 kernel applies the scale once per output.
    `mode` is "weight-only" (float activations) or "w8a8" (activations quantized per token).
    A W8A8 layer on the fused path keeps its weights only in the tile layout of
    kernels/layout.py (`packed`, `colsum`), all that path reads; `weight_q` then rebuilds
    the (K, M) array from the tiles when something asks for it (the unfused kernels).
    """

    stored_q: np.ndarray | None  # (K, M) int8, or None: only the tiles are kept
    scale: np.ndarray  # (M,) float32
    bias: np.ndarray  # (M,) float32
    mode: str = "weight-only"
    # W8A8 on the fused path only: the int8 weights in the tile layout of kernels/layout.py,
    # and their column sums. Kept here so that memory accounting sees them.
    packed: np.ndarray | None = None  # (Mp/64 * Kp/4 * 64 * 4,) int8
    colsum: np.ndarray | None = None  # (Mp,) int32
    in_features: int = 0  # K, for rebuilding weight_q from the tiles

    @property
    def weight_q(self) -> np.ndarray:
        """The int8 weights (K, M): the stored array, or a new one rebuilt from the tiles."""
        if self.stored_q is not None:
            return self.stored_q
        return layout.unpack_vnni(self.packed, self.in_features, self.scale.size)

    def __call__(self, kb, x: np.ndarray) -> np.ndarray:
        return kb.matmul_int8(x, self.weight_q, self.scale, self.bias, mode=self.mode)


def make_linear(params: dict[str, np.ndarray], name: str, int8_mode: str = "weight-only",
                weights: layout.PackedWeights | None = None):
    """The Linear or Int8Linear for `name` (e.g. "h.0.mlp.c_fc"), by the weight's dtype.
    Arrays that are already C-contiguous of the right dtype are used as they are. With the
    packed `weights` of the fused path, a W8A8 layer is made from its tiles alone."""
    b = np.ascontiguousarray(params[name + ".bias"], dtype=np.float32)
    if weights is not None and name in weights.tiles:
        scale = params[name + ".weight_scale"]
        packed, colsum = weights.tiles[name]
        return Int8Linear(None, scale, b, int8_mode, packed, colsum, weights.shapes[name][0])
    w = params[name + ".weight"]
    if w.dtype == np.int8:
        scale = np.ascontiguousarray(params[name + ".weight_scale"], dtype=np.float32)
        return Int8Linear(np.ascontiguousarray(w), scale, b, int8_mode)
    if weights is not None:  # a view into pf, used as it is (F-contiguous: an F32T layer's)
        return Linear(w, b)
    return Linear(np.ascontiguousarray(w, dtype=np.float32), b)


# the largest per-channel scale: 127 x scale is a finite float32
_MAX_SCALE = np.float32(np.finfo(np.float32).max / 127)


def check_engine_params(params: dict[str, np.ndarray], config: GPTConfig):
    """The Quantization of params (None: float); raise ValueError unless params are exactly
    the tensors of a float or a quantized model of `config` (minitf.tensors: int8 weights
    of one scope, each with its `<name>_scale`), and what the engine allocates fits in
    memory (minitf.config.SizeError)."""
    quant = infer_quantization(params, config)
    check_tensors(params, tensor_layout(config, quant), "Engine", noun="parameter", finite=False)
    for name, w in params.items():  # what the quantizer writes, on every backend
        if w.dtype != np.int8:
            continue
        if w.size and w.min() < -127:
            raise ValueError(f"{name}: int8 weights must be in [-127, 127] (the quantizer's range), "
                             f"got {int(w.min())}")
        scale = np.asarray(params[scale_name(name)], dtype=np.float32)
        bad = ~((scale > 0) & (scale <= _MAX_SCALE))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{scale_name(name)}: scales must be positive and at most {_MAX_SCALE:.3g} "
                             f"(127 x scale a finite float32), got {scale[i]!r} at index {i}")
    check_memory(inference_bytes(config, quant), "an Engine for this model",
                 "choose a smaller model or block_size")
    return quant


CONTEXT_MODES = ("shift", "exact")


@dataclass
class GenerationStats:
    """Where the time of a generation went, filled in as it runs (seconds, tokens).

    prefill: the prompts' prefills (one per row); decode: the KV-cache steps inside the
    context (one call per step for all the rows decoding in it; `decode_tokens` counts rows
    x steps); reprefill: the windows re-prefilled past the context (shift: once every
    block_size - keep tokens; exact: every token); sample: the samplers' calls. Every
    sampled token (`new_tokens`) is drawn from the logits of a prompt prefill, a decode
    step or a re-prefill; a row's last token is sampled but never forwarded."""

    rows: int = 0  # sequences generated together
    new_tokens: int = 0  # tokens sampled, all rows
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    reprefill_s: float = 0.0
    reprefills: int = 0
    reprefill_tokens: int = 0
    sample_s: float = 0.0


class Engine:
    """A GPT-2 model ready for generation on one kernel backend.

    Args:
        config: model sizes.
        params: `{name: array}`: float arrays, or for a quantized model int8 weights with a
            `<name>.weight_scale` float32 (M,) array beside each (and for an int8 head,
            `wte` int8 (V, C) with `wte_scale` float32 (V,), its scale per row).
        backend: "numpy", "numba", "cython", "auto" or None (environment variable
            MINITF_BACKEND, else auto).
        int8_mode: how int8 layers run, "weight-only" or "w8a8".
        fused: run decode and prefill on the backend's fused path (`FusedPath`): None = yes
            for numba and cython, no for numpy. Hooks (trace, capture_attention,
            attention_out) work on either path and do not change it.
        take_params: take the tensors out of `params` (a dict, left empty): on the fused
            path each is freed, if nothing else holds it, once copied into the packed
            arrays, so that loaded tensors and their packed copy are never both whole in
            memory (`load_engine` does this).
    Raises:
        minitf.kernels.BackendError: the backend is unknown or cannot load, or fused=True
            for a backend without a fused path (a ValueError).
        ValueError: int8_mode is unknown.

    The single-sequence API (`prefill`, `decode`, `generate`, `k_cache`, `v_cache`, `pos`)
    works on row 0 of the caches; `generate_batch` uses rows 0..N-1, allocated on demand.
    """

    def __init__(self, config: GPTConfig, params: dict[str, np.ndarray], backend: str | None = None,
                 int8_mode: str = "weight-only", fused: bool | None = None,
                 take_params: bool = False):
        if int8_mode not in INT8_MODES:
            raise ValueError(f"int8 mode {int8_mode!r} is not one of {INT8_MODES}")
        if fused not in (None, True, False):
            raise ValueError(f"fused={fused!r} must be None (automatic), True or False")
        self.quant = check_engine_params(params, config)
        self.config = config
        self.kb = get_backend(backend)
        self.backend = self.kb.NAME
        if fused is None:
            fused = self.backend in kernels.FUSED_MODULES
        fk = kernels.fused_kernels(self.backend) if fused else None
        # on the fused path, views into the packed arrays, each tensor copied straight into
        # them, so every weight is stored once; else every tensor C-contiguous, float32 (int8
        # weights stay int8)
        packed = None
        if fused:
            packed = layout.PackedWeights(params, config.n_layer, config.n_head, int8_mode,
                                          take=take_params)
            tensors = packed.views
        else:
            tensors = {name: np.ascontiguousarray(a, dtype=np.int8 if a.dtype == np.int8 else np.float32)
                       for name, a in params.items()}
        if take_params:
            params.clear()
        # (V, C) embedding and tied head: float32, or int8 ... (None: a W8A8 int8 head on
        # the fused path, stored only as the tiles of wte.T, head_packed; see `wte`)
        self.stored_wte = tensors.get("wte")
        self.wte_scale = tensors.get("wte_scale")  # ... with a float32 scale per row (V,)
        self.head_mode = int8_mode  # how an int8 head runs, as the int8 linear layers
        # the W8A8 head's tiles of wte.T on the fused path (`FusedPath`), else None
        self.head_packed: np.ndarray | None = None
        self.head_colsum: np.ndarray | None = None
        self.wpe = tensors["wpe"]  # (block_size, C)
        self.ln_f = (tensors["ln_f.weight"], tensors["ln_f.bias"])
        self.blocks = []
        for i in range(config.n_layer):
            p = f"h.{i}."
            self.blocks.append({
                "ln_1": (tensors[p + "ln_1.weight"], tensors[p + "ln_1.bias"]),
                "ln_2": (tensors[p + "ln_2.weight"], tensors[p + "ln_2.bias"]),
                **{lin: make_linear(tensors, p + lin, int8_mode, packed) for lin in LINEARS},
            })
        # trace(op_name) is called after every operation when set (memory plots); None = off
        self.trace: Callable[[str], None] | None = None
        # when True, every prefill keeps its attention weights in last_attention (plots)
        self.capture_attention = False
        self.last_attention: list[np.ndarray] | None = None
        # the path every prefill and decode runs; `fused` is it when it is the fused one
        self.fused: FusedPath | None = FusedPath(self, fk, packed) if fused else None
        self.path: UnfusedPath | FusedPath = self.fused or UnfusedPath(self)
        self.rows = 0  # sequences the caches hold
        self.generations = 0  # generate(), prefill() and decode() calls: the last owns the caches
        self.positions: list[int] = []  # positions[r]: how many positions of row r's cache are filled
        self.reserve(1)

    def check_rows(self, rows: int, what: str = "the number of prompts") -> None:
        """Refuse, before anything is allocated, `rows` sequences whose caches and buffers
        (minitf.tensors.inference_bytes) exceed this machine's memory: SizeError naming
        `what` sets the number (e.g. "--num-samples")."""
        check_memory(inference_bytes(self.config, self.quant, rows),
                     f"generating {rows:,} sequences together", f"lower {what}")

    def check_keep(self, keep, what: str = "keep") -> None:
        """ValueError unless `keep` (the tokens context_mode 'shift' keeps) is an integer in
        [1, block_size]; the message names `what` (e.g. "--keep")."""
        B = self.config.block_size
        if not is_int(keep) or not 1 <= keep <= B:
            raise ValueError(f"{what}={keep!r} must be an integer in [1, {B}] (block_size)")

    def reserve(self, rows: int) -> None:
        """Make room for `rows` sequences: KV caches k_caches, v_caches (rows, n_layer,
        block_size, d_model) float32, and the fused path's buffers. Rows already held keep
        their caches and positions; the buffers never shrink. SizeError (check_rows) if
        they do not fit in memory."""
        if rows <= self.rows:
            return
        self.check_rows(rows)
        L, T, C = self.config.n_layer, self.config.block_size, self.config.d_model
        k, v = np.zeros((rows, L, T, C), np.float32), np.zeros((rows, L, T, C), np.float32)
        if self.rows:
            k[:self.rows], v[:self.rows] = self.k_caches, self.v_caches
        self.k_caches, self.v_caches = k, v  # (row, layer, position, d_model)
        self.k_cache, self.v_cache = k[0], v[0]  # row 0's (layer, position, d_model)
        self.positions += [0] * (rows - self.rows)
        self.rows = rows
        self.path.reserve(rows)

    @property
    def wte(self) -> np.ndarray:
        """The (V, C) embedding and tied head, float32, or int8 (with `wte_scale`): the
        stored array, or, where only the W8A8 head's tiles of wte.T hold it (the fused
        path), a new array rebuilt from them (as `Int8Linear.weight_q`)."""
        if self.stored_wte is not None:
            return self.stored_wte
        return layout.unpack_vnni_columns(self.head_packed, self.config.d_model,
                                          self.config.vocab_size)

    def wte_rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows idx (T,) of `wte`, (T, C), float32 or int8: from the stored array, or
        gathered from the W8A8 head's tiles of wte.T without rebuilding the whole of it."""
        if self.stored_wte is not None:
            return self.stored_wte[idx]
        return layout.unpack_vnni_columns(self.head_packed, self.config.d_model,
                                          self.config.vocab_size, idx)

    @property
    def pos(self) -> int:
        """Number of positions filled in row 0's cache."""
        return self.positions[0]

    @pos.setter
    def pos(self, value: int) -> None:
        self.positions[0] = value

    # ------------------------------------------------------------------------------------
    def _mark(self, op: str) -> None:
        if self.trace is not None:
            self.trace(op)

    def _run(self, path, idx: np.ndarray, start: int, row: int = 0, attention_out=None,
             last_only: bool = False) -> np.ndarray:
        """The forward pass of inference: tokens idx (T,) at positions start..start+T-1 of
        sequence `row`, their keys and values written to its cache; logits (T, V), or with
        last_only the last row's (V,). `path` supplies each operation (`UnfusedPath`,
        `FusedPath`); attention_out: None or n_layer arrays (NH, T, start + T) for the
        attention weights. The fused decode step (kernels/numba_fused.py) is this sequence
        compiled."""
        L = len(self.blocks)
        x = path.embed(idx, start, row)  # (T, C) token + position embeddings
        self._mark("embedding")
        for l, blk in enumerate(self.blocks):
            h = path.layernorm(x, *blk["ln_1"])  # (T, C)
            self._mark(f"h.{l}.ln_1")
            qkv = path.linear(h, l, "attn.c_attn")  # (T, 3C)
            att = None if attention_out is None else attention_out[l]
            # with last_only, the last layer's output is needed at the last position alone:
            # keys and values of every position go to the cache, the rest is one row (Tq)
            Tq = 1 if last_only and attention_out is None and l == L - 1 else len(x)
            h = path.attention(qkv, l, row, start, att, Tq)  # (Tq, C); K, V into the cache
            x = x[len(x) - Tq:]  # (Tq, C)
            a = path.linear(h, l, "attn.c_proj")  # (Tq, C)
            self._mark(f"h.{l}.attn")
            x = path.residual(x, a)  # (Tq, C)
            self._mark(f"h.{l}.residual_1")
            h = path.layernorm(x, *blk["ln_2"])  # (Tq, C)
            self._mark(f"h.{l}.ln_2")
            f = path.gelu(path.linear(h, l, "mlp.c_fc"))  # (Tq, 4C)
            a = path.linear(f, l, "mlp.c_proj")  # (Tq, C)
            self._mark(f"h.{l}.mlp")
            x = path.residual(x, a)  # (Tq, C)
            self._mark(f"h.{l}.residual_2")
        h = path.layernorm(x, *self.ln_f)  # (Tq, C)
        self._mark("ln_f")
        logits = path.head(h, row, last_only)  # (T, V) or (V,), tied head
        self._mark("head")
        return logits

    def _check_ids(self, ids, name: str = "ids") -> np.ndarray:
        """`ids` (a sequence of integers in [0, V)) as an int64 array (T,); ValueError naming
        `name` for anything else: floats (never truncated), booleans, nested lists."""
        V = self.config.vocab_size
        allowed = f"{name}: token ids must be integers in [0, {V}), in a flat list"
        try:
            arr = np.asarray(ids)
        except (ValueError, TypeError):  # ragged nesting
            raise ValueError(f"{allowed}, got {_short(ids)}") from None
        if arr.ndim != 1 or not (arr.dtype.kind in "iu" or arr.size == 0):
            raise ValueError(f"{allowed}, got {_short(ids)} ({arr.ndim}-D, {arr.dtype})")
        if arr.size and (arr.min() < 0 or arr.max() >= V):
            raise ValueError(f"{name}: token ids must be in [0, {V}), got [{arr.min()}, {arr.max()}]")
        return arr.astype(np.int64)

    def _check_id(self, token) -> int:
        """One token id as a Python int, checked to be in [0, V)."""
        if not is_int(token):  # a sampler's float, NaN included, is never truncated
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {token!r}, "
                             f"which is not an integer")
        t = int(token)
        if not 0 <= t < self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {token!r}")
        return t

    def prefill(self, ids, attention_out: list[np.ndarray] | None = None,
                last_only: bool = False) -> np.ndarray:
        """Reset the cache and run the prompt in one pass.

        Args:
            ids: T token ids, 1 <= T <= block_size.
            attention_out: optional list of n_layer float32 arrays (n_head, T, T) that receive
                each layer's attention weights.
            last_only: compute only the last position's logits, all that generation needs
                (the last layer then runs its attention output, MLP and head on that
                position alone; every position's keys and values still fill the cache).
        Returns:
            logits (T, V) float32, row t predicting token t + 1; with last_only, (V,).
        Raises:
            ValueError: T is 0 or exceeds block_size, or an id is out of range.

        Row 0's cache is this call's now: an unfinished generate() raises at its next step.
        """
        self.generations += 1
        logits = self._prefill(ids, 0, attention_out, last_only)
        return logits.copy() if self.fused is not None and last_only else logits

    def _prefill(self, ids, row: int = 0, attention_out=None, last_only: bool = False) -> np.ndarray:
        """prefill() of sequence `row` without the copy: on the fused path, last_only
        logits are the row's logits buffer."""
        idx = self._check_ids(ids)
        if not 1 <= len(idx) <= self.config.block_size:
            raise ValueError(f"prefill needs 1..{self.config.block_size} tokens, got {len(idx)}")
        self.positions[row] = 0
        if attention_out is None and self.capture_attention:
            NH, T = self.config.n_head, len(idx)
            attention_out = [np.zeros((NH, T, T), np.float32) for _ in range(self.config.n_layer)]
            self.last_attention = attention_out
        logits = self._run(self.path, idx, 0, row, attention_out, last_only)
        self.positions[row] = len(idx)
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Append one token at position `pos` using the KV cache; its logits (V,) float32.

        Raises:
            ValueError: the cache is full (pos == block_size) or the id is out of range.

        As prefill(), it takes over row 0's cache from an unfinished generate().
        """
        if self.pos >= self.config.block_size:
            raise ValueError(f"the KV cache is full ({self.config.block_size} positions); "
                             "use generate(), which goes on past the context")
        self.generations += 1
        return self._decode(token).copy()

    def _decode(self, token: int) -> np.ndarray:
        """decode() without the checks of the cache or the copy: on the fused path the logits
        are its buffer, overwritten by the next step."""
        return self._decode_rows([0], [self._check_id(token)])[0]

    def _decode_rows(self, rows: list[int], tokens: list[int]) -> list[np.ndarray]:
        """One decode step of sequences `rows` (distinct, each with room in its cache), token
        tokens[i] (checked) appended to row rows[i]; their logits (V,), in that order. On the
        fused path one compiled call for all of them, whose logits are its buffers."""
        if self.fused is not None:
            logits = self.fused.decode_rows(rows, tokens, self.positions)
            self._mark("decode_step")  # the whole step is one compiled call
        else:
            logits = [self._run(self.path, np.array([t]), self.positions[r], r)[0]
                      for r, t in zip(rows, tokens)]
        for r in rows:
            self.positions[r] += 1
        return logits

    def forward(self, ids) -> np.ndarray:
        """Logits (T, V) of a full forward pass over ids (T <= block_size), no cache reuse."""
        return self.prefill(ids)

    def generate(self, prompt_ids, max_new_tokens: int, sample: Callable[[np.ndarray], int],
                 context_mode: str = "shift", keep: int | None = None,
                 stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield max_new_tokens new token ids, one at a time, as they are sampled.

        One generation at a time per Engine (they share its KV caches): a later generate()
        or generate_batch() makes this generator raise RuntimeError at its next step.

        Args:
            prompt_ids: at least one token id; only the last block_size are used.
            max_new_tokens: >= 0; may exceed the context (see context_mode).
            sample: maps logits (V,) float32 to a token id (see minitf.sampling.Sampler). The
                array may be the engine's buffer, overwritten by the next step: a `sample`
                that keeps logits must copy them.
            context_mode: past the context, "shift" (default: keep the last `keep` tokens,
                re-prefill them once, decode on) or "exact" (every token sees exactly the
                last block_size tokens: a re-prefill per token). See the module docstring.
            keep: shift only: tokens kept when the window is full, 1..block_size (default
                block_size // 2, at least 1).
            stats: a GenerationStats to fill in with where the time went.
        Raises:
            ValueError: an empty prompt, an id out of range, max_new_tokens < 0, an unknown
                context_mode or a bad keep (raised by this call, before any token).
        """
        gen = self._generation([prompt_ids], [max_new_tokens], [sample], context_mode, keep,
                               None, stats)
        return (tokens[0] for tokens in gen)

    def generate_batch(self, prompts, max_new_tokens, samplers, context_mode: str = "shift",
                       keep: int | None = None, stop: Callable[[int, int], bool] | None = None,
                       stats: GenerationStats | None = None) -> Iterator[list[int | None]]:
        """Generate for N sequences together: yield, once per step, a list of N entries,
        row i's new token or None once row i has finished.

        Each row gives exactly the tokens `generate(prompts[i], max_new_tokens[i],
        samplers[i], context_mode, keep)` gives (bit for bit the same logits on the same
        backend): rows have their own caches, positions and windows, and on the fused path
        every decode step is one compiled call for all the rows still running, which reads
        each weight once for all of them. A row that finishes (its max_new_tokens, or
        `stop`) stops alone.

        Args:
            prompts: N >= 1 prompts, each at least one token id (of different lengths if
                need be; only the last block_size of each are used).
            max_new_tokens: an int >= 0 for every row, or N of them.
            samplers: N callables, logits (V,) -> token id, one per row (each with its own
                random generator: see minitf.sampling.Sampler); logits may be the engine's
                buffers, overwritten by the next step.
            context_mode, keep: as in `generate`.
            stop: optional stop(row, token) -> bool, called after row's token has been
                yielded; True ends that row (e.g. a stop string in its text).
            stats: a GenerationStats to fill in.
        Raises:
            ValueError: no prompts, an empty prompt or an id out of range, a bad
                max_new_tokens, a number of samplers other than N, an unknown context_mode
                or a bad keep (raised by this call, before any token); SizeError (a
                ValueError): N rows do not fit in memory (check_rows).
        """
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate_batch needs at least one prompt")
        N = len(prompts)
        self.check_rows(N)  # before a row's state is made
        budgets = [max_new_tokens] * N if np.ndim(max_new_tokens) == 0 else list(max_new_tokens)
        samplers = list(samplers) if isinstance(samplers, (list, tuple)) else None
        if samplers is None or len(samplers) != N:
            raise ValueError(f"generate_batch needs a list of {N} samplers, one per prompt "
                             "(each row draws from its own random generator)")
        if len(budgets) != N:
            raise ValueError(f"max_new_tokens has {len(budgets)} entries for {N} prompts")
        return self._generation(prompts, budgets, samplers, context_mode, keep, stop, stats)

    def _generation(self, prompts, budgets, samplers, context_mode, keep, stop, stats):
        """Check the arguments of generate / generate_batch, then return the generator."""
        B = self.config.block_size
        windows = []
        for i, p in enumerate(prompts):
            ids = [int(t) for t in self._check_ids(p, "prompt_ids" if len(prompts) == 1
                                                    else f"prompts[{i}]")]
            if not ids:
                raise ValueError(f"prompt {i} is empty: generation needs at least one token"
                                 if len(prompts) > 1 else "generate needs a prompt of at least one token")
            windows.append(ids[-B:])  # what the row's cache holds
        for n in budgets:
            if not is_int(n) or n < 0:
                raise ValueError(f"max_new_tokens={n!r} must be an integer >= 0")
        if context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode={context_mode!r} is not one of {CONTEXT_MODES}")
        if context_mode == "exact":
            if keep is not None:
                raise ValueError(f"keep={keep!r} applies to context_mode 'shift' only "
                                 f"('exact' keeps block_size = {B} tokens)")
            keep = B
        elif keep is None:
            keep = max(1, B // 2)
        else:
            self.check_keep(keep)
        self.reserve(len(prompts))
        # the rows' caches are this generation's now: an older generator that is resumed
        # raises rather than reading caches the new one overwrote
        self.generations += 1
        return self._steps(windows, [int(n) for n in budgets], samplers, int(keep), stop,
                           stats if stats is not None else GenerationStats(), self.generations)

    def _current(self, generation: int) -> None:
        if generation != self.generations:
            raise RuntimeError("this generator was superseded by a later generate(), prefill() "
                               "or decode() on the same Engine, which took over its KV caches; "
                               "use one Engine per concurrent generation")

    def _steps(self, windows, budgets, samplers, keep, stop, stats, generation):
        """The generation loop: prefill every row's window, then per step sample every
        running row, and forward its token (decode, or past the context a re-prefill of the
        last `keep` tokens of its window)."""
        B, N, clock = self.config.block_size, len(windows), time.perf_counter
        self._current(generation)
        stats.rows += N
        logits = [None] * N
        running = [r for r in range(N) if budgets[r] > 0]
        for r in running:
            t = clock()
            logits[r] = self._prefill(windows[r], r, last_only=True)
            stats.prefill_s += clock() - t
            stats.prefill_tokens += len(windows[r])
        while running:
            tokens = [None] * N
            t = clock()
            # Samplers with the same settings draw for all their rows in one numpy pass
            for r, token in zip(running, sample_rows([samplers[r] for r in running],
                                                     [logits[r] for r in running])):
                tokens[r] = self._check_id(token)
                self._mark("sample")
            stats.sample_s += clock() - t
            stats.new_tokens += len(running)
            yield tokens
            self._current(generation)
            for r in running:
                budgets[r] -= 1
            running = [r for r in running
                       if budgets[r] > 0 and not (stop is not None and stop(r, tokens[r]))]
            decode = []
            for r in running:
                token = tokens[r]
                if len(windows[r]) < B:  # room in the cache
                    windows[r].append(token)
                    decode.append(r)
                    continue
                windows[r] = (windows[r] + [token])[-keep:]  # full: re-prefill the last keep
                t = clock()
                logits[r] = self._prefill(windows[r], r, last_only=True)
                stats.reprefill_s += clock() - t
                stats.reprefills += 1
                stats.reprefill_tokens += len(windows[r])
            if decode:
                t = clock()
                for r, row_logits in zip(decode, self._decode_rows(decode, [windows[r][-1] for r in decode])):
                    logits[r] = row_logits
                stats.decode_s += clock() - t
                stats.decode_steps += 1
                stats.decode_tokens += len(decode)


def _short(value) -> str:
    """A value for a message: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_engine(model_dir=None, backend: str | None = None):
    """(Engine, tokenizer, checkpoint) for a model directory, default: the shipped model.

    A quantized checkpoint (meta.json "quantization") loads with its int8 weights and runs
    in the mode it records. The engine takes the loaded tensors (`take_params`): the
    returned checkpoint's `params` is empty, and on the fused path only the packed copy
    stays in memory."""
    if model_dir is not None and not str(model_dir).strip():
        raise ValueError("model directory is empty; omit --model to use the shipped model")
    ckpt = load_checkpoint(model_dir or DEFAULT_MODEL_DIR, layout=checkpoint_layout, optimizer=False)
    quant = (ckpt.meta or {}).get("quantization") or {}
    engine = Engine(ckpt.config, ckpt.params, backend, int8_mode=quant.get("mode", "weight-only"),
                    take_params=True)
    return engine, ckpt.tokenizer, ckpt


# ========================================================================================
# The two paths `Engine._run` runs on. Each operation takes and returns arrays of T rows:
# embed, layernorm, linear (by layer and name), attention (which writes the KV cache),
# residual, gelu and head.


class UnfusedPath:
    """Each operation one checked call into the engine's backend, returning a new array."""

    NAME = "unfused"

    def __init__(self, engine: Engine):
        self.e, self.kb = engine, engine.kb

    def reserve(self, rows: int) -> None:
        """Nothing to allocate: the engine's caches are all this path keeps."""

    def buffer_bytes(self) -> int:
        """Bytes allocated once for this path beyond the weights and the KV cache: none."""
        return 0

    def embed(self, idx: np.ndarray, start: int, row: int) -> np.ndarray:
        e = self.e
        if e.wte_scale is None:
            return e.wte_rows(idx) + e.wpe[start:start + len(idx)]  # (T, C)
        # an int8 head: the tokens' rows dequantized, q[token] * scale[token]
        return dequantize_rows(e.wte_rows(idx), e.wte_scale[idx]) + e.wpe[start:start + len(idx)]  # (T, C)

    def layernorm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return self.kb.layernorm(x, weight, bias, self.e.config.layer_norm_eps)

    def linear(self, x: np.ndarray, l: int, name: str) -> np.ndarray:
        return self.e.blocks[l][name](self.kb, x)

    def attention(self, qkv: np.ndarray, l: int, row: int, start: int, att_out, Tq: int) -> np.ndarray:
        """Keys and values of qkv (T, 3C) into row's cache at start..start+T-1; attention
        of its last Tq queries (Tq, C)."""
        e, C = self.e, self.e.config.d_model
        end = start + len(qkv)
        k_cache, v_cache = e.k_caches[row, l], e.v_caches[row, l]  # (block_size, C)
        k_cache[start:end] = qkv[:, C:2 * C]  # append this step's keys
        v_cache[start:end] = qkv[:, 2 * C:]  # and values
        q = np.ascontiguousarray(qkv[len(qkv) - Tq:, :C])  # (Tq, C)
        return self.kb.attention(q, k_cache[:end], v_cache[:end], e.config.n_head, att_out)

    def residual(self, x: np.ndarray, a: np.ndarray) -> np.ndarray:
        return x + a

    def gelu(self, f: np.ndarray) -> np.ndarray:
        return self.kb.gelu(f)

    def head(self, x: np.ndarray, row: int, last_only: bool) -> np.ndarray:
        e = self.e
        if e.wte_scale is None:
            logits = self.kb.matmul_nt(x, e.wte)  # (T, V)
        else:  # the int8 head, read as it is stored
            logits = self.kb.matmul_nt_int8(x, e.wte, e.wte_scale, e.head_mode)  # (T, V)
        return logits[-1] if last_only else logits


class FusedPath:
    """The fused path of a numba or cython engine: its prefill operations, stage by stage on
    buffers allocated once, and `decode_rows`, one compiled call per step for any number of
    sequences.

    Args:
        engine: the engine, whose arrays are views into `weights`.
        fk: the backend's fused kernels (`minitf.kernels.fused_kernels`).
        weights: the engine's weights packed (kernels/layout.py `PackedWeights`).

    Numerics: within TOL[("kv_cache_logits", float32)] = 1e-5 of the unfused path. A model
    with W8A8 layers (`exact`) runs every stage before a quantization with the unfused
    backend's own loops, because a 1-ulp difference there can flip an int8 activation;
    its logits equal the unfused path's bit for bit. Otherwise the float matmuls of the
    prefill (the tied head of an all-rows prefill included) go to BLAS, attention runs per head on BLAS with a compiled causal softmax (the
    decode step: on a transposed copy of the KV cache, `kvT`, kept in step with the cache)
    and GELU with a vectorized exp. A sequence decoded with others gets, bit for bit, the
    logits it gets alone (`decode_rows`: each row's arithmetic does not depend on the
    others).
    """

    NAME = "fused"

    def __init__(self, engine: Engine, fk, weights: layout.PackedWeights):
        self.e, self.fk, self.weights = engine, fk, weights
        self.loops = engine.kb.loops  # the unfused backend's loops, unchecked
        self.exact = weights.exact
        if "wte" in weights.tiles:  # a W8A8 int8 head
            engine.head_packed, engine.head_colsum = weights.tiles["wte"]
        self.eps = engine.config.layer_norm_eps
        self.buffers: layout.Buffers | None = None

    def reserve(self, rows: int) -> None:
        """Buffers for `rows` sequences (layout.Buffers), bound to the engine's caches."""
        e, w = self.e, self.weights
        old = self.buffers
        self.buffers = b = layout.Buffers(w.tab, self.exact, rows)
        if old is not None:  # the sequences already held keep their state
            b.kvT[:old.rows], b.synced[:old.rows] = old.kvT, old.synced
            b.logits[:old.rows] = old.logits
        self.row_logits = list(b.logits)  # (V,) views, one per row, made once
        # each linear layer's output buffer in the prefill (T rows of it are used)
        self._out = {"attn.c_attn": b.qkv, "attn.c_proj": b.a, "mlp.c_fc": b.f, "mlp.c_proj": b.a}
        self.decoder = self.fk.Decoder(b.logits, b.sf, b.si, e.k_caches, e.v_caches, b.kvT,
                                       b.synced, w.pf, w.pq, w.pi, w.tab, b.ctl, self.eps,
                                       self.exact)

    @property
    def logits(self) -> np.ndarray:
        """Row 0's logits buffer (V,), overwritten by every call."""
        return self.row_logits[0]

    def nbytes(self) -> dict[str, int]:
        """Bytes of the packed weights (index table included), of kvT and of the scratch."""
        return {"weights": self.weights.nbytes(), **self.buffers.nbytes()}

    def buffer_bytes(self) -> int:
        """Bytes allocated once for this path beyond the weights and the KV cache: the index
        table, the transposed KV cache and the scratch buffers."""
        return self.weights.tab.nbytes + sum(self.buffers.nbytes().values())

    def decode(self, token: int, pos: int) -> np.ndarray:
        """Logits (V,) of `token` at `pos` of row 0, its keys and values appended to the
        cache. Returns the row's logits buffer, overwritten by the next call."""
        return self.decode_rows([0], [token], [pos])[0]

    def decode_rows(self, rows: list[int], tokens: list[int], positions: list[int]) -> list[np.ndarray]:
        """One compiled step: token tokens[i] at position positions[rows[i]] of sequence
        rows[i] (distinct rows, positions < block_size, ids checked), for every i.

        Returns each row's logits buffer (V,), in the order of `rows`."""
        ctl, n = self.buffers.ctl, len(rows)
        for i, r in enumerate(rows):
            ctl[layout.CTL_ROW, i], ctl[layout.CTL_TOKEN, i], ctl[layout.CTL_POS, i] = r, tokens[i], positions[r]
        self.decoder.step(n)
        return [self.row_logits[r] for r in rows]

    # ------------------------------------------------------------ prefill operations ----
    # One sequence (`row`) at a time. Each writes into its own buffer (layout.Buffers), so
    # no output aliases an input: x: embedding and residuals; h: LayerNorm and attention;
    # qkv, a, f: linear layers; g: GELU.

    def embed(self, idx: np.ndarray, start: int, row: int) -> np.ndarray:
        assert start == 0, "the fused path prefills from position 0"
        b, T = self.buffers, len(idx)
        b.synced[row] = 0  # the transposed cache mirrors nothing until the last layer's attention
        x = b.x[:T]  # (T, C)
        if self.e.wte_scale is None:
            np.take(self.e.wte, idx, axis=0, out=x)
        else:  # an int8 head: the rows dequantized, as the decode step does
            e = self.e  # (a W8A8 head's rows gathered from the tiles of wte.T)
            x[...] = dequantize_rows(e.wte_rows(idx), e.wte_scale[idx])  # (T, C)
        x += self.e.wpe[:T]
        return x

    def layernorm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        h = self.buffers.h[:len(x)]  # (T, C)
        self.loops.layernorm(h, x, weight, bias, self.eps)
        return h

    def linear(self, x: np.ndarray, l: int, name: str) -> np.ndarray:
        b, lin = self.buffers, self.e.blocks[l][name]
        T = len(x)
        y = self._out[name][:T]  # (T, M)
        if isinstance(lin, Linear):
            if self.exact:  # feeds a quantization: the unfused kernel, bit for bit
                self.loops.matmul(y, x, lin.weight, lin.bias)
            else:
                np.matmul(x, lin.weight, out=y)  # BLAS
                y += lin.bias
        elif lin.mode == "w8a8":
            Kp, Mp = layout.padded(x.shape[1], layout.TILE_K), lin.colsum.size
            xq = b.xq_rows[:T * Kp].reshape(T, Kp)
            acc = b.acc_rows[:T * Mp].reshape(T, Mp)
            self.fk.linear_w8a8_rows(y, xq, b.sx[:T], acc, x, lin.packed, lin.colsum,
                                     lin.scale, lin.bias, kernel_threads())
        else:
            self.loops.matmul_int8_weight_only(y, x, lin.weight_q, lin.scale, lin.bias)
        return y

    def attention(self, qkv: np.ndarray, l: int, row: int, start: int, att_out, Tq: int) -> np.ndarray:
        """Keys and values of positions 0..T-1 into row's cache; attention of the last Tq
        queries (Tq, C)."""
        e, b, cfg = self.e, self.buffers, self.e.config
        T, C, NH, HS = len(qkv), cfg.d_model, cfg.n_head, cfg.d_head
        k_cache, v_cache = e.k_caches[row, l, :T], e.v_caches[row, l, :T]  # (T, C)
        k_cache[...] = qkv[:, C:2 * C]  # the cache: keys and values of positions 0..T-1
        v_cache[...] = qkv[:, 2 * C:]
        q, out = b.q[:Tq], b.h[:Tq]  # (Tq, C)
        q[...] = qkv[T - Tq:, :C]
        scale = np.float32(1.0 / np.sqrt(HS))  # as the checks compute it for the kernels
        if self.exact:  # feeds a quantization: the unfused kernel, bit for bit
            att = b.att[:NH * Tq * T].reshape(NH, Tq, T)
            self.loops.attention(out, att, q, k_cache, v_cache, NH, scale)
            if att_out is not None:
                att_out[...] = att
            return out
        # per head: scores and weighted sums by BLAS, the causal softmax compiled
        kT, vT = b.kvT[row, 0, l], b.kvT[row, 1, l]  # (C, Bp) the decode steps' transposed cache
        kT[:, :T] = qkv[:, C:2 * C].T
        vT[:, :T] = qkv[:, 2 * C:].T
        if l == cfg.n_layer - 1:
            b.synced[row] = T  # every layer's kvT now mirrors positions 0..T-1
        att = b.att[:Tq * T].reshape(Tq, T)
        for hd in range(NH):
            cols = slice(hd * HS, (hd + 1) * HS)
            np.matmul(q[:, cols], kT[cols, :T], out=att)  # (Tq, T) scores
            self.fk.causal_softmax_rows(att, scale, b.ex)
            if att_out is not None:
                att_out[hd] = att
            np.matmul(att, v_cache[:, cols], out=out[:, cols])  # (Tq, HS)
        return out

    def residual(self, x: np.ndarray, a: np.ndarray) -> np.ndarray:
        x += a  # x is the embedding buffer: the residual stream stays in place
        return x

    def gelu(self, f: np.ndarray) -> np.ndarray:
        g = self.buffers.g[:len(f)]  # (T, FF)
        if self.exact:  # feeds a quantization: the unfused kernel, bit for bit
            self.loops.gelu(g.reshape(-1), f.reshape(-1))
        else:
            self.fk.gelu_fast_rows(g, f, self.buffers.ex)
        return g

    def head(self, h: np.ndarray, row: int, last_only: bool) -> np.ndarray:
        e = self.e
        T, V = len(h), e.config.vocab_size
        if last_only:  # the tied head on the last row only, into the row's logits buffer
            logits, h = self.row_logits[row].reshape(1, V), h[T - 1:]  # (1, V), (1, C)
        else:
            logits = np.empty((T, V), np.float32)  # (T, V)
        if e.head_packed is not None:  # a W8A8 int8 head: the int8 tiles of wte.T
            b, N = self.buffers, len(h)
            Kp = layout.padded(h.shape[1], layout.TILE_K)
            Mp = int(self.weights.tab[layout.ROW_DIMS, layout.DIM_MP])  # entries per pass
            self.fk.head_w8a8_rows(logits, b.xq_rows[:N * Kp].reshape(N, Kp), b.sx[:N],
                                   b.acc_rows[:N * Mp].reshape(N, Mp), h,
                                   e.head_packed, e.head_colsum, e.wte_scale, kernel_threads())
        elif e.wte_scale is not None:  # a weight-only int8 head: the unfused kernel
            self.loops.matmul_nt_int8_weight_only(logits, h, e.wte, e.wte_scale)
        elif last_only or self.exact:  # exact: a W8A8 model, whose logits equal the unfused path's
            self.loops.matmul_nt(logits, h, e.wte)
        else:  # BLAS, as the other float matmuls of the prefill
            np.matmul(h, e.wte.T, out=logits)
        return logits[0] if last_only else logits
