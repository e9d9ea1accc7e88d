"""numba backend, fused path: one compiled call per decoded token, and fast prefill stages.

`decode_step` runs a whole decode step (every layer, the KV-cache append, attention against
the cache, the MLP, ln_f and the tied head) in one call into compiled code: the engine's
block forward (minitf/engine.py, `Engine._run`) compiled for one token, on weights packed
once (`layout.PackedWeights`) and scratch buffers allocated once (`layout.Buffers`): nothing
is allocated per token. Every offset comes from `layout` (its constants, and the sizes and
scratch rows of the index table). The prefill runs in the engine, stage by stage, and calls
the stages here that the unfused backend has no counterpart for (`linear_w8a8_rows`,
`causal_softmax_rows`, `gelu_fast_rows`); the large float matmuls go to BLAS there. Loops
index arrays rather than take row views: a view made inside a numba loop costs two atomic
reference-count updates.

Numerics. A W8A8 model quantizes activations at run time, so a value 1 ulp away from the
unfused path's can land in the next int8 step and move the logits by up to 0.05 (measured
on a trained model). For W8A8 models (`exact`) every stage before a quantization therefore
runs numba_kernels' own loops (`_layernorm`, `_attention`, `_gelu`, `_matmul_row`,
`_quantize_row`, ...), so it rounds exactly as the unfused path; the int8 sums are exact in
any order. Float32 and weight-only models have no such cliff: attention runs along the keys
of a transposed copy of the cache (`_attention_t`) and GELU uses a vectorized exp
(`_gelu_fast`), within 1e-5.

int8 x int8 sums: `numba_int8_tile.int8_tile` on the tiles of `layout.pack_vnni`, in the
variant `INT8_ISA` (AVX-512 VNNI, AVX2 or portable: the fastest the CPU runs, unless
$MINITF_ISA forces one), exact, then the unfused kernels' epilogue.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import njit
from .layout import (ATTN_PROJ, B, C_ATTN, C_FC, DIM_BP, DIM_C, DIM_FF, DIM_L, DIM_NH,
                     DIM_V, F32, FIRST_LAYER_ROW, INT8, KIND, KP, LN_1, LN_2, MLP_PROJ, MP,
                     ROW_DIMS, ROW_LNF, ROW_SCRATCH, ROW_WPE, ROW_WTE, ROWS_PER_LAYER, S,
                     SF_A, SF_ATT, SF_F, SF_G, SF_H, SF_QKV, SF_S64, SF_X, SI_ACC, SI_EX,
                     SI_STATE, SI_XQ, SUM, TILE_K, TILE_M, K, M, P, Q, W)
from .numba_int8_tile import INT8_ISA, int8_tile
from .numba_kernels import (_attention, _gelu, _layernorm, _matmul_int8_row, _matmul_nt_row,
                            _matmul_row, _quantize_row, _w8a8_epilogue)

__all__ = ["INT8_ISA", "Decoder", "decode_step", "linear_w8a8_rows", "causal_softmax_rows",
           "gelu_fast_rows"]


# ----------------------------------------------------------------------- linear layers ---


@njit
def _linear_w8a8_row(y, xq, acc, x, wp, wsum, w_scale, bias):
    """One row of `numba_kernels._matmul_w8a8` (bit-identical): quantize x (K,), int32 sums
    on the tiles wp, then the unfused epilogue into y (M,).

    Scratch xq (>= Kp,) int8 and acc (>= Mp,) int32; wsum (Mp,) int32 = column sums of w.
    """
    Kn, Mp = x.shape[0], wsum.shape[0]  # (column names K, M are layout's)
    groups = (Kn + TILE_K - 1) // TILE_K  # padded k rows hold zero weights: xq there is ignored
    s = _quantize_row(xq[:Kn], x)
    for tile in range(Mp // TILE_M):
        int8_tile(acc, tile * TILE_M, 0, xq, 0, wp, tile * groups * TILE_K * TILE_M, wsum,
                  tile * TILE_M, groups, 1)
    _w8a8_epilogue(y, acc, s, w_scale, bias)


@njit
def linear_w8a8_rows(y, xq, sx, acc, x, wp, wsum, w_scale, bias):
    """`numba_kernels._matmul_w8a8` for N rows (bit-identical), 4 rows per weight pass.

    Outputs y (N, M) float32; scratch xq (N, Kp) int8, sx (N,) float32, acc (>= 4 Mp,)
    int32; inputs x (N, K) float32, tiles wp, wsum (Mp,), w_scale (M,), bias (M,).
    """
    N, Kn = x.shape
    Kp, Mp = xq.shape[1], wsum.shape[0]
    groups = Kp // TILE_K
    for n in range(N):
        sx[n] = _quantize_row(xq[n, :Kn], x[n])
    xflat = xq.reshape(-1)
    n = 0
    while n < N:
        rows = 4 if n + 4 <= N else 1
        for tile in range(Mp // TILE_M):
            int8_tile(acc, tile * TILE_M, Mp, xflat[n * Kp:], Kp, wp,
                      tile * groups * TILE_K * TILE_M, wsum, tile * TILE_M, groups, rows)
        for r in range(rows):
            _w8a8_epilogue(y[n + r], acc[r * Mp:(r + 1) * Mp], sx[n + r], w_scale, bias)
        n += rows


@njit
def _linear_row(y, x, pf, pq, pi, row, xq, acc):
    """y (M,) = linear layer `row` of the index table applied to x (K,), by its kind:
    F32 and INT8 (weight-only) run the unfused kernels' row loops; W8A8 `_linear_w8a8_row`."""
    Kn, Mn = row[K], row[M]
    bias = pf[row[B]:row[B] + Mn]
    if row[KIND] == F32:
        _matmul_row(y, x, pf[row[W]:row[W] + Kn * Mn].reshape((Kn, Mn)))
        for m in range(Mn):
            y[m] += bias[m]
    elif row[KIND] == INT8:
        wq = pq[row[Q]:row[Q] + Kn * Mn].reshape((Kn, Mn))
        _matmul_int8_row(y, x, wq, pf[row[S]:row[S] + Mn], bias)
    else:
        _linear_w8a8_row(y, xq, acc, x, pq[row[P]:row[P] + row[KP] * row[MP]],
                         pi[row[SUM]:row[SUM] + row[MP]], pf[row[S]:row[S] + Mn], bias)


# ------------------------------------------------------------- float32 fast stages ------


# exp in float32, vectorizable (libm's expf is a call per element, ~4x slower here): Cephes'
# expf. x = k ln 2 + r with |r| <= ln(2) / 2, exp(r) by its degree-7 polynomial (~1 ulp),
# 2^k made from its IEEE exponent bits in an int32 scratch array viewed as float32.
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # k * _LN2_HI is exact
_EXP_P = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
          np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))
_X_MIN, _X_MAX = np.float32(-87.0), np.float32(88.0)  # exp stays a normal float32 in between


@njit
def _exp_scratch(si, n):
    """The scratch of `_exp_into` for up to n elements, in an int32 array of 2 n elements:
    (bits (n,) int32, the same memory as float32, poly (n,) float32)."""
    bits = si[:n]
    return bits, bits.view(np.float32), si[n:2 * n].view(np.float32)


@njit
def _exp_into(y, x, shift, ex):
    """y = exp(x - shift), float32 (n,), within 2 ulp of `np.exp`, with ex = `_exp_scratch`
    of at least n. Arguments are clamped to [-87, 88]: the result is never inf, and at least
    1.6e-38 where the reference underflows to 0 (invisible in a softmax or a GELU).

    y may be x: each loop writes only scratch or only y, and every loop indexes its arrays by
    the loop counter alone, so LLVM vectorizes all of them (an in-place loop fails its
    run-time overlap check, and an offset index its proof of contiguity: both run scalar).
    """
    bits, two_k, poly = ex
    p0, p1, p2, p3, p4, p5 = _EXP_P
    for i in range(x.shape[0]):
        v = min(max(x[i] - shift, _X_MIN), _X_MAX)
        ki = np.int32(v * _LOG2E + np.float32(128.5)) - np.int32(128)  # floor(v log2(e) + 1/2)
        k = np.float32(ki)
        r = v - k * _LN2_HI - k * _LN2_LO
        poly[i] = ((((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5) * r * r + r) + np.float32(1)
        bits[i] = (ki + np.int32(127)) << 23  # the float32 2^k
    for i in range(x.shape[0]):
        y[i] = poly[i] * two_k[i]


@njit
def _gelu_fast(y, x, ex):
    """GPT-2's GELU as `numba_kernels._gelu` computes it, v / (1 + exp(-2u)), with the
    vectorized exp: `numpy_ref.gelu` within TOL[("kernel", float32)]. y, x (n,), y not x."""
    c2, c3 = np.float32(2.0 * math.sqrt(2.0 / math.pi)), np.float32(0.044715)
    for i in range(x.shape[0]):
        v = x[i]
        y[i] = -c2 * (v + c3 * v * v * v)  # -2u
    _exp_into(y, y, np.float32(0), ex)
    for i in range(x.shape[0]):
        y[i] = x[i] / (np.float32(1) + y[i])


@njit
def _attention_t(out, s, s64, ex, q, kT, vT, Tk, n_head, scale):
    """One query against the first Tk keys of a transposed cache, float32.

    `numpy_ref.attention` for the last query row (it sees every key) within
    TOL[("kernel_attention", float32)]. out (C,); scratch s (NH, Bp) float32, s64 (Bp,)
    float64, ex (`_exp_scratch` of Bp); q (C,); kT, vT (C, Bp): key/value j of the cache in
    column j, Bp a multiple of 16. Scores and weighted sums run along the keys, the
    contiguous axis, so they vectorize whatever the head size; keys are padded to a multiple
    of 16 with weight 0. Scores are summed in float64: summed channel by channel in float32
    they would round more than the unfused kernel's dot products (~5 ulp of a score of 20,
    2e-5 in the logits of a trained model). Loops index the arrays (no row views: a view in
    a numba loop costs a reference-count update).
    """
    C = q.shape[0]
    HS = C // n_head
    Tp = min((Tk + 15) // 16 * 16, kT.shape[1])
    for h in range(n_head):
        for j in range(Tp):
            s64[j] = 0
        c, c1 = h * HS, (h + 1) * HS
        while c + 4 <= c1:  # scores = q_h @ K_h^T, 4 channels per pass
            q0, q1 = np.float64(q[c]), np.float64(q[c + 1])
            q2, q3 = np.float64(q[c + 2]), np.float64(q[c + 3])
            for j in range(Tp):
                s64[j] += q0 * kT[c, j] + q1 * kT[c + 1, j] + q2 * kT[c + 2, j] + q3 * kT[c + 3, j]
            c += 4
        while c < c1:
            qc = np.float64(q[c])
            for j in range(Tp):
                s64[j] += qc * kT[c, j]
            c += 1
        for j in range(Tp):
            s[h, j] = np.float32(s64[j]) * scale  # as the unfused kernel: dot, then scale
        mx = s[h, 0]
        for j in range(1, Tk):
            mx = max(mx, s[h, j])
        sh = s[h, :Tk]
        _exp_into(sh, sh, mx, ex)  # softmax over the Tk real keys
        total = np.float32(0)
        for j in range(Tk):
            total += s[h, j]
        for j in range(Tk):
            s[h, j] /= total
        for j in range(Tk, Tp):
            s[h, j] = 0  # padding keys weigh nothing
        for c in range(h * HS, c1):  # out_h = p @ V_h
            acc = np.float32(0)
            for j in range(Tp):
                acc += s[h, j] * vT[c, j]
            out[c] = acc


# ------------------------------------------------------------------------ decode --------


@njit
def _sync_transposed(kT, vT, k, v, start, stop):
    """Copy cache positions start..stop-1 of k, v (B, C) into columns of kT, vT (C, Bp)."""
    for t in range(start, stop):
        for c in range(k.shape[1]):
            kT[c, t] = k[t, c]
            vT[c, t] = v[t, c]


@njit
def decode_step(logits, sf, si, k_cache, v_cache, kvT, pf, pq, pi, tab, token, pos, eps, exact):
    """Logits (V,) of `token` at position `pos`, appending its keys and values to the cache.

    The engine's block forward (`Engine._run`) over one token, stage by stage. Buffers
    (`layout.Buffers`): sf float32 and si int32 scratch at the offsets of the table's scratch
    row ([SI_STATE]: the cache positions mirrored in kvT); k_cache, v_cache (n_layer,
    block_size, d_model); kvT (2, n_layer, d_model, Bp) the caches transposed, kept in step
    here (positions written by anything else are copied in first). pf, pq, pi, tab: the
    packed weights. exact: a W8A8 model, whose attention must be the unfused kernel's, bit
    for bit (kvT is then unused).
    """
    dims, sc = tab[ROW_DIMS], tab[ROW_SCRATCH]
    L, C, NH, V = dims[DIM_L], dims[DIM_C], dims[DIM_NH], dims[DIM_V]
    FF, Bp = dims[DIM_FF], dims[DIM_BP]
    Tk = pos + 1
    x, h, a = sf[sc[SF_X]:sc[SF_X] + C], sf[sc[SF_H]:sc[SF_H] + C], sf[sc[SF_A]:sc[SF_A] + C]
    qkv = sf[sc[SF_QKV]:sc[SF_QKV] + 3 * C]
    f, g = sf[sc[SF_F]:sc[SF_F] + FF], sf[sc[SF_G]:sc[SF_G] + FF]
    att = sf[sc[SF_ATT]:sc[SF_ATT] + NH * Bp]
    s64 = sf[sc[SF_S64]:sc[SF_S64] + 2 * Bp].view(np.float64)
    acc, xq = si[SI_ACC:sc[SI_XQ]], si[sc[SI_XQ]:sc[SI_EX]].view(np.int8)
    ex = _exp_scratch(si[sc[SI_EX]:], max(FF, Bp))
    wte = pf[tab[ROW_WTE, W]:tab[ROW_WTE, W] + V * C].reshape((V, C))
    wpe = pf[tab[ROW_WPE, W]:]
    scale = np.float32(1.0 / math.sqrt(C // NH))  # as the checks compute it for _attention
    synced = min(si[SI_STATE], pos)
    for c in range(C):  # embedding: token and position
        x[c] = wte[token, c] + wpe[pos * C + c]
    for l in range(L):
        r = FIRST_LAYER_ROW + l * ROWS_PER_LAYER
        ln = tab[r + LN_1]
        _layernorm(h.reshape((1, C)), x.reshape((1, C)), pf[ln[W]:ln[W] + C], pf[ln[B]:ln[B] + C], eps)
        _linear_row(qkv, h, pf, pq, pi, tab[r + C_ATTN], xq, acc)
        kc, vc = k_cache[l], v_cache[l]
        for c in range(C):  # append this step's key and value to the cache
            kc[pos, c] = qkv[C + c]
            vc[pos, c] = qkv[2 * C + c]
        if exact:
            att_l = att[:NH * Tk].reshape((NH, 1, Tk))
            _attention(h.reshape((1, C)), att_l, qkv[:C].reshape((1, C)), kc[:Tk], vc[:Tk], NH, scale)
        else:  # differs: along the keys of the transposed cache, which vectorizes (1e-5)
            _sync_transposed(kvT[0, l], kvT[1, l], kc, vc, synced, Tk)
            _attention_t(h, att.reshape((NH, Bp)), s64, ex, qkv[:C], kvT[0, l], kvT[1, l], Tk, NH, scale)
        _linear_row(a, h, pf, pq, pi, tab[r + ATTN_PROJ], xq, acc)
        for c in range(C):
            x[c] = x[c] + a[c]  # residual
        ln = tab[r + LN_2]
        _layernorm(h.reshape((1, C)), x.reshape((1, C)), pf[ln[W]:ln[W] + C], pf[ln[B]:ln[B] + C], eps)
        _linear_row(f, h, pf, pq, pi, tab[r + C_FC], xq, acc)
        if exact:
            _gelu(g, f)
        else:  # differs: with the vectorized exp (1e-5)
            _gelu_fast(g, f, ex)
        _linear_row(a, g, pf, pq, pi, tab[r + MLP_PROJ], xq, acc)
        for c in range(C):
            x[c] = x[c] + a[c]  # residual
    if not exact:
        si[SI_STATE] = Tk
    ln = tab[ROW_LNF]
    _layernorm(h.reshape((1, C)), x.reshape((1, C)), pf[ln[W]:ln[W] + C], pf[ln[B]:ln[B] + C], eps)
    _matmul_nt_row(logits, h, wte)  # the tied head


# ------------------------------------------------------------------------ prefill -------
# The engine's prefill (minitf/engine.py, `FusedOps`) calls these stages on T rows, beside
# the unfused backend's own loops; they take preallocated outputs, as every kernel here does.


@njit
def causal_softmax_rows(att, scale, si):
    """In place, row i of att (T, T) becomes softmax(scale * att[i, :i+1]) followed by zeros:
    the causal softmax of prefill, whose scores q @ k.T come from BLAS. `numpy_ref.attention`'s
    weights within TOL[("kernel", float32)]. si: int32 scratch of 2 * T elements."""
    T = att.shape[0]
    ex = _exp_scratch(si, T)
    for i in range(T):
        row = att[i, :i + 1]
        for j in range(i + 1):
            row[j] *= scale
        mx = row[0]
        for j in range(1, i + 1):
            mx = max(mx, row[j])
        _exp_into(row, row, mx, ex)
        total = np.float32(0)
        for j in range(i + 1):
            total += row[j]
        for j in range(i + 1):
            row[j] /= total
        for j in range(i + 1, T):
            att[i, j] = 0


@njit
def gelu_fast_rows(y, x, si):
    """GELU of x (T, FF) into y, row by row, with the vectorized exp (`_gelu_fast`); si:
    int32 scratch of 2 * FF elements."""
    ex = _exp_scratch(si, x.shape[1])
    for t in range(x.shape[0]):
        _gelu_fast(y[t], x[t], ex)


class Decoder:
    """One decode step per `step(token, pos)` call, on arrays bound once (the interface of
    `_cython_fused.Decoder`). Arguments: see `decode_step`."""

    def __init__(self, logits, sf, si, k_cache, v_cache, kvT, pf, pq, pi, tab, eps, exact):
        self._arrays = (logits, sf, si, k_cache, v_cache, kvT, pf, pq, pi, tab)
        self.eps, self.exact = float(eps), bool(exact)
        self.block_size = k_cache.shape[1]

    def step(self, token: int, pos: int) -> None:
        """Run token (checked by the engine) at position pos < block_size; fills logits."""
        if not 0 <= pos < self.block_size:
            raise ValueError(f"pos={pos} is outside the cache (block_size {self.block_size})")
        decode_step(*self._arrays, token, pos, self.eps, self.exact)
