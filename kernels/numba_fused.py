"""numba backend, fused path: one compiled call per decoded token, and fast prefill stages.

`decode_step` runs a whole decode step (every layer, the KV-cache append, attention against
the cache, the MLP, ln_f and the tied head) in one call into compiled code, on weights that
the engine packed once at load (minitf/engine.py, "Fused path") into three flat arrays and
an index table, and on scratch buffers that it allocated once: nothing is allocated per
token. The prefill stages (`linear_w8a8_rows`, `causal_softmax_rows`, ...) are called from
the engine's Python prefill, which leaves the large float matmuls to BLAS. One function per
stage; each names the reference function it equals. Loops index arrays rather than take row
views: a view made inside a numba loop costs two atomic reference-count updates.

Numerics. A W8A8 model quantizes activations at run time, so a value 1 ulp away from the
unfused path's can land in the next int8 step and move the logits by up to 0.05 (measured
on a trained model). For W8A8 models (`exact`) every stage before a quantization therefore
rounds exactly as the unfused path: LayerNorm, attention and GELU are numba_kernels' own
functions, and `_matvec` and `_quantize` repeat the arithmetic of `_matmul_row` and
`_quantize_row` (tests/test_fused.py compares the bits). Float32 and weight-only models
have no such cliff: attention runs along the keys of a transposed copy of the cache
(`_attention_t`) and GELU uses a vectorized exp (`_gelu_fast`), within 1e-5.

int8 x int8 sums with AVX-512 VNNI. `vpdpbusd` multiplies 4 adjacent unsigned bytes by 4
signed bytes and adds the 4 products to an int32 lane: 64 products per instruction. It
needs unsigned activations, so an activation xq in [-127, 127] enters as the byte
xq ^ 0x80 = xq + 128 (the same bits read as unsigned), and the kernel subtracts
128 * sum_k w[k, m] afterwards: exact integer arithmetic, so the int32 sums equal
`numpy_ref.matmul_int8_acc` bit for bit. Weights are packed (M/64, K/4, 64, 4): for a
tile of 64 outputs, the 4 bytes of k = 4g .. 4g+3 of each output are adjacent, and a
tile's bytes are one contiguous stream. LLVM does not form `vpdpbusd` from loops by
itself (it stops at `vpmaddwd`, ~4x slower here), so `_dpbusd_tile` calls the instruction
through a numba intrinsic; without VNNI (or with NUMBA_DISABLE_JIT=1) the plain loop
`_int8_tile_loops` computes the same sums.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from ._jit import njit
from .numba_kernels import (
    _attention,
    _gelu,
    _layernorm,
    _matmul,
    _matmul_int8_weight_only,
    _matmul_nt,
)

NAME = "numba"

# Columns of the index table `tab` (int64, one row per tensor): see engine.FusedWeights,
# which writes it. Offsets are element offsets into pf (float32), pq (int8) or pi (int32).
KIND, K, M, W, B, S, Q, P, KP, MP, SUM = range(11)
# Kinds of linear layer (column KIND).
F32, INT8, W8A8 = 0, 1, 2
# Rows: 0 holds the sizes (n_layer, d_model, n_head, vocab, block_size, d_ff, the largest
# padded M and K of an int8 layer, block_size padded to 16, the offsets in decode_step's
# int32 scratch of the int8 row and of the exp scratch, in columns 0..10), then wte, wpe,
# ln_f, then ROWS_PER_LAYER rows per block in this order.
ROW_DIMS, ROW_WTE, ROW_WPE, ROW_LNF = 0, 1, 2, 3
LN_1, C_ATTN, ATTN_PROJ, LN_2, C_FC, MLP_PROJ = range(6)
ROWS_PER_LAYER = 6
FIRST_LAYER_ROW = 4
TILE = 64  # outputs per VNNI tile: 4 zmm registers of 16 int32 lanes
# int32 scratch `si` of decode_step: where the state, exp scratch and int32 sums start
# (the int8 row and the exp scratch follow at offsets stored in the table's sizes row)
SI_STATE, SI_ACC = 0, 16
# the layout above as one dict, as _cython_fused.LAYOUT (tests check that they agree)
LAYOUT = dict(KIND=KIND, K=K, M=M, W=W, B=B, S=S, Q=Q, P=P, KP=KP, MP=MP, SUM=SUM, F32=F32,
              INT8=INT8, W8A8=W8A8, ROW_DIMS=ROW_DIMS, ROW_WTE=ROW_WTE, ROW_WPE=ROW_WPE,
              ROW_LNF=ROW_LNF, FIRST_LAYER_ROW=FIRST_LAYER_ROW, ROWS_PER_LAYER=ROWS_PER_LAYER,
              TILE=TILE, SI_STATE=SI_STATE, SI_ACC=SI_ACC)

_I32x16 = ir.VectorType(ir.IntType(32), 16)


def _has_vnni() -> bool:
    from llvmlite import binding

    return "+avx512vnni" in binding.get_host_cpu_features().flatten().split(",")


# ----------------------------------------------------------------- int8 tiles (VNNI) ----


def _make_dpbusd_tile(rows: int):
    """An intrinsic summing one 64-output tile for `rows` rows of activations with vpdpbusd.

    _dpbusd_tile(acc, a_off, a_stride, xq, x_stride, wp, w_off, groups) writes, for r < rows
    and o < 64: acc[a_off + r * a_stride + o] =
        sum_{g < groups} sum_{i < 4} (xq[r * x_stride + 4g + i] + 128) * wp[w_off + 256g + 4o + i]
    The 4 * rows accumulators stay in registers for the whole k loop; each 64-byte weight
    vector is loaded once and used for every row.
    """

    @intrinsic
    def _dpbusd_tile(typingctx, acc, a_off, a_stride, xq, x_stride, wp, w_off, groups):
        sig = types.void(acc, types.intp, types.intp, xq, types.intp, wp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            acc_a, a_off_v, a_stride_v, xq_a, x_stride_v, wp_a, w_off_v, groups_v = args
            i64, i32 = ir.IntType(64), ir.IntType(32)
            acc_p = context.make_array(signature.args[0])(context, builder, acc_a).data
            xq_p = context.make_array(signature.args[3])(context, builder, xq_a).data
            wp_p = context.make_array(signature.args[5])(context, builder, wp_a).data
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_I32x16, [_I32x16] * 3), "llvm.x86.avx512.vpdpbusd.512")
            zero = ir.Constant(_I32x16, [0] * 16)
            flip = ir.Constant(i32, 0x80808080 - 2**32)  # xq ^ 0x80 = xq + 128 read as unsigned
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(4)] for _ in range(rows)]
            w_base = builder.gep(wp_p, [w_off_v])
            with cgutils.for_range(builder, groups_v) as loop:
                g = loop.index
                w_g = builder.bitcast(builder.gep(w_base, [builder.mul(g, ir.Constant(i64, 4 * TILE))]),
                                      _I32x16.as_pointer())
                wv = [builder.load(builder.gep(w_g, [ir.Constant(i64, t)]), align=1) for t in range(4)]
                for r in range(rows):
                    x_at = builder.add(builder.mul(ir.Constant(i64, r), x_stride_v),
                                       builder.mul(g, ir.Constant(i64, 4)))
                    x4 = builder.load(builder.bitcast(builder.gep(xq_p, [x_at]), i32.as_pointer()), align=1)
                    # (on the scalar: LLVM 22 never finishes compiling a vector xor feeding vpdpbusd)
                    x4 = builder.xor(x4, flip)
                    xb = builder.insert_element(ir.Constant(_I32x16, None), x4, ir.Constant(i32, 0))
                    xb = builder.shuffle_vector(xb, ir.Constant(_I32x16, None), ir.Constant(_I32x16, [0] * 16))
                    for t in range(4):
                        builder.store(builder.call(fn, [builder.load(accs[r][t]), xb, wv[t]]), accs[r][t])
            for r in range(rows):
                at = builder.add(a_off_v, builder.mul(ir.Constant(i64, r), a_stride_v))
                out = builder.bitcast(builder.gep(acc_p, [at]), _I32x16.as_pointer())
                for t in range(4):
                    builder.store(builder.load(accs[r][t]), builder.gep(out, [ir.Constant(i64, t)]), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return _dpbusd_tile


@njit
def _int8_tile_loops(acc, a_off, a_stride, xq, x_stride, wp, w_off, groups, rows):
    """The sums of `_dpbusd_tile` as plain loops (no VNNI, or NUMBA_DISABLE_JIT=1)."""
    for r in range(rows):
        for o in range(TILE):
            s = np.int32(0)
            for g in range(groups):
                for i in range(4):
                    a = np.int32(xq[r * x_stride + 4 * g + i]) + np.int32(128)
                    s += a * np.int32(wp[w_off + g * 4 * TILE + 4 * o + i])
            acc[a_off + r * a_stride + o] = s


HAS_VNNI = _has_vnni() and not numba.config.DISABLE_JIT
if HAS_VNNI:
    _tile_1 = _make_dpbusd_tile(1)
    _tile_4 = _make_dpbusd_tile(4)

    @njit
    def _int8_tile(acc, a_off, a_stride, xq, x_stride, wp, w_off, groups, rows):
        """acc tile (rows x 64) = (xq + 128) @ packed weights; rows is 1 or 4."""
        if rows == 4:
            _tile_4(acc, a_off, a_stride, xq, x_stride, wp, w_off, groups)
        else:
            _tile_1(acc, a_off, a_stride, xq, x_stride, wp, w_off, groups)
else:
    _int8_tile = _int8_tile_loops


# ----------------------------------------------------------------------- stages ----------


_F32_TINY = np.float32(np.finfo(np.float32).tiny)  # smallest normal float32
_Q_MAX = np.float32(127.0)


@njit
def _quantize(xq, x):
    """`numba_kernels._quantize_row` bit for bit, in loops that vectorize: quantize x (K,)
    float32 into xq (K,) int8 and return the scale. The max of |x| is exact in any order and
    a NaN anywhere rejects the row in both (here through its own flag), and each element is
    x / scale rounded half to even, clamped: the same operations, element by element."""
    K = x.shape[0]
    amax = np.float32(0.0)
    nan = False
    for k in range(K):
        a = abs(x[k])
        amax = max(amax, a)
        nan |= a != a
    scale = amax / _Q_MAX
    if nan or not (scale >= _F32_TINY and scale < np.float32(np.inf)):  # 0, subnormal, inf, NaN
        for k in range(K):
            xq[k] = 0
        return np.float32(1.0)
    for k in range(K):
        r = np.rint(x[k] / scale)  # round half to even
        xq[k] = np.int8(min(max(r, -_Q_MAX), _Q_MAX))
    return scale


@njit
def _linear_w8a8_row(y, xq, acc, x, wp, wsum, w_scale, bias):
    """One row of `numba_kernels._matmul_w8a8` (bit-identical): quantize x (K,), int32 sums
    on the packed weights wp, then (float32(acc) * sx) * w_scale + bias into y (M,).

    Scratch xq (>= Kp,) int8 and acc (>= Mp,) int32; wsum (Mp,) int32 = column sums of w.
    """
    K, M = x.shape[0], y.shape[0]
    Mp = wsum.shape[0]
    groups = (K + 3) // 4  # padded k rows hold zero weights: their activations do not count
    s = _quantize(xq[:K], x)
    for tile in range(Mp // TILE):
        _int8_tile(acc, tile * TILE, 0, xq, 0, wp, tile * groups * 4 * TILE, groups, 1)
    for m in range(M):  # three loops, in the order of _matmul_w8a8, so it rounds the same
        y[m] = np.float32(acc[m] - 128 * wsum[m]) * s
    for m in range(M):
        y[m] = y[m] * w_scale[m]
    for m in range(M):
        y[m] += bias[m]


@njit
def linear_w8a8_rows(y, xq, sx, acc, x, wp, wsum, w_scale, bias):
    """`numba_kernels._matmul_w8a8` for N rows (bit-identical), 4 rows per weight pass.

    Outputs y (N, M) float32; scratch xq (N, Kp) int8, sx (N,) float32, acc (>= 4 Mp,)
    int32; inputs x (N, K) float32, packed wp, wsum (Mp,), w_scale (M,), bias (M,).
    """
    N, K = x.shape
    M = y.shape[1]
    Kp, Mp = xq.shape[1], wsum.shape[0]
    groups = Kp // 4
    for n in range(N):
        sx[n] = _quantize(xq[n, :K], x[n])
    xflat = xq.reshape(-1)
    n = 0
    while n < N:
        rows = 4 if n + 4 <= N else 1
        for tile in range(Mp // TILE):
            _int8_tile(acc, tile * TILE, Mp, xflat[n * Kp:], Kp, wp, tile * groups * 4 * TILE,
                       groups, rows)
        for r in range(rows):
            yr, ar, s = y[n + r], acc[r * Mp:(r + 1) * Mp], sx[n + r]
            for m in range(M):
                yr[m] = np.float32(ar[m] - 128 * wsum[m]) * s
            for m in range(M):
                yr[m] = yr[m] * w_scale[m]
            for m in range(M):
                yr[m] += bias[m]
        n += rows


@njit
def _linear_row(y, x, pf, pq, pi, row, xq, acc):
    """y (M,) = linear layer `row` of the table applied to x (K,), by its kind.

    F32: `numba_kernels._matmul` for one row (bit-identical); INT8: weight-only
    `_matmul_int8_weight_only` for one row; W8A8: `_linear_w8a8_row`.
    """
    Kn, Mn = row[K], row[M]
    bias = pf[row[B]:row[B] + Mn]
    if row[KIND] == F32:
        _matvec(y, x, pf[row[W]:row[W] + Kn * Mn].reshape((Kn, Mn)))
        for m in range(Mn):
            y[m] += bias[m]
    elif row[KIND] == INT8:
        _matvec_int8(y, x, pq[row[Q]:row[Q] + Kn * Mn].reshape((Kn, Mn)), pf[row[S]:row[S] + Mn], bias)
    else:
        Kp, Mp = row[KP], row[MP]
        _linear_w8a8_row(y, xq, acc, x, pq[row[P]:row[P] + Kp * Mp], pi[row[SUM]:row[SUM] + Mp],
                         pf[row[S]:row[S] + Mn], bias)


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


@njit
def _head(logits, x, wte):
    """logits (V,) = x (C,) @ wte (V, C).T, the tied head: `numpy_ref.matmul_nt` within
    TOL[("kernel_dot", float32)]; four vocabulary rows per pass over x."""
    V, C = wte.shape
    v = 0
    while v + 4 <= V:
        s0 = s1 = s2 = s3 = np.float32(0)
        for c in range(C):
            xc = x[c]
            s0 += xc * wte[v, c]
            s1 += xc * wte[v + 1, c]
            s2 += xc * wte[v + 2, c]
            s3 += xc * wte[v + 3, c]
        logits[v], logits[v + 1], logits[v + 2], logits[v + 3] = s0, s1, s2, s3
        v += 4
    while v < V:
        s0 = np.float32(0)
        for c in range(C):
            s0 += x[c] * wte[v, c]
        logits[v] = s0
        v += 1


@njit
def _matvec(y, x, w):
    """y (M,) = x (K,) @ w (K, M): `numba_kernels._matmul_row`'s arithmetic (the same
    4-term sums, so the same rounding), indexing w instead of taking row views."""
    K, M = w.shape
    for m in range(M):
        y[m] = 0
    k = 0
    while k + 4 <= K:
        a0, a1, a2, a3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        for m in range(M):
            y[m] += a0 * w[k, m] + a1 * w[k + 1, m] + a2 * w[k + 2, m] + a3 * w[k + 3, m]
        k += 4
    while k < K:
        a = x[k]
        for m in range(M):
            y[m] += a * w[k, m]
        k += 1


@njit
def _matvec_int8(y, x, wq, w_scale, bias):
    """One row of `numba_kernels._matmul_int8_weight_only`, same arithmetic, indexing wq:
    y (M,) = (x (K,) @ float32(wq (K, M))) * w_scale + bias."""
    K, M = wq.shape
    for m in range(M):
        y[m] = 0
    k = 0
    while k + 4 <= K:
        a0, a1, a2, a3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        for m in range(M):
            y[m] += (a0 * np.float32(wq[k, m]) + a1 * np.float32(wq[k + 1, m])
                     + a2 * np.float32(wq[k + 2, m]) + a3 * np.float32(wq[k + 3, m]))
        k += 4
    while k < K:
        a = x[k]
        for m in range(M):
            y[m] += a * np.float32(wq[k, m])
        k += 1
    for m in range(M):
        y[m] = y[m] * w_scale[m]  # the channel scale, once per output
    for m in range(M):
        y[m] += bias[m]


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

    Equals the engine's unfused `_forward` over one token (minitf/engine.py), stage by stage.
    Buffers (engine.FusedPath allocates them): sf float32 scratch; si int32 scratch holding
    [SI_STATE] the number of cache positions mirrored in kvT, [SI_ACC:] int32 sums (4 Mp),
    then the int8 activations (Kp bytes) and the exp scratch; k_cache, v_cache
    (n_layer, block_size, d_model); kvT (2, n_layer, d_model, Bp) the caches transposed,
    kept in step here (positions written by the unfused path are copied in first). pf, pq,
    pi, tab: the packed weights. exact: a W8A8 model, whose attention must be the unfused
    kernel's, bit for bit (kvT is then unused).
    """
    L, C, NH, V = tab[ROW_DIMS, 0], tab[ROW_DIMS, 1], tab[ROW_DIMS, 2], tab[ROW_DIMS, 3]
    FF, Mp, Bp = tab[ROW_DIMS, 5], tab[ROW_DIMS, 6], tab[ROW_DIMS, 8]
    si_xq, si_ex = tab[ROW_DIMS, 9], tab[ROW_DIMS, 10]
    Tk = pos + 1
    x, h, a = sf[:C], sf[C:2 * C], sf[2 * C:3 * C]
    qkv, f, g = sf[3 * C:6 * C], sf[6 * C:6 * C + FF], sf[6 * C + FF:6 * C + 2 * FF]
    att = sf[6 * C + 2 * FF:6 * C + 2 * FF + NH * Bp]
    s64 = sf[6 * C + 2 * FF + NH * Bp:6 * C + 2 * FF + (NH + 2) * Bp].view(np.float64)
    acc, xq = si[SI_ACC:SI_ACC + 4 * Mp], si[si_xq:si_ex].view(np.int8)
    ex = _exp_scratch(si[si_ex:], max(FF, Bp))
    wte = pf[tab[ROW_WTE, W]:tab[ROW_WTE, W] + V * C].reshape((V, C))
    wpe = pf[tab[ROW_WPE, W]:]
    scale = np.float32(1.0 / math.sqrt(C // NH))  # as numba_kernels.attention computes it
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
        else:
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
        else:
            _gelu_fast(g, f, ex)
        _linear_row(a, g, pf, pq, pi, tab[r + MLP_PROJ], xq, acc)
        for c in range(C):
            x[c] = x[c] + a[c]  # residual
    if not exact:
        si[SI_STATE] = Tk
    ln = tab[ROW_LNF]
    _layernorm(h.reshape((1, C)), x.reshape((1, C)), pf[ln[W]:ln[W] + C], pf[ln[B]:ln[B] + C], eps)
    _head(logits, h, wte)


# ------------------------------------------------------------------------ prefill -------
# The engine's prefill (minitf/engine.py, FusedPath.prefill) calls these once per layer
# operation on T rows; they take preallocated outputs, as every kernel here does.

layernorm_rows = _layernorm  # (y, x, weight, bias, eps): numba_kernels' own, bit for bit
matmul_rows = _matmul  # (y, x, w, bias): float32 linear, numba_kernels' own (W8A8 models)
matmul_int8_rows = _matmul_int8_weight_only  # (y, x, wq, w_scale, bias): weight-only int8
gelu_rows = _gelu  # (y, x) flat: numba_kernels' own, bit for bit
attention_rows = _attention  # (out, att, q, k, v, n_head, scale): numba_kernels' own
head = _head  # (logits, x, wte): one row's logits
head_rows = _matmul_nt  # (logits, x, wte): every row's, numba_kernels' own


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
