"""numba backend, fused path: one compiled call per decode step, and fast prefill stages.

`decode_rows` runs a whole decode step (every layer, the KV-cache append, attention against
the cache, the MLP, ln_f and the tied head) for n sequences ("rows") at once, in one call
into compiled code: the engine's block forward (minitf/engine.py, `Engine._run`) compiled
for one token per row, on weights packed once (`layout.PackedWeights`) and scratch buffers
allocated once (`layout.Buffers`): nothing is allocated per step. Each row has its own KV
cache and position; each linear layer and the head run weight block outer, rows inner, so
that every weight is read from memory once per step for all rows (then from L1/L2), which
is what batching buys once the weights no longer fit in cache. A single sequence is the
case n = 1 of the same code, so a row computes, bit for bit, what it computes alone: its
arithmetic never depends on the other rows (the rows of a W8A8 layer share weight passes,
but their int32 sums are exact in any grouping). Every offset comes from `layout` (its
constants, and the sizes and scratch rows of the index table). The prefill runs in the
engine, stage by stage, and calls the stages here that the unfused backend has no
counterpart for (`linear_w8a8_rows`, `causal_softmax_rows`, `gelu_fast_rows`); the large
float matmuls go to BLAS there. Loops index arrays rather than take row views: a view made
inside a numba loop costs two atomic reference-count updates.

Numerics. A W8A8 model quantizes activations at run time, so a value 1 ulp away from the
unfused path's can land in the next int8 step and move the logits by up to 0.05 (measured
on a trained model). For W8A8 models (`exact`) every stage before a quantization therefore
runs numba_kernels' own loops (`_layernorm`, `_attention`, `_gelu`, `_matmul_row`,
`_quantize_row`, ...) row by row on arrays of the types the unfused path gives them, so it
rounds exactly as the unfused path; the int8 sums are exact in any order. Float32 and
weight-only models have no such cliff: their linear layers run all rows per weight pass
(`_matmul_rows`; a large float32 layer, stored transposed (layout.py, F32T), as dot
products like the tied head's), attention runs along the keys of a transposed copy of the cache
(`_attention_t`) and GELU uses a vectorized exp (`_gelu_fast`), within 1e-5.

int8 x int8 sums: `numba_int8_tile.int8_tile` on the tiles of `layout.pack_vnni`, in the
variant `INT8_ISA` (AVX-512 VNNI, AVX2 or portable: the fastest the CPU runs, unless
$MINITF_ISA forces one), exact, called in one place (`_w8a8_sums`), then the unfused
kernels' epilogue.

The tied head (`_head_rows`) is float32, or an int8 wte with a scale per row (`quantize
--int8-head`): weight-only, a contiguous float dot of h with each int8 row
(`numba_kernels._matmul_nt_int8_row`, as the unfused kernel); W8A8, h quantized once per
row and the int8 tile on wte.T packed as a (C, V) weight, as many vocabulary entries at a
time as the rows' int32 sums hold (`head_w8a8_rows` for the prefill). The embedding then reads
one int8 row per token and dequantizes it.
"""

from __future__ import annotations

import math

import numpy as np

from numba import prange

from ._jit import njit, njit_parallel
from ._threads import kernel_threads
from .layout import (ATTN_PROJ, B, C_ATTN, C_FC, CTL_POS, CTL_ROW, CTL_TOKEN, DIM_BP,
                     DIM_C, DIM_FF, DIM_L, DIM_MP, DIM_NH, DIM_V, F32, F32T, FIRST_LAYER_ROW,
                     HEAD_CHUNK, INT8, KIND, KP, LN_1, LN_2, MLP_PROJ, MP, ROW_DIMS, ROW_LNF,
                     ROW_SCRATCH, ROW_WPE, ROW_WTE, ROWS_PER_LAYER, S, SF_A, SF_ATT, SF_F, SF_G,
                     SF_H, SF_QKV, SF_S64, SF_SX, SF_X, SI_ACC, SI_EX, SI_XQ, SUM,
                     THREAD_MIN_WEIGHTS, TILE_K, TILE_M, W8A8, K, M, P, Q, W)
from .numba_int8_tile import INT8_ISA, int8_tile
from .numba_kernels import (_attention, _gelu, _layernorm, _matmul_int8_row,
                            _matmul_nt_int8_row, _matmul_nt_row, _matmul_row, _quantize_row,
                            _w8a8_epilogue)

__all__ = ["INT8_ISA", "Decoder", "decode_rows", "linear_w8a8_rows", "head_w8a8_rows",
           "causal_softmax_rows", "gelu_fast_rows"]


# ----------------------------------------------------------------------- linear layers ---


@njit
def _w8a8_tiles(acc, a_stride, xq, x_stride, n, wp, wsum, Kp, t0, t1):
    """acc[i * a_stride + m] = sum_k xq[i * x_stride + k] * w[k, m] for rows i < n and the
    outputs m of tiles t0 .. t1-1 (64 each), w the (Kp, Mp) int8 weight tiled by
    `layout.pack_vnni` (wp), wsum (Mp,) its column sums.

    Tile outer, rows inner, 4 rows per weight pass: each tile of weights (Kp x 64 bytes) is
    read once for all rows. Exact int32 sums, whatever the grouping of rows. acc int32 and
    xq int8 flat arrays (row i's activations at xq[i * x_stride:], Kp of them)."""
    groups = Kp // TILE_K
    for tile in range(t0, t1):
        i = 0
        while i < n:
            rows = 4 if i + 4 <= n else 1
            int8_tile(acc, i * a_stride + tile * TILE_M, a_stride, xq[i * x_stride:], x_stride,
                      wp, tile * groups * TILE_K * TILE_M, wsum, tile * TILE_M, groups, rows)
            i += rows


@njit_parallel
def _w8a8_tiles_threads(acc, a_stride, xq, x_stride, n, wp, wsum, Kp, tiles, threads):
    """`_w8a8_tiles` of tiles 0 .. tiles-1, split into `threads` contiguous ranges, one per
    thread (the sums of a tile do not depend on who computes it)."""
    for t in prange(threads):
        _w8a8_tiles(acc, a_stride, xq, x_stride, n, wp, wsum, Kp, tiles * t // threads,
                    tiles * (t + 1) // threads)


@njit
def _w8a8_sums(acc, a_stride, xq, x_stride, n, wp, wsum, Kp, Mp, threads):
    """`_w8a8_tiles` of all Mp // 64 tiles: on `threads` threads if there are more than one
    and the weight has at least THREAD_MIN_WEIGHTS bytes, else serially."""
    if threads > 1 and Kp * Mp >= THREAD_MIN_WEIGHTS:
        _w8a8_tiles_threads(acc, a_stride, xq, x_stride, n, wp, wsum, Kp, Mp // TILE_M, threads)
    else:
        _w8a8_tiles(acc, a_stride, xq, x_stride, n, wp, wsum, Kp, 0, Mp // TILE_M)


@njit
def _split(M_, t, threads, multiple):
    """The start of thread t's range when M_ outputs are split `threads` ways: a multiple of
    `multiple` (16, a cache line of floats, so that two threads never write the same line;
    or a kernel's block of outputs); M_ for t = threads."""
    return M_ if t >= threads else M_ * t // threads // multiple * multiple


@njit
def linear_w8a8_rows(y, xq, sx, acc, x, wp, wsum, w_scale, bias, threads):
    """`numba_kernels._matmul_w8a8` for N rows (bit-identical), 4 rows per weight pass, the
    tiles split over `threads` threads (`_w8a8_sums`).

    Outputs y (N, M) float32; scratch xq (N, Kp) int8, sx (N,) float32, acc (N, Mp) int32;
    inputs x (N, K) float32, tiles wp, wsum (Mp,), w_scale (M,), bias (M,).
    """
    N, Kn = x.shape
    Kp, Mp = xq.shape[1], wsum.shape[0]
    for n in range(N):
        sx[n] = _quantize_row(xq[n, :Kn], x[n])
    _w8a8_sums(acc.reshape(-1), Mp, xq.reshape(-1), Kp, N, wp, wsum, Kp, Mp, threads)
    for n in range(N):
        _w8a8_epilogue(y[n], acc[n], sx[n], w_scale, bias)


@njit
def _matmul_cols(sf, o, i0, w, n, m0, m1):
    """sf[i, o+m0:o+m1] = sf[i, i0:i0+K] @ float32(w[:, m0:m1]) for the step's rows i < n, w
    (K, M) float32 or int8 (weight-only layers: the caller applies the channel scale).
    Groups of 8 k outer, rows inner, so that the 8 weight rows of a group are read once for
    all rows.

    Every output runs the same loop body (8 k per pass, k ascending, then the last k one by
    one) whatever n, m0 and m1, so a row's result depends neither on the other rows nor on
    how the outputs are split over threads. 8 k per pass rather than the unfused kernel's
    4: half the loads and stores of the outputs per weight byte, which streamed GPT-2
    small's weights (9 MB a layer, read from memory) faster on Zen 4 (`bench/compare.py
    --config gpt2` times the step); within TOL[("kv_cache_logits", float32)] of it (float32
    models only: W8A8 ones take the unfused loops). Views of the group's weight rows and of
    each row's outputs keep the inner loop vectorized: indices offset by an argument would
    not be (numba's negative-index check)."""
    Kn = w.shape[0]
    Mw = m1 - m0
    for i in range(n):
        y = sf[i, o + m0:o + m1]
        for m in range(Mw):
            y[m] = 0
    k = 0
    while k + 8 <= Kn:
        w0, w1, w2, w3 = w[k, m0:m1], w[k + 1, m0:m1], w[k + 2, m0:m1], w[k + 3, m0:m1]
        w4, w5, w6, w7 = w[k + 4, m0:m1], w[k + 5, m0:m1], w[k + 6, m0:m1], w[k + 7, m0:m1]
        for i in range(n):
            y = sf[i, o + m0:o + m1]
            a0, a1, a2, a3 = sf[i, i0 + k], sf[i, i0 + k + 1], sf[i, i0 + k + 2], sf[i, i0 + k + 3]
            a4, a5, a6, a7 = sf[i, i0 + k + 4], sf[i, i0 + k + 5], sf[i, i0 + k + 6], sf[i, i0 + k + 7]
            for m in range(Mw):
                y[m] += ((a0 * np.float32(w0[m]) + a1 * np.float32(w1[m])
                          + a2 * np.float32(w2[m]) + a3 * np.float32(w3[m]))
                         + (a4 * np.float32(w4[m]) + a5 * np.float32(w5[m])
                            + a6 * np.float32(w6[m]) + a7 * np.float32(w7[m])))
        k += 8
    while k < Kn:
        wk = w[k, m0:m1]
        for i in range(n):
            y = sf[i, o + m0:o + m1]
            a = sf[i, i0 + k]
            for m in range(Mw):
                y[m] += a * np.float32(wk[m])
        k += 1


@njit
def _matmul_nt_cols(sf, o, i0, wt, n, m0, m1):
    """sf[i, o+m0:o+m1] = sf[i, i0:i0+K] @ wt[m0:m1].T for the step's rows i < n, wt (M, K)
    float32 (an F32T layer, layout.py): HEAD_CHUNK outputs at a time for all rows, each a
    dot product as the tied head's (`_matmul_nt_row`, four outputs per pass from m0, a
    multiple of 4: an output's sum is the same whatever the split and the rows)."""
    Kn = wt.shape[1]
    for c0 in range(m0, m1, HEAD_CHUNK):
        c1 = min(c0 + HEAD_CHUNK, m1)
        for i in range(n):
            _matmul_nt_row(sf[i, o + c0:o + c1], sf[i, i0:i0 + Kn], wt[c0:c1])


@njit_parallel
def _matmul_cols_threads(sf, o, i0, w, n, threads, transposed):
    """`_matmul_cols` (w (K, M)) or, `transposed`, `_matmul_nt_cols` (w (M, K)) of all
    outputs, split into `threads` ranges (`_split`), one per thread."""
    Mn = w.shape[0] if transposed else w.shape[1]
    for t in prange(threads):
        m0, m1 = _split(Mn, t, threads, 16), _split(Mn, t + 1, threads, 16)
        if transposed:
            _matmul_nt_cols(sf, o, i0, w, n, m0, m1)
        else:
            _matmul_cols(sf, o, i0, w, n, m0, m1)


@njit
def _matmul_rows(sf, o, i0, w, n, threads, transposed):
    """sf[i, o:o+M] = sf[i, i0:i0+K] @ float32(w) for the step's rows i < n, w (K, M)
    (`_matmul_cols`) or, `transposed`, the F32T layer's (M, K) (`_matmul_nt_cols`), on
    `threads` threads if there are more than one and w has at least THREAD_MIN_WEIGHTS
    weights."""
    if threads > 1 and w.size >= THREAD_MIN_WEIGHTS:
        _matmul_cols_threads(sf, o, i0, w, n, threads, transposed)
    elif transposed:
        _matmul_nt_cols(sf, o, i0, w, n, 0, w.shape[0])
    else:
        _matmul_cols(sf, o, i0, w, n, 0, w.shape[1])


@njit
def _quantize_step_rows(sf, si, sc, i0, Kn, n):
    """Quantize sf[i, i0:i0+Kn] of the step's rows i < n (W8A8 activations, each row's scale
    into sf[i, SF_SX]) into the int8 slots of si. Returns (flat, xq, xq_off): si as one flat
    int32 array (row i's sums SW = si.shape[1] apart), the same bytes as int8, and the offset
    of row 0's activations in them (row i's 4 SW bytes further)."""
    SW, SX = si.shape[1], sc[SF_SX]
    flat = si.reshape(-1)
    xq = flat.view(np.int8)
    xq_off = 4 * sc[SI_XQ]
    for i in range(n):
        at = 4 * (i * SW) + xq_off
        sf[i, SX] = _quantize_row(xq[at:at + Kn], sf[i, i0:i0 + Kn])
    return flat, xq, xq_off


@njit
def _linear_rows(sf, si, sc, o, i0, pf, pq, pi, row, n, exact, threads):
    """sf[i, o:o+M] = linear layer `row` of the index table applied to sf[i, i0:i0+K], for
    the step's rows i < n (sc: the scratch row), by its kind: F32, F32T and INT8 (weight-only)
    all rows per weight pass (`_matmul_rows`, then the scale and bias), or in a W8A8 model
    (`exact`) the unfused kernels' row loops; W8A8: each row quantized (its own scale), the
    int8 tile on 4 rows per weight pass, then the unfused epilogue per row. The weight
    passes of a large layer run on `threads` threads (`_matmul_rows`, `_w8a8_sums`)."""
    Kn, Mn = row[K], row[M]
    bias = pf[row[B]:row[B] + Mn]
    if row[KIND] == F32 or row[KIND] == F32T:
        if row[KIND] == F32T:
            _matmul_rows(sf, o, i0, pf[row[W]:row[W] + Kn * Mn].reshape((Mn, Kn)), n, threads, True)
        elif exact:  # feeds a quantization: the unfused kernel, bit for bit
            w = pf[row[W]:row[W] + Kn * Mn].reshape((Kn, Mn))
            for i in range(n):
                _matmul_row(sf[i, o:o + Mn], sf[i, i0:i0 + Kn], w)
        else:
            _matmul_rows(sf, o, i0, pf[row[W]:row[W] + Kn * Mn].reshape((Kn, Mn)), n, threads, False)
        for i in range(n):
            y = sf[i, o:o + Mn]
            for m in range(Mn):
                y[m] += bias[m]
    elif row[KIND] == INT8:
        wq = pq[row[Q]:row[Q] + Kn * Mn].reshape((Kn, Mn))
        w_scale = pf[row[S]:row[S] + Mn]
        if exact:
            for i in range(n):
                _matmul_int8_row(sf[i, o:o + Mn], sf[i, i0:i0 + Kn], wq, w_scale, bias)
        else:
            _matmul_rows(sf, o, i0, wq, n, threads, False)
            for i in range(n):
                y = sf[i, o:o + Mn]
                for m in range(Mn):
                    y[m] = y[m] * w_scale[m]  # the channel scale, once per output
                for m in range(Mn):
                    y[m] += bias[m]
    else:
        Kp, Mp, SX = row[KP], row[MP], sc[SF_SX]
        wsum = pi[row[SUM]:row[SUM] + Mp]
        w_scale = pf[row[S]:row[S] + Mn]
        SW = si.shape[1]
        flat, xq, xq_off = _quantize_step_rows(sf, si, sc, i0, Kn, n)
        _w8a8_sums(flat[SI_ACC:], SW, xq[xq_off:], 4 * SW, n, pq[row[P]:row[P] + Kp * Mp], wsum,
                   Kp, Mp, threads)
        for i in range(n):
            _w8a8_epilogue(sf[i, o:o + Mn], si[i, SI_ACC:SI_ACC + Mp], sf[i, SX], w_scale, bias)


@njit
def head_w8a8_rows(y, xq, sx, acc, x, wp, wsum, w_scale, threads):
    """The W8A8 int8 head for N rows: `numba_kernels._matmul_nt_w8a8` (bit-identical) on
    the tiles of wte.T, as many vocabulary entries at a time as acc holds, 4 rows per
    weight pass, each chunk's tiles split over `threads` threads (`_w8a8_sums`).

    Outputs y (N, V) float32; scratch xq (N, Kp) int8, sx (N,) float32, acc (N, chunk)
    int32 (chunk a multiple of TILE_M); inputs x (N, C) float32, wp the tiles of wte.T (C, V)
    (`layout.pack_vnni`), wsum (Vp,) their column sums, w_scale (V,) the rows' scales.
    """
    N, Kn = x.shape
    Kp, V, chunk = xq.shape[1], y.shape[1], acc.shape[1]
    Vp = wsum.shape[0]
    for n in range(N):
        sx[n] = _quantize_row(xq[n, :Kn], x[n])
    for m0 in range(0, V, chunk):  # tiles from m0 // TILE_M: Kp * TILE_M bytes each from m0 * Kp
        mp = min(chunk, Vp - m0)
        m1 = min(m0 + mp, V)
        _w8a8_sums(acc.reshape(-1), chunk, xq.reshape(-1), Kp, N, wp[m0 * Kp:(m0 + mp) * Kp],
                   wsum[m0:m0 + mp], Kp, mp, threads)
        for n in range(N):
            _w8a8_epilogue(y[n, m0:m1], acc[n, :m1 - m0], sx[n], w_scale[m0:m1], None)


@njit
def _head_part(logits, sf, si, sc, pf, pq, pi, row, ctl, n, chunk, t, threads):
    """Part t of `threads` of the tied head (`_head_rows`): the logits of a contiguous range
    of the vocabulary, for the step's rows i < n (W8A8: their activations already quantized
    into si). F32 and INT8 (weight-only) run chunks of HEAD_CHUNK rows of wte for all rows
    (each output sums as in the whole row: the unfused kernels' `_matmul_nt_row`,
    `_matmul_nt_int8_row`); W8A8 runs the tiles of wte.T for all rows (4 per weight pass),
    as many vocabulary entries at a time as its share of the rows' int32 sums holds (chunk
    // threads of the chunk = DIM_MP columns, from column t of those shares), then the
    unfused epilogue per row. The parts are disjoint, in outputs and in scratch."""
    V, C, H = row[K], row[M], sc[SF_H]
    if row[KIND] == F32 or row[KIND] == INT8:
        m_lo = _split(V, t, threads, HEAD_CHUNK)
        m_hi = _split(V, t + 1, threads, HEAD_CHUNK)
        if row[KIND] == F32:
            wte = pf[row[W]:row[W] + V * C].reshape((V, C))
            for m0 in range(m_lo, m_hi, HEAD_CHUNK):  # a chunk of wte for all rows
                m1 = min(m0 + HEAD_CHUNK, V)
                for i in range(n):  # (each output sums as in the whole row)
                    _matmul_nt_row(logits[ctl[CTL_ROW, i], m0:m1], sf[i, H:H + C], wte[m0:m1])
        else:
            wq = pq[row[Q]:row[Q] + V * C].reshape((V, C))
            w_scale = pf[row[S]:row[S] + V]
            for m0 in range(m_lo, m_hi, HEAD_CHUNK):
                m1 = min(m0 + HEAD_CHUNK, V)
                for i in range(n):
                    _matmul_nt_int8_row(logits[ctl[CTL_ROW, i], m0:m1], sf[i, H:H + C],
                                        wq[m0:m1], w_scale[m0:m1])
        return
    Kp, Vp, SX = row[KP], row[MP], sc[SF_SX]
    w_scale = pf[row[S]:row[S] + V]  # (V,)
    wp, wsum = pq[row[P]:row[P] + Kp * Vp], pi[row[SUM]:row[SUM] + Vp]
    SW = si.shape[1]
    flat = si.reshape(-1)
    xq = flat.view(np.int8)
    xq_off = 4 * sc[SI_XQ]
    width = chunk // threads // TILE_M * TILE_M  # this part's columns of the sums
    a0 = SI_ACC + t * width
    m0 = _split(Vp, t, threads, TILE_M)
    m_hi = _split(Vp, t + 1, threads, TILE_M)
    while m0 < m_hi:  # tiles from m0 // TILE_M: Kp * TILE_M bytes each from m0 * Kp
        mp = min(width, m_hi - m0)
        m1 = min(m0 + mp, V)
        _w8a8_tiles(flat[a0:], SW, xq[xq_off:], 4 * SW, n, wp[m0 * Kp:(m0 + mp) * Kp],
                    wsum[m0:m0 + mp], Kp, 0, mp // TILE_M)
        for i in range(n):
            _w8a8_epilogue(logits[ctl[CTL_ROW, i], m0:m1], si[i, a0:a0 + m1 - m0], sf[i, SX],
                           w_scale[m0:m1], None)
        m0 += mp


@njit_parallel
def _head_threads(logits, sf, si, sc, pf, pq, pi, row, ctl, n, chunk, threads):
    """`_head_part` t of `threads` on thread t."""
    for t in prange(threads):
        _head_part(logits, sf, si, sc, pf, pq, pi, row, ctl, n, chunk, t, threads)


@njit
def _head_rows(logits, sf, si, sc, pf, pq, pi, row, ctl, n, chunk, threads):
    """logits[ctl[CTL_ROW, i]] (V,) = the tied head (table row `row`, ROW_WTE) of
    sf[i, H:H+C] for the step's rows i < n, by its kind (`_head_part`; W8A8: each row
    quantized once first), its vocabulary split over `threads` threads if there are more
    than one (the head has at least THREAD_MIN_WEIGHTS weights and, W8A8, the sums have a
    tile of columns per thread: `chunk`, DIM_MP, is only that wide in a model with W8A8
    layers), else in one part."""
    V, C, H = row[K], row[M], sc[SF_H]
    if row[KIND] == W8A8:
        _quantize_step_rows(sf, si, sc, H, C, n)
    if (threads > 1 and V * C >= THREAD_MIN_WEIGHTS
            and (row[KIND] != W8A8 or chunk >= threads * TILE_M)):
        _head_threads(logits, sf, si, sc, pf, pq, pi, row, ctl, n, chunk, threads)
    else:
        _head_part(logits, sf, si, sc, pf, pq, pi, row, ctl, n, chunk, 0, 1)


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
def _attention_t(out, s, s64, ex, q, k, v, kT, vT, Tk, n_head, scale):
    """One query against the first Tk keys of a transposed cache, float32, the last of them
    (k, v (C,), the query's own) written into column Tk - 1 on the way.

    `numpy_ref.attention` for the last query row (it sees every key) within
    TOL[("kernel_attention", float32)]. out (C,); scratch s (NH, Bp) float32, s64 (Bp,)
    float64, ex (`_exp_scratch` of Bp); q, k, v (C,); kT, vT (C, Bp): key/value j of the
    cache in column j (j < Tk - 1 already there), Bp a multiple of 16. The new column is
    written channel by channel just before that channel's row is read: a pass of its own
    would touch C cache lines 4 Bp bytes apart, which for a batch of rows are no longer in
    cache (measured: a seventh of a 16-row step). Scores and weighted sums run along the keys, the
    contiguous axis, so they vectorize whatever the head size; keys are padded to a multiple
    of 16 with weight 0. Scores are summed in float64: summed channel by channel in float32
    they would round more than the unfused kernel's dot products (~5 ulp of a score of 20,
    2e-5 in the logits of a trained model). Loops index the arrays (no row views: a view in
    a numba loop costs a reference-count update).
    """
    C = q.shape[0]
    HS = C // n_head
    Tp = min((Tk + 15) // 16 * 16, kT.shape[1])
    t = Tk - 1
    for h in range(n_head):
        for j in range(Tp):
            s64[j] = 0
        c, c1 = h * HS, (h + 1) * HS
        while c + 4 <= c1:  # scores = q_h @ K_h^T, 4 channels per pass
            q0, q1 = np.float64(q[c]), np.float64(q[c + 1])
            q2, q3 = np.float64(q[c + 2]), np.float64(q[c + 3])
            kT[c, t], kT[c + 1, t], kT[c + 2, t], kT[c + 3, t] = k[c], k[c + 1], k[c + 2], k[c + 3]
            for j in range(Tp):
                s64[j] += q0 * kT[c, j] + q1 * kT[c + 1, j] + q2 * kT[c + 2, j] + q3 * kT[c + 3, j]
            c += 4
        while c < c1:
            qc = np.float64(q[c])
            kT[c, t] = k[c]
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
            vT[c, t] = v[c]
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
def _residual_rows(sf, x0, a0, C, n):
    """sf[i, x0:x0+C] += sf[i, a0:a0+C] for rows i < n: the residual stream."""
    for i in range(n):
        x, a = sf[i, x0:x0 + C], sf[i, a0:a0 + C]
        for c in range(C):
            x[c] += a[c]


@njit
def _layernorm_rows(sf, o, i0, pf, ln, n, eps):
    """sf[i, o:o+C] = LayerNorm of sf[i, i0:i0+C] (weights: table row `ln`), rows i < n,
    each row as the unfused kernel computes a (1, C) array."""
    C = ln[M]
    w, b = pf[ln[W]:ln[W] + C], pf[ln[B]:ln[B] + C]
    for i in range(n):
        _layernorm(sf[i, o:o + C].reshape((1, C)), sf[i, i0:i0 + C].reshape((1, C)), w, b, eps)


@njit
def _int8_head_row(x, pq, er, token, s):
    """x (C,) = row `token` of the int8 head (table row er, ROW_WTE) times s, float32: read
    from the (V, C) rows (INT8), or gathered from the tiles of wte.T (W8A8, its only copy:
    4 bytes every TILE_K * TILE_M, `layout.unpack_vnni_columns`)."""
    C = x.shape[0]
    if er[KIND] == INT8:
        at = er[Q] + token * C
        for c in range(C):
            x[c] = np.float32(pq[at + c]) * s
    else:
        at = er[P] + (token // TILE_M) * er[KP] * TILE_M + (token % TILE_M) * TILE_K
        for c in range(C):
            x[c] = np.float32(pq[at + (c // TILE_K) * (TILE_K * TILE_M) + c % TILE_K]) * s


@njit
def decode_rows(logits, sf, si, k_cache, v_cache, kvT, synced, pf, pq, pi, tab, ctl, n, eps,
                exact, threads):
    """One decode step of n sequences: for each row i < n of the step, the logits of token
    ctl[CTL_TOKEN, i] at position ctl[CTL_POS, i] of sequence r = ctl[CTL_ROW, i], its keys
    and values appended to r's cache.

    The engine's block forward (`Engine._run`) over one token per row, stage by stage, every
    linear layer and the head for all rows per weight pass. Buffers (`layout.Buffers`):
    logits (R, V) out, row r; sf float32 (R, SFW) and si int32 (R, SIW) scratch, row i, at
    the offsets of the table's scratch row; k_cache, v_cache (R, n_layer, block_size,
    d_model); kvT (R, 2, n_layer, d_model, Bp) the caches transposed and synced (R,) the
    positions each mirrors, kept in step here (positions written by anything else are
    copied in first). pf, pq, pi, tab: the packed weights. exact: a W8A8 model, whose
    stages before a quantization must be the unfused kernels', bit for bit (kvT unused).
    threads: the large linear layers and the head split their outputs over that many
    threads (kernels/_threads.py); the logits are the same, bit for bit, for any count.
    Rows must be distinct sequences with positions < block_size (the engine checks).
    """
    dims, sc = tab[ROW_DIMS], tab[ROW_SCRATCH]
    L, C, NH, V = dims[DIM_L], dims[DIM_C], dims[DIM_NH], dims[DIM_V]
    FF, Bp = dims[DIM_FF], dims[DIM_BP]
    er = tab[ROW_WTE]
    wpe = pf[tab[ROW_WPE, W]:]
    scale = np.float32(1.0 / math.sqrt(C // NH))  # as the checks compute it for _attention
    X, H, A, QKV, F, G = sc[SF_X], sc[SF_H], sc[SF_A], sc[SF_QKV], sc[SF_F], sc[SF_G]
    for i in range(n):  # embedding: token and position
        token, pos, x = ctl[CTL_TOKEN, i], ctl[CTL_POS, i], sf[i, X:X + C]
        if er[KIND] == F32:
            wte = pf[er[W] + token * C:er[W] + (token + 1) * C]
            for c in range(C):
                x[c] = wte[c] + wpe[pos * C + c]
        else:  # the int8 head's row, dequantized, then the position: two roundings, as
            # the unfused path (two loops: no fused multiply-add)
            _int8_head_row(x, pq, er, token, pf[er[S] + token])
            for c in range(C):
                x[c] += wpe[pos * C + c]
    for l in range(L):
        r0 = FIRST_LAYER_ROW + l * ROWS_PER_LAYER
        _layernorm_rows(sf, H, X, pf, tab[r0 + LN_1], n, eps)
        _linear_rows(sf, si, sc, QKV, H, pf, pq, pi, tab[r0 + C_ATTN], n, exact, threads)
        for i in range(n):  # append each row's key and value to its cache, attend to it
            r, pos = ctl[CTL_ROW, i], ctl[CTL_POS, i]
            Tk = pos + 1
            kc, vc, qkv = k_cache[r, l], v_cache[r, l], sf[i, QKV:QKV + 3 * C]
            for c in range(C):
                kc[pos, c] = qkv[C + c]
                vc[pos, c] = qkv[2 * C + c]
            h, q = sf[i, H:H + C], sf[i, QKV:QKV + C]
            if exact:
                att = sf[i, sc[SF_ATT]:sc[SF_ATT] + NH * Tk].reshape((NH, 1, Tk))
                _attention(h.reshape((1, C)), att, q.reshape((1, C)), kc[:Tk], vc[:Tk], NH, scale)
            else:  # differs: along the keys of the transposed cache, which vectorizes (1e-5)
                kT, vT = kvT[r, 0, l], kvT[r, 1, l]
                _sync_transposed(kT, vT, kc, vc, min(synced[r], pos), pos)  # anything missing
                att = sf[i, sc[SF_ATT]:sc[SF_ATT] + NH * Bp].reshape((NH, Bp))
                s64 = sf[i, sc[SF_S64]:sc[SF_S64] + 2 * Bp].view(np.float64)
                ex = _exp_scratch(si[i, sc[SI_EX]:], max(FF, Bp))
                _attention_t(h, att, s64, ex, q, qkv[C:2 * C], qkv[2 * C:], kT, vT, Tk, NH, scale)
        _linear_rows(sf, si, sc, A, H, pf, pq, pi, tab[r0 + ATTN_PROJ], n, exact, threads)
        _residual_rows(sf, X, A, C, n)
        _layernorm_rows(sf, H, X, pf, tab[r0 + LN_2], n, eps)
        _linear_rows(sf, si, sc, F, H, pf, pq, pi, tab[r0 + C_FC], n, exact, threads)
        for i in range(n):
            if exact:
                _gelu(sf[i, G:G + FF], sf[i, F:F + FF])
            else:  # differs: with the vectorized exp (1e-5)
                _gelu_fast(sf[i, G:G + FF], sf[i, F:F + FF], _exp_scratch(si[i, sc[SI_EX]:], FF))
        _linear_rows(sf, si, sc, A, G, pf, pq, pi, tab[r0 + MLP_PROJ], n, exact, threads)
        _residual_rows(sf, X, A, C, n)
    if not exact:
        for i in range(n):
            synced[ctl[CTL_ROW, i]] = ctl[CTL_POS, i] + 1
    _layernorm_rows(sf, H, X, pf, tab[ROW_LNF], n, eps)
    _head_rows(logits, sf, si, sc, pf, pq, pi, er, ctl, n, dims[DIM_MP], threads)  # the tied head


# ------------------------------------------------------------------------ prefill -------
# The engine's prefill (minitf/engine.py, `FusedPath`) calls these stages on T rows, beside
# the unfused backend's own loops; they take preallocated outputs, as every kernel here does.


@njit
def causal_softmax_rows(att, scale, si):
    """In place, row i of att (Tq, Tk) becomes softmax(scale * att[i, :j+1]) followed by
    zeros, j = Tk - Tq + i the query's position (it sees keys 0..j): the causal softmax of
    prefill, whose scores q @ k.T come from BLAS. `numpy_ref.attention`'s weights within
    TOL[("kernel", float32)]. si: int32 scratch of 2 * Tk elements."""
    Tq, Tk = att.shape
    ex = _exp_scratch(si, Tk)
    for i in range(Tq):
        last = Tk - Tq + i
        row = att[i, :last + 1]
        for j in range(last + 1):
            row[j] *= scale
        mx = row[0]
        for j in range(1, last + 1):
            mx = max(mx, row[j])
        _exp_into(row, row, mx, ex)
        total = np.float32(0)
        for j in range(last + 1):
            total += row[j]
        for j in range(last + 1):
            row[j] /= total
        for j in range(last + 1, Tk):
            att[i, j] = 0


@njit
def gelu_fast_rows(y, x, si):
    """GELU of x (T, FF) into y, row by row, with the vectorized exp (`_gelu_fast`); si:
    int32 scratch of 2 * FF elements."""
    ex = _exp_scratch(si, x.shape[1])
    for t in range(x.shape[0]):
        _gelu_fast(y[t], x[t], ex)


class Decoder:
    """Decode steps on arrays bound once (the interface of `_cython_fused.Decoder`).
    Arguments: see `decode_rows`; the engine writes the step's rows into ctl."""

    def __init__(self, logits, sf, si, k_cache, v_cache, kvT, synced, pf, pq, pi, tab, ctl,
                 eps, exact):
        self._arrays = (logits, sf, si, k_cache, v_cache, kvT, synced, pf, pq, pi, tab, ctl)
        self.eps, self.exact = float(eps), bool(exact)
        self.rows = sf.shape[0]

    def step(self, n: int) -> None:
        """Run the first n rows of ctl (checked by the engine) on the kernel threads
        (kernels/_threads.py); fills their logits."""
        if not 1 <= n <= self.rows:
            raise ValueError(f"n={n} rows: the buffers hold 1..{self.rows}")
        decode_rows(*self._arrays, n, self.eps, self.exact, kernel_threads())
