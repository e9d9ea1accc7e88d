"""Inference: prefill the prompt in one pass, then decode one token at a time with a KV cache.

Every hot operation goes through a kernel backend (`minitf.kernels`: numpy, numba, cython),
so the same model runs on any of them. The KV cache is laid out (layer, position, d_model)
as in llama2.c: head h of a cached key is columns h*HS:(h+1)*HS of its row.

The forward pass of inference is written once, `Engine._run`: embedding, the blocks, ln_f
and the tied head, over a *path* that supplies the operations:

- `UnfusedPath`: each operation one checked call into the backend, returning a new array
  (numpy always; numba and cython with fused=False). The reference the fused path is
  tested against.
- `FusedPath` (numba and cython): the prefill runs the same `_run` on buffers allocated
  once, with BLAS for the large float matmuls, a compiled causal softmax and a fast GELU;
  the decode step is `_run` compiled for one token (kernels/numba_fused.py `decode_step`,
  kernels/_cython_fused.pyx), one call per token that allocates nothing. The weights are
  packed once for it (kernels/layout.py) and the engine's arrays are views into them.

A hook (`trace`, `capture_attention`, `attention_out`) never changes the path: both paths
report each operation to `trace` (the fused decode step as one operation) and write the
prefill's attention weights.

Past the context (block_size tokens) generation continues with a sliding window: the next
token is predicted from the last block_size tokens, re-prefilled at positions
0..block_size-1 (GPT-2's learned absolute positions make the cached keys invalid once the
window moves), exactly what a full forward over the cropped context would give, as
nanoGPT's `generate` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import kernels
from .checkpoint import load_checkpoint
from .config import GPTConfig, check_memory
from .kernels import get_backend, layout
from .tensors import (INT8_MODES, LINEARS, check_tensors, checkpoint_layout, infer_quantization,
                      inference_bytes, tensor_layout)

# The small pretrained TinyShakespeare model that ships inside the package.
DEFAULT_MODEL_DIR = Path(__file__).parent / "pretrained"


@dataclass
class Linear:
    """A float32 linear layer y = x @ weight + bias, weight (K, M) as GPT-2 stores it."""

    weight: np.ndarray  # (K, M) float32
    bias: np.ndarray  # (M,) float32

    def __call__(self, kb, x: np.ndarray) -> np.ndarray:
        return kb.matmul(x, self.weight, self.bias)


@dataclass
class Int8Linear:
    """An int8 linear layer: weight_q (K, M) int8 with a float32 scale per output channel.

    No dequantized float copy is kept: the int8 kernel applies the scale once per output.
    `mode` is "weight-only" (float activations) or "w8a8" (activations quantized per token).
    """

    weight_q: np.ndarray  # (K, M) int8
    scale: np.ndarray  # (M,) float32
    bias: np.ndarray  # (M,) float32
    mode: str = "weight-only"
    # W8A8 on the fused path only: the same int8 weights in the tile layout of
    # kernels/layout.py, and their column sums. Kept here so that memory accounting sees them.
    packed: np.ndarray | None = None  # (Mp/64 * Kp/4 * 64 * 4,) int8
    colsum: np.ndarray | None = None  # (Mp,) int32

    def __call__(self, kb, x: np.ndarray) -> np.ndarray:
        return kb.matmul_int8(x, self.weight_q, self.scale, self.bias, mode=self.mode)


def make_linear(params: dict[str, np.ndarray], name: str, int8_mode: str = "weight-only"):
    """The Linear or Int8Linear for `name` (e.g. "h.0.mlp.c_fc"), by the weight's dtype.
    Arrays that are already C-contiguous of the right dtype are used as they are."""
    w, b = params[name + ".weight"], np.ascontiguousarray(params[name + ".bias"], dtype=np.float32)
    if w.dtype == np.int8:
        scale = np.ascontiguousarray(params[name + ".weight_scale"], dtype=np.float32)
        return Int8Linear(np.ascontiguousarray(w), scale, b, int8_mode)
    return Linear(np.ascontiguousarray(w, dtype=np.float32), b)


def check_engine_params(params: dict[str, np.ndarray], config: GPTConfig) -> None:
    """Raise ValueError unless params are exactly the tensors of a float or a quantized model
    of `config` (minitf.tensors: int8 weights of one scope, each with its `<name>_scale`),
    and what the engine allocates fits in memory (minitf.config.SizeError)."""
    quant = infer_quantization(params, config)
    check_tensors(params, tensor_layout(config, quant), "Engine", noun="parameter", finite=False)
    check_memory(inference_bytes(config, quant), "an Engine for this model",
                 "choose a smaller model or block_size")


class Engine:
    """A GPT-2 model ready for generation on one kernel backend.

    Args:
        config: model sizes.
        params: `{name: array}`: float arrays, or for a quantized model int8 weights with a
            `<name>.weight_scale` float32 (M,) array beside each.
        backend: "numpy", "numba", "cython", "auto" or None (environment variable
            MINITF_BACKEND, else auto).
        int8_mode: how int8 layers run, "weight-only" or "w8a8".
        fused: run decode and prefill on the backend's fused path (`FusedPath`): None = yes
            for numba and cython, no for numpy. Hooks (trace, capture_attention,
            attention_out) work on either path and do not change it.
    Raises:
        minitf.kernels.BackendError: the backend is unknown or cannot load, or fused=True
            for a backend without a fused path (a ValueError).
        ValueError: int8_mode is unknown.
    """

    def __init__(self, config: GPTConfig, params: dict[str, np.ndarray], backend: str | None = None,
                 int8_mode: str = "weight-only", fused: bool | None = None):
        if int8_mode not in INT8_MODES:
            raise ValueError(f"int8 mode {int8_mode!r} is not one of {INT8_MODES}")
        if fused not in (None, True, False):
            raise ValueError(f"fused={fused!r} must be None (automatic), True or False")
        check_engine_params(params, config)
        self.config = config
        self.kb = get_backend(backend)
        self.backend = self.kb.NAME
        if fused is None:
            fused = self.backend in kernels.FUSED_MODULES
        fk = kernels.fused_kernels(self.backend) if fused else None
        # every tensor C-contiguous, float32 (int8 weights stay int8); on the fused path,
        # views into the packed arrays, so every weight is stored once
        tensors = {name: np.ascontiguousarray(a, dtype=np.int8 if a.dtype == np.int8 else np.float32)
                   for name, a in params.items()}
        packed = None
        if fused:
            packed = layout.PackedWeights(tensors, config.n_layer, config.n_head, int8_mode)
            tensors = packed.views
        self.wte = tensors["wte"]  # (V, C) embedding and tied head
        self.wpe = tensors["wpe"]  # (block_size, C)
        self.ln_f = (tensors["ln_f.weight"], tensors["ln_f.bias"])
        self.blocks = []
        for i in range(config.n_layer):
            p = f"h.{i}."
            self.blocks.append({
                "ln_1": (tensors[p + "ln_1.weight"], tensors[p + "ln_1.bias"]),
                "ln_2": (tensors[p + "ln_2.weight"], tensors[p + "ln_2.bias"]),
                **{lin: make_linear(tensors, p + lin, int8_mode) for lin in LINEARS},
            })
        L, T, C = config.n_layer, config.block_size, config.d_model
        self.k_cache = np.zeros((L, T, C), dtype=np.float32)  # (layer, position, d_model)
        self.v_cache = np.zeros((L, T, C), dtype=np.float32)
        self.pos = 0  # number of positions filled in the cache
        # trace(op_name) is called after every operation when set (memory plots); None = off
        self.trace: Callable[[str], None] | None = None
        # when True, every prefill keeps its attention weights in last_attention (plots)
        self.capture_attention = False
        self.last_attention: list[np.ndarray] | None = None
        # the path every prefill and decode runs; `fused` is it when it is the fused one
        self.fused: FusedPath | None = FusedPath(self, fk, packed) if fused else None
        self.path: UnfusedPath | FusedPath = self.fused or UnfusedPath(self)

    # ------------------------------------------------------------------------------------
    def _mark(self, op: str) -> None:
        if self.trace is not None:
            self.trace(op)

    def _run(self, path, idx: np.ndarray, start: int, attention_out=None,
             last_only: bool = False) -> np.ndarray:
        """The forward pass of inference: tokens idx (T,) at positions start..start+T-1,
        their keys and values written to the cache; logits (T, V), or with last_only the
        last row's (V,). `path` supplies each operation (`UnfusedPath`, `FusedPath`);
        attention_out: None or n_layer arrays (NH, T, start + T) for the attention weights.
        The fused decode step (kernels/numba_fused.py) is this sequence compiled."""
        x = path.embed(idx, start)  # (T, C) token + position embeddings
        self._mark("embedding")
        for l, blk in enumerate(self.blocks):
            h = path.layernorm(x, *blk["ln_1"])  # (T, C)
            self._mark(f"h.{l}.ln_1")
            qkv = path.linear(h, l, "attn.c_attn")  # (T, 3C)
            att = None if attention_out is None else attention_out[l]
            h = path.attention(qkv, l, start, att)  # (T, C); keys, values appended to the cache
            a = path.linear(h, l, "attn.c_proj")  # (T, C)
            self._mark(f"h.{l}.attn")
            x = path.residual(x, a)  # (T, C)
            self._mark(f"h.{l}.residual_1")
            h = path.layernorm(x, *blk["ln_2"])  # (T, C)
            self._mark(f"h.{l}.ln_2")
            f = path.gelu(path.linear(h, l, "mlp.c_fc"))  # (T, 4C)
            a = path.linear(f, l, "mlp.c_proj")  # (T, C)
            self._mark(f"h.{l}.mlp")
            x = path.residual(x, a)  # (T, C)
            self._mark(f"h.{l}.residual_2")
        h = path.layernorm(x, *self.ln_f)  # (T, C)
        self._mark("ln_f")
        logits = path.head(h, last_only)  # (T, V) or (V,), tied head
        self._mark("head")
        return logits

    def _check_ids(self, ids) -> np.ndarray:
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        V = self.config.vocab_size
        if idx.size and (idx.min() < 0 or idx.max() >= V):
            raise ValueError(f"token ids must be in [0, {V}), got [{idx.min()}, {idx.max()}]")
        return idx

    def _check_id(self, token) -> int:
        """One token id as a Python int, checked to be in [0, V)."""
        t = int(token)
        if not 0 <= t < self.config.vocab_size or t != token:
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
                (on the fused path the head is then one row instead of T).
        Returns:
            logits (T, V) float32, row t predicting token t + 1; with last_only, (V,).
        Raises:
            ValueError: T is 0 or exceeds block_size, or an id is out of range.
        """
        logits = self._prefill(ids, attention_out, last_only)
        return logits.copy() if self.fused is not None and logits is self.fused.logits else logits

    def _prefill(self, ids, attention_out=None, last_only: bool = False) -> np.ndarray:
        """prefill() without the copy: on the fused path, last_only logits are its buffer."""
        idx = self._check_ids(ids)
        if not 1 <= len(idx) <= self.config.block_size:
            raise ValueError(f"prefill needs 1..{self.config.block_size} tokens, got {len(idx)}")
        self.pos = 0
        if attention_out is None and self.capture_attention:
            NH, T = self.config.n_head, len(idx)
            attention_out = [np.zeros((NH, T, T), np.float32) for _ in range(self.config.n_layer)]
            self.last_attention = attention_out
        logits = self._run(self.path, idx, 0, attention_out, last_only)
        self.pos = len(idx)
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Append one token at position `pos` using the KV cache; its logits (V,) float32.

        Raises:
            ValueError: the cache is full (pos == block_size) or the id is out of range.
        """
        if self.pos >= self.config.block_size:
            raise ValueError(f"the KV cache is full ({self.config.block_size} positions); "
                             "use generate(), which slides the window")
        return self._decode(token).copy()

    def _decode(self, token: int) -> np.ndarray:
        """decode() without the checks of the cache or the copy: on the fused path the logits
        are its buffer, overwritten by the next step."""
        if self.fused is not None:
            logits = self.fused.decode(self._check_id(token), self.pos)
            self._mark("decode_step")  # the whole step is one compiled call
        else:
            logits = self._run(self.path, self._check_ids([token]), self.pos)[0]
        self.pos += 1
        return logits

    def forward(self, ids) -> np.ndarray:
        """Logits (T, V) of a full forward pass over ids (T <= block_size), no cache reuse."""
        return self.prefill(ids)

    def generate(self, prompt_ids, max_new_tokens: int, sample: Callable[[np.ndarray], int]) -> Iterator[int]:
        """Yield max_new_tokens new token ids, one at a time, as they are sampled.

        Args:
            prompt_ids: at least one token id; only the last block_size are used.
            max_new_tokens: >= 0; may exceed the context (sliding window).
            sample: maps logits (V,) float32 to a token id (see minitf.sampling.Sampler). The
                array may be the engine's buffer, overwritten by the next step: a `sample`
                that keeps logits must copy them.
        """
        ids = [int(t) for t in self._check_ids(prompt_ids)]
        if not ids:
            raise ValueError("generate needs a prompt of at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        B = self.config.block_size
        logits = self._prefill(ids[-B:], last_only=True)
        for _ in range(max_new_tokens):
            token = sample(logits)
            self._mark("sample")
            yield token
            ids.append(token)
            if self.pos < B:
                logits = self._decode(token)
            else:  # context full: slide the window and re-prefill the last B tokens
                logits = self._prefill(ids[-B:], last_only=True)


def load_engine(model_dir=None, backend: str | None = None):
    """(Engine, tokenizer, checkpoint) for a model directory, default: the shipped model.

    A quantized checkpoint (meta.json "quantization") loads with its int8 weights and runs
    in the mode it records."""
    if model_dir is not None and not str(model_dir).strip():
        raise ValueError("model directory is empty; omit --model to use the shipped model")
    ckpt = load_checkpoint(model_dir or DEFAULT_MODEL_DIR, layout=checkpoint_layout, optimizer=False)
    quant = (ckpt.meta or {}).get("quantization") or {}
    engine = Engine(ckpt.config, ckpt.params, backend, int8_mode=quant.get("mode", "weight-only"))
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

    def buffer_bytes(self) -> int:
        """Bytes allocated once for this path beyond the weights and the KV cache: none."""
        return 0

    def embed(self, idx: np.ndarray, start: int) -> np.ndarray:
        return self.e.wte[idx] + self.e.wpe[start:start + len(idx)]  # (T, C)

    def layernorm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return self.kb.layernorm(x, weight, bias, self.e.config.layer_norm_eps)

    def linear(self, x: np.ndarray, l: int, name: str) -> np.ndarray:
        return self.e.blocks[l][name](self.kb, x)

    def attention(self, qkv: np.ndarray, l: int, start: int, att_out) -> np.ndarray:
        e, C = self.e, self.e.config.d_model
        end = start + len(qkv)
        e.k_cache[l, start:end] = qkv[:, C:2 * C]  # append this step's keys
        e.v_cache[l, start:end] = qkv[:, 2 * C:]  # and values
        return self.kb.attention(np.ascontiguousarray(qkv[:, :C]), e.k_cache[l, :end],
                                 e.v_cache[l, :end], e.config.n_head, att_out)  # (T, C)

    def residual(self, x: np.ndarray, a: np.ndarray) -> np.ndarray:
        return x + a

    def gelu(self, f: np.ndarray) -> np.ndarray:
        return self.kb.gelu(f)

    def head(self, x: np.ndarray, last_only: bool) -> np.ndarray:
        logits = self.kb.matmul_nt(x, self.e.wte)  # (T, V)
        return logits[-1] if last_only else logits


class FusedPath:
    """The fused path of a numba or cython engine: its prefill operations, stage by stage on
    buffers allocated once, and `decode`, one compiled call per token.

    Args:
        engine: the engine, whose arrays are views into `weights`.
        fk: the backend's fused kernels (`minitf.kernels.fused_kernels`).
        weights: the engine's weights packed (kernels/layout.py `PackedWeights`).

    Numerics: within TOL[("kv_cache_logits", float32)] = 1e-5 of the unfused path. A model
    with W8A8 layers (`exact`) runs every stage before a quantization with the unfused
    backend's own loops, because a 1-ulp difference there can flip an int8 activation;
    its logits equal the unfused path's bit for bit. Otherwise the float matmuls of the
    prefill go to BLAS, attention runs per head on BLAS with a compiled causal softmax (the
    decode step: on a transposed copy of the KV cache, `kvT`, kept in step with the cache)
    and GELU with a vectorized exp.
    """

    NAME = "fused"

    def __init__(self, engine: Engine, fk, weights: layout.PackedWeights):
        cfg = engine.config
        self.e, self.fk, self.weights = engine, fk, weights
        self.loops = engine.kb.loops  # the unfused backend's loops, unchecked
        self.exact = weights.exact
        self.buffers = b = layout.Buffers(weights.tab, self.exact)
        self.logits = b.logits  # (V,) the last row's logits, overwritten by every call
        # each linear layer's output buffer (T rows of it are used)
        self._out = {"attn.c_attn": b.qkv, "attn.c_proj": b.a, "mlp.c_fc": b.f, "mlp.c_proj": b.a}
        for l, blk in enumerate(engine.blocks):  # the W8A8 tiles, where accounting sees them
            for name in LINEARS:
                if f"h.{l}.{name}" in weights.tiles:
                    blk[name].packed, blk[name].colsum = weights.tiles[f"h.{l}.{name}"]
        self.eps = cfg.layer_norm_eps
        self.decoder = fk.Decoder(b.logits, b.sf, b.si, engine.k_cache, engine.v_cache, b.kvT,
                                  weights.pf, weights.pq, weights.pi, weights.tab, self.eps,
                                  self.exact)

    def nbytes(self) -> dict[str, int]:
        """Bytes of the packed weights (index table included), of kvT and of the scratch."""
        return {"weights": self.weights.nbytes(), **self.buffers.nbytes()}

    def buffer_bytes(self) -> int:
        """Bytes allocated once for this path beyond the weights and the KV cache: the index
        table, the transposed KV cache and the scratch buffers."""
        return self.weights.tab.nbytes + sum(self.buffers.nbytes().values())

    def decode(self, token: int, pos: int) -> np.ndarray:
        """Logits (V,) of `token` at `pos`, its keys and values appended to the cache.

        Returns the path's logits buffer, overwritten by the next call."""
        self.decoder.step(token, pos)
        return self.logits

    # ------------------------------------------------------------ prefill operations ----
    # Each writes into its own buffer (layout.Buffers), so no output aliases an input:
    # x: embedding and residuals; h: LayerNorm and attention; qkv, a, f: linear layers;
    # g: GELU.

    def embed(self, idx: np.ndarray, start: int) -> np.ndarray:
        assert start == 0, "the fused path prefills from position 0"
        b, T = self.buffers, len(idx)
        b.si[layout.SI_STATE] = 0  # the transposed cache mirrors nothing until `head`
        x = b.x[:T]  # (T, C)
        np.take(self.e.wte, idx, axis=0, out=x)
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
            Kp = layout.padded(x.shape[1], layout.TILE_K)
            xq = b.xq_rows[:T * Kp].reshape(T, Kp)
            self.fk.linear_w8a8_rows(y, xq, b.sx[:T], b.acc, x, lin.packed, lin.colsum,
                                     lin.scale, lin.bias)
        else:
            self.loops.matmul_int8_weight_only(y, x, lin.weight_q, lin.scale, lin.bias)
        return y

    def attention(self, qkv: np.ndarray, l: int, start: int, att_out) -> np.ndarray:
        e, b, cfg = self.e, self.buffers, self.e.config
        T, C, NH, HS = len(qkv), cfg.d_model, cfg.n_head, cfg.d_head
        e.k_cache[l, :T] = qkv[:, C:2 * C]  # the cache: keys and values of positions 0..T-1
        e.v_cache[l, :T] = qkv[:, 2 * C:]
        q, out = b.q[:T], b.h[:T]  # (T, C)
        q[...] = qkv[:, :C]
        scale = np.float32(1.0 / np.sqrt(HS))  # as the checks compute it for the kernels
        if self.exact:  # feeds a quantization: the unfused kernel, bit for bit
            att = b.att[:NH * T * T].reshape(NH, T, T)
            self.loops.attention(out, att, q, e.k_cache[l, :T], e.v_cache[l, :T], NH, scale)
            if att_out is not None:
                att_out[...] = att
            return out
        # per head: scores and weighted sums by BLAS, the causal softmax compiled
        b.kvT[0, l, :, :T] = qkv[:, C:2 * C].T  # the decode steps' transposed cache
        b.kvT[1, l, :, :T] = qkv[:, 2 * C:].T
        att = b.att[:T * T].reshape(T, T)
        for hd in range(NH):
            cols = slice(hd * HS, (hd + 1) * HS)
            np.matmul(q[:, cols], b.kvT[0, l, cols, :T], out=att)  # (T, T) scores
            self.fk.causal_softmax_rows(att, scale, b.ex)
            if att_out is not None:
                att_out[hd] = att
            np.matmul(att, e.v_cache[l, :T, cols], out=out[:, cols])  # (T, HS)
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

    def head(self, h: np.ndarray, last_only: bool) -> np.ndarray:
        T, V = len(h), self.e.config.vocab_size
        if not self.exact:
            self.buffers.si[layout.SI_STATE] = T  # kvT now mirrors positions 0..T-1
        if last_only:  # the tied head on the last row only, into the logits buffer
            self.loops.matmul_nt(self.logits.reshape(1, V), h[T - 1:], self.e.wte)
            return self.logits
        logits = np.empty((T, V), np.float32)
        self.loops.matmul_nt(logits, h, self.e.wte)  # (T, V): the unfused kernel, not BLAS
        return logits
