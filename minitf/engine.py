"""Inference: prefill the prompt in one pass, then decode one token at a time with a KV cache.

Every hot operation goes through a kernel backend (`minitf.kernels`: numpy, numba, cython),
so the same model runs on any of them. The KV cache is laid out (layer, position, d_model)
as in llama2.c: head h of a cached key is columns h*HS:(h+1)*HS of its row.

Past the context (block_size tokens) generation continues with a sliding window: the next
token is predicted from the last block_size tokens, re-prefilled at positions
0..block_size-1 (GPT-2's learned absolute positions make the cached keys invalid once the
window moves), exactly what a full forward over the cropped context would give, as
nanoGPT's `generate` does.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import kernels
from .checkpoint import load_checkpoint
from .config import GPTConfig
from .kernels import get_backend
from .tensors import (INT8_MODES, LINEARS, check_tensors, checkpoint_layout, infer_quantization,
                      tensor_layout)

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
    # W8A8 on the fused path only (see FusedWeights): the same int8 weights in the VNNI tile
    # layout, and their column sums. Kept here so that memory accounting sees them.
    packed: np.ndarray | None = None  # (Mp/64 * Kp/4 * 64 * 4,) int8
    colsum: np.ndarray | None = None  # (Mp,) int32

    def __call__(self, kb, x: np.ndarray) -> np.ndarray:
        return kb.matmul_int8(x, self.weight_q, self.scale, self.bias, mode=self.mode)


def make_linear(params: dict[str, np.ndarray], name: str, int8_mode: str = "weight-only"):
    """The Linear or Int8Linear for `name` (e.g. "h.0.mlp.c_fc"), by the weight's dtype."""
    w, b = params[name + ".weight"], params[name + ".bias"].astype(np.float32)
    if w.dtype == np.int8:
        scale = np.ascontiguousarray(params[name + ".weight_scale"], dtype=np.float32)
        return Int8Linear(np.ascontiguousarray(w), scale, b, int8_mode)
    return Linear(np.ascontiguousarray(w, dtype=np.float32), b)


def check_engine_params(params: dict[str, np.ndarray], config: GPTConfig) -> None:
    """Raise ValueError unless params are exactly the tensors of a float or a quantized model
    of `config` (minitf.tensors: int8 weights of one scope, each with its `<name>_scale`)."""
    layout = tensor_layout(config, infer_quantization(params, config))
    check_tensors(params, layout, "Engine", noun="parameter", finite=False)


class Engine:
    """A GPT-2 model ready for generation on one kernel backend.

    Args:
        config: model sizes.
        params: `{name: array}`: float arrays, or for a quantized model int8 weights with a
            `<name>.weight_scale` float32 (M,) array beside each.
        backend: "numpy", "numba", "cython", "auto" or None (environment variable
            MINITF_BACKEND, else auto).
        int8_mode: how int8 layers run, "weight-only" or "w8a8".
        fused: run decode and prefill through the backend's fused kernels (FusedPath, end of
            this file): None = yes for numba and cython, no for numpy. Whenever a hook
            (trace, capture_attention, attention_out) is set, the unfused path runs.
    Raises:
        minitf.kernels.BackendError: the backend is unknown or cannot load.
        ValueError: int8_mode is unknown, or fused=True for a backend without a fused path.
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
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
        self.wte = f32(params["wte"])  # (V, C) embedding and tied head
        self.wpe = f32(params["wpe"])  # (block_size, C)
        self.ln_f = (f32(params["ln_f.weight"]), f32(params["ln_f.bias"]))
        self.blocks = []
        for i in range(config.n_layer):
            p = f"h.{i}."
            self.blocks.append({
                "ln_1": (f32(params[p + "ln_1.weight"]), f32(params[p + "ln_1.bias"])),
                "ln_2": (f32(params[p + "ln_2.weight"]), f32(params[p + "ln_2.bias"])),
                **{lin: make_linear(params, p + lin, int8_mode) for lin in LINEARS},
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
        # the fused path (end of this file) of a backend that has one, unless fused=False
        self.fused: FusedPath | None = None
        if fused is None:
            fused = self.backend in FUSED_MODULES
        if fused:
            if self.backend not in FUSED_MODULES:
                raise ValueError(f"backend {self.backend!r} has no fused path; backends with one: "
                                 f"{', '.join(FUSED_MODULES)}")
            module = importlib.import_module(f"{kernels.__name__}.{FUSED_MODULES[self.backend]}")
            self.fused = FusedPath(self, module)

    # ------------------------------------------------------------------------------------
    def _mark(self, op: str) -> None:
        if self.trace is not None:
            self.trace(op)

    def _forward(self, idx: np.ndarray, start: int, attention_out=None) -> np.ndarray:
        """Run tokens idx (T,) at positions start..start+T-1 against the cache; (T, V) logits."""
        kb, cfg = self.kb, self.config
        T, C = len(idx), cfg.d_model
        end = start + T
        x = self.wte[idx] + self.wpe[start:end]  # (T, C)
        self._mark("embedding")
        for l, blk in enumerate(self.blocks):
            h = kb.layernorm(x, *blk["ln_1"], cfg.layer_norm_eps)  # (T, C)
            self._mark(f"h.{l}.ln_1")
            qkv = blk["attn.c_attn"](kb, h)  # (T, 3C)
            self.k_cache[l, start:end] = qkv[:, C:2 * C]  # append this step's keys
            self.v_cache[l, start:end] = qkv[:, 2 * C:]  # and values
            att = None if attention_out is None else attention_out[l]
            a = kb.attention(np.ascontiguousarray(qkv[:, :C]), self.k_cache[l, :end],
                             self.v_cache[l, :end], cfg.n_head, att)  # (T, C)
            a = blk["attn.c_proj"](kb, a)  # (T, C)
            self._mark(f"h.{l}.attn")
            x = x + a  # residual
            self._mark(f"h.{l}.residual_1")
            h = kb.layernorm(x, *blk["ln_2"], cfg.layer_norm_eps)
            self._mark(f"h.{l}.ln_2")
            f = kb.gelu(blk["mlp.c_fc"](kb, h))  # (T, 4C)
            m = blk["mlp.c_proj"](kb, f)  # (T, C)
            self._mark(f"h.{l}.mlp")
            x = x + m  # residual
            self._mark(f"h.{l}.residual_2")
        x = kb.layernorm(x, *self.ln_f, cfg.layer_norm_eps)
        self._mark("ln_f")
        logits = kb.matmul_nt(x, self.wte)  # (T, V), tied head
        self._mark("head")
        return logits

    def _check_ids(self, ids) -> np.ndarray:
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        V = self.config.vocab_size
        if idx.size and (idx.min() < 0 or idx.max() >= V):
            raise ValueError(f"token ids must be in [0, {V}), got [{idx.min()}, {idx.max()}]")
        return idx

    def _hooks_off(self, attention_out=None) -> bool:
        return self.trace is None and not self.capture_attention and attention_out is None

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
                (the head is then one row instead of T).
        Returns:
            logits (T, V) float32, row t predicting token t + 1; with last_only, (V,).
        Raises:
            ValueError: T is 0 or exceeds block_size, or an id is out of range.
        """
        logits = self._prefill(ids, attention_out, last_only)
        return logits.copy() if logits is getattr(self.fused, "logits", None) else logits

    def _prefill(self, ids, attention_out=None, last_only: bool = False) -> np.ndarray:
        """prefill() without the copy: on the fused path, last_only logits are its buffer."""
        idx = self._check_ids(ids)
        if not 1 <= len(idx) <= self.config.block_size:
            raise ValueError(f"prefill needs 1..{self.config.block_size} tokens, got {len(idx)}")
        self.pos = 0
        if self.fused is not None and self._hooks_off(attention_out):
            logits = self.fused.prefill(idx, last_only)
            self.pos = len(idx)
            return logits
        if self.fused is not None:
            self.fused.cache_written(0)  # the unfused path below rewrites the cache
        if attention_out is None and self.capture_attention:
            NH, T = self.config.n_head, len(idx)
            attention_out = [np.zeros((NH, T, T), np.float32) for _ in range(self.config.n_layer)]
            self.last_attention = attention_out
        logits = self._forward(idx, 0, attention_out)
        self.pos = len(idx)
        return logits[-1] if last_only else logits

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
        if self.fused is not None and self._hooks_off():
            logits = self.fused.decode(self._check_id(token), self.pos)
        else:
            if self.fused is not None:
                self.fused.cache_written(self.pos)
            logits = self._forward(self._check_ids([token]), self.pos)[0]
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
# Fused path: one compiled call per decoded token (numba and cython backends)
#
# The kernels live in minitf.kernels.numba_fused and minitf.kernels._cython_fused; this
# section packs the weights for them once, owns their scratch buffers, and runs the prefill
# (the big float matmuls go to BLAS there). The engine uses it for decode and prefill when
# its backend has one and no hook (trace, capture_attention, attention_out) is set; the
# unfused `_forward` above stays the reference it is tested against (tests/test_fused.py).

FUSED_MODULES = {"numba": "numba_fused", "cython": "_cython_fused"}

# The index table of the packed weights (int64, one row per tensor, FusedWeights writes it).
# Columns: kind of linear layer; K, M (a LayerNorm has M = C); offsets (in elements) of the
# float32 weight W, bias B, scale S in pf, of the (K, M) int8 weight Q and the tiled copy P
# in pq, of the column sums SUM in pi; KP, MP: sizes padded to the VNNI tile (4 k, 64 m).
KIND, K_, M_, W_, B_, S_, Q_, P_, KP_, MP_, SUM_ = range(11)
F32, INT8, W8A8 = 0, 1, 2  # kinds
# Rows: sizes (n_layer, d_model, n_head, vocab, block_size, d_ff, then for the scratch:
# largest MP, largest KP, block_size padded to 16, two offsets in the int32 scratch), wte,
# wpe, ln_f, then per block ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj.
ROW_DIMS, ROW_WTE, ROW_WPE, ROW_LNF, FIRST_LAYER_ROW = 0, 1, 2, 3, 4
LAYER_ROWS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
TILE_K, TILE_M = 4, 64  # a VNNI tile: 4 bytes of k per int32 lane, 4 x 16 lanes of m


def pack_vnni(wq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights (K, M) -> (tiles (Mp/64 * Kp/4 * 64 * 4,) int8, column sums (Mp,) int32).

    Tile t holds outputs 64t .. 64t+63; inside it, group g holds the 4 bytes k = 4g .. 4g+3
    of each output side by side, the operand layout of vpdpbusd. K and M are padded with zero
    weights up to Kp = 4 * ceil(K / 4) and Mp = 64 * ceil(M / 64).
    """
    K, M = wq.shape
    Kp, Mp = -(-K // TILE_K) * TILE_K, -(-M // TILE_M) * TILE_M
    w = np.zeros((Kp, Mp), np.int8)
    w[:K, :M] = wq
    tiles = w.reshape(Kp // TILE_K, TILE_K, Mp // TILE_M, TILE_M).transpose(2, 0, 3, 1)  # (t, g, o, i)
    return np.ascontiguousarray(tiles).reshape(-1), w.astype(np.int32).sum(axis=0, dtype=np.int32)


class FusedWeights:
    """The engine's weights packed once for the fused kernels.

    pf (float32), pq (int8) and pi (int32) are flat arrays and `tab` the index table above.
    The engine's own arrays (wte, wpe, LayerNorms, Linear and Int8Linear arrays) are rebound
    to views into pf and pq, so every weight is stored once. W8A8 layers add their tiled int8
    copy and column sums (held by the Int8Linear as `packed` and `colsum`, so that memory
    accounting sees them): +K*M bytes per layer; weight-only and float layers add nothing.
    """

    def __init__(self, engine: "Engine"):
        cfg = engine.config
        L, C, V = cfg.n_layer, cfg.d_model, cfg.vocab_size
        self.tab = np.zeros((FIRST_LAYER_ROW + len(LAYER_ROWS) * L, 11), np.int64)
        self.tab[ROW_DIMS, :6] = (L, C, cfg.n_head, V, cfg.block_size, cfg.d_ff)
        f32, i8, i32 = [], [], []  # (array, offset) to copy in, per flat array
        tiled = []  # (table row, int8 weight) of the W8A8 layers
        sizes = {"f": 0, "q": 0, "i": 0}

        def put(kind: str, a: np.ndarray) -> int:
            off = sizes[kind]
            {"f": f32, "q": i8, "i": i32}[kind].append((a, off))
            sizes[kind] += a.size
            return off

        def put_rows(row: int, *cols) -> None:
            for col, value in cols:
                self.tab[row, col] = value

        put_rows(ROW_WTE, (K_, V), (M_, C), (W_, put("f", engine.wte)))
        put_rows(ROW_WPE, (K_, cfg.block_size), (M_, C), (W_, put("f", engine.wpe)))
        put_rows(ROW_LNF, (M_, C), (W_, put("f", engine.ln_f[0])), (B_, put("f", engine.ln_f[1])))
        for l, blk in enumerate(engine.blocks):
            for j, name in enumerate(LAYER_ROWS):
                row = FIRST_LAYER_ROW + l * len(LAYER_ROWS) + j
                if name.startswith("ln"):
                    put_rows(row, (M_, C), (W_, put("f", blk[name][0])), (B_, put("f", blk[name][1])))
                    continue
                lin = blk[name]
                put_rows(row, (B_, put("f", lin.bias)))
                if isinstance(lin, Linear):
                    K, M = lin.weight.shape
                    put_rows(row, (KIND, F32), (K_, K), (M_, M), (W_, put("f", lin.weight)))
                    continue
                K, M = lin.weight_q.shape
                put_rows(row, (KIND, W8A8 if lin.mode == "w8a8" else INT8), (K_, K), (M_, M),
                         (Q_, put("q", lin.weight_q)), (S_, put("f", lin.scale)))
                if lin.mode == "w8a8":
                    tiled.append((row, lin.weight_q))
        # the tiled copies last, in the order decode reads them: one stream of int8 weights
        for row, wq in tiled:
            tiles, colsum = pack_vnni(wq)
            put_rows(row, (P_, put("q", tiles)), (SUM_, put("i", colsum)),
                     (KP_, -(-wq.shape[0] // TILE_K) * TILE_K), (MP_, colsum.size))
        self.pf = np.empty(sizes["f"], np.float32)
        self.pq = np.empty(sizes["q"], np.int8)
        self.pi = np.empty(sizes["i"], np.int32)
        views = {}
        for flat, parts in ((self.pf, f32), (self.pq, i8), (self.pi, i32)):
            for a, off in parts:
                view = flat[off:off + a.size].reshape(a.shape)
                view[...] = a
                views[id(a)] = view
        # rebind the engine's arrays to the packed copies: one copy of every weight
        engine.wte, engine.wpe = views[id(engine.wte)], views[id(engine.wpe)]
        engine.ln_f = tuple(views[id(a)] for a in engine.ln_f)
        for blk in engine.blocks:
            for name, value in blk.items():
                if isinstance(value, tuple):
                    blk[name] = tuple(views[id(a)] for a in value)
                elif isinstance(value, Linear):
                    value.weight, value.bias = views[id(value.weight)], views[id(value.bias)]
                else:
                    value.weight_q, value.scale = views[id(value.weight_q)], views[id(value.scale)]
                    value.bias = views[id(value.bias)]
        for l, blk in enumerate(engine.blocks):  # the tiled copies, for memory accounting
            for j, name in enumerate(LAYER_ROWS):
                row = self.tab[FIRST_LAYER_ROW + l * len(LAYER_ROWS) + j]
                if row[KIND] == W8A8 and not name.startswith("ln"):
                    Kp, Mp = int(row[KP_]), int(row[MP_])
                    blk[name].packed = self.pq[row[P_]:row[P_] + Kp * Mp]
                    blk[name].colsum = self.pi[row[SUM_]:row[SUM_] + Mp]


class FusedPath:
    """Decode and prefill of an engine through its backend's fused kernels (module `fk`).

    `decode` is one call into compiled code; `prefill` calls one compiled stage per layer
    operation, and BLAS (numpy's matmul) for the float matmuls. Every buffer is allocated
    here, once: a decode step allocates nothing.

    Numerics: within TOL[("kv_cache_logits", float32)] = 1e-5 of the unfused path. A model
    with W8A8 layers runs every stage before a quantization bit-identically to the unfused
    path (`exact`), because a 1-ulp difference there can flip an int8 activation. Otherwise
    attention runs on a transposed copy of the KV cache (`kvT`, kept in step with the cache)
    and GELU with a vectorized exp.
    """

    def __init__(self, engine: "Engine", fk):
        cfg = engine.config
        self.engine, self.fk = engine, fk
        self.weights = w = FusedWeights(engine)
        self.exact = bool((w.tab[FIRST_LAYER_ROW:, KIND] == W8A8).any())
        L, C, FF, NH = cfg.n_layer, cfg.d_model, cfg.d_ff, cfg.n_head
        B, V = cfg.block_size, cfg.vocab_size
        Bp = -(-B // 16) * 16  # keys padded to a multiple of 16 in kvT
        Kp = max(int(w.tab[:, KP_].max()), TILE_K)
        Mp = max(int(w.tab[:, MP_].max()), TILE_M)
        # int32 scratch: state, int32 sums of up to 4 rows, a quantized row, exp scratch
        self.si_state, self.si_acc = fk.LAYOUT["SI_STATE"], fk.LAYOUT["SI_ACC"]
        si_xq = self.si_acc + 4 * Mp
        si_ex = si_xq + -(-Kp // 64) * 16  # Kp bytes, rounded up to 64
        w.tab[ROW_DIMS, 6:11] = (Mp, Kp, Bp, si_xq, si_ex)
        # decode: x, h, a (C each), qkv (3C), c_fc out and gelu out (FF each), attention
        # weights (NH*Bp) and float64 scores (2*Bp)
        self.sf = np.zeros(6 * C + 2 * FF + (NH + 2) * Bp, np.float32)
        self.si = np.zeros(si_ex + 2 * max(FF, Bp), np.int32)
        self.ex = self.si[si_ex:]  # exp scratch
        self.logits = np.zeros(V, np.float32)
        # the caches transposed, (K or V, layer, channel, position): unused by exact models
        self.kvT = np.zeros((2, L, C, 0 if self.exact else Bp), np.float32)
        # prefill, up to B rows
        self.x, self.h, self.a, self.q = (np.zeros((B, C), np.float32) for _ in range(4))
        self.qkv = np.zeros((B, 3 * C), np.float32)
        self.f, self.g = np.zeros((B, FF), np.float32), np.zeros((B, FF), np.float32)
        self.att = np.zeros(max(NH * B * B, (NH + 2) * Bp), np.float32)
        self.xq_rows = np.zeros(B * Kp, np.int8)
        self.sx = np.zeros(B, np.float32)
        self.decoder = fk.Decoder(self.logits, self.sf, self.si, engine.k_cache, engine.v_cache,
                                  self.kvT, w.pf, w.pq, w.pi, w.tab, cfg.layer_norm_eps, self.exact)

    def nbytes(self) -> dict[str, int]:
        """Bytes of the packed weights, of kvT and of the scratch buffers."""
        w = self.weights
        scratch = (self.sf, self.si, self.logits, self.x, self.h, self.a, self.q, self.qkv,
                   self.f, self.g, self.att, self.xq_rows, self.sx)
        return {"weights": w.pf.nbytes + w.pq.nbytes + w.pi.nbytes + w.tab.nbytes,
                "kv_cache_transposed": self.kvT.nbytes,
                "scratch": sum(a.nbytes for a in scratch)}

    def cache_written(self, start: int) -> None:
        """The unfused path wrote cache positions from `start` on: kvT no longer mirrors them."""
        self.si[self.si_state] = min(int(self.si[self.si_state]), start)

    def decode(self, token: int, pos: int) -> np.ndarray:
        """Logits (V,) of `token` at `pos`, its keys and values appended to the cache.

        Returns the path's logits buffer, overwritten by the next call."""
        self.decoder.step(token, pos)
        return self.logits

    def _linear(self, y: np.ndarray, x: np.ndarray, l: int, name: str) -> None:
        """y (T, M) = block l's linear layer `name` applied to x (T, K)."""
        lin, fk = self.engine.blocks[l][name], self.fk
        if isinstance(lin, Linear):
            if self.exact:  # feeds a quantization: the unfused kernel, bit for bit
                fk.matmul_rows(y, x, lin.weight, lin.bias)
            else:
                np.matmul(x, lin.weight, out=y)  # BLAS
                y += lin.bias
        elif lin.mode == "w8a8":
            T, K = x.shape
            Kp = -(-K // TILE_K) * TILE_K
            xq = self.xq_rows[:T * Kp].reshape(T, Kp)
            fk.linear_w8a8_rows(y, xq, self.sx[:T], self.si[self.si_acc:], x, lin.packed, lin.colsum,
                                lin.scale, lin.bias)
        else:
            fk.matmul_int8_rows(y, x, lin.weight_q, lin.scale, lin.bias)

    def prefill(self, idx: np.ndarray, last_only: bool) -> np.ndarray:
        """Logits of tokens idx (T,) at positions 0..T-1, filling the cache: (T, V) in a new
        array, or with last_only the last row (V,) in the logits buffer."""
        e, fk, cfg = self.engine, self.fk, self.engine.config
        T, C, NH, HS, eps = len(idx), cfg.d_model, cfg.n_head, cfg.d_head, cfg.layer_norm_eps
        x, h, a, q = self.x[:T], self.h[:T], self.a[:T], self.q[:T]
        qkv, f, g = self.qkv[:T], self.f[:T], self.g[:T]
        scale = np.float32(1.0 / np.sqrt(cfg.d_head))  # as the attention kernels compute it
        np.take(e.wte, idx, axis=0, out=x)
        x += e.wpe[:T]  # (T, C) token + position embeddings
        for l, blk in enumerate(e.blocks):
            fk.layernorm_rows(h, x, *blk["ln_1"], eps)
            self._linear(qkv, h, l, "attn.c_attn")
            e.k_cache[l, :T] = qkv[:, C:2 * C]
            e.v_cache[l, :T] = qkv[:, 2 * C:]
            q[...] = qkv[:, :C]
            if self.exact:
                fk.attention_rows(h, self.att[:NH * T * T].reshape(NH, T, T), q, e.k_cache[l, :T],
                                  e.v_cache[l, :T], NH, scale)
            else:  # per head: scores and weighted sums by BLAS, the causal softmax compiled
                self.kvT[0, l, :, :T] = qkv[:, C:2 * C].T  # the decode steps' transposed cache
                self.kvT[1, l, :, :T] = qkv[:, 2 * C:].T
                att = self.att[:T * T].reshape(T, T)
                for hd in range(NH):
                    cols = slice(hd * HS, (hd + 1) * HS)
                    np.matmul(q[:, cols], self.kvT[0, l, cols, :T], out=att)  # (T, T) scores
                    fk.causal_softmax_rows(att, scale, self.ex)
                    np.matmul(att, e.v_cache[l, :T, cols], out=h[:, cols])  # (T, HS)
            self._linear(a, h, l, "attn.c_proj")
            x += a  # residual
            fk.layernorm_rows(h, x, *blk["ln_2"], eps)
            self._linear(f, h, l, "mlp.c_fc")
            if self.exact:
                fk.gelu_rows(g.reshape(-1), f.reshape(-1))
            else:
                fk.gelu_fast_rows(g, f, self.ex)
            self._linear(a, g, l, "mlp.c_proj")
            x += a  # residual
        self.si[self.si_state] = 0 if self.exact else T
        fk.layernorm_rows(h, x, *e.ln_f, eps)
        if last_only:
            fk.head(self.logits, h[T - 1], e.wte)
            return self.logits
        logits = np.empty((T, cfg.vocab_size), np.float32)
        fk.head_rows(logits, h, e.wte)  # (T, V) tied head: the unfused kernel, not BLAS
        return logits
