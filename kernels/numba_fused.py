"""numba backend, fused path: one compiled call per decoded token, and fast prefill stages.

`decode_step` runs a whole decode step (every layer, the KV-cache append, attention against
the cache, the MLP, ln_f and the tied head) in one call into compiled code, on weights that
the engine packed once at load (minitf/engine.py, "Fused path") into three flat arrays and
an index table, and on scratch buffers that it allocated once: nothing is allocated per
token. The prefill stages (`layernorm_rows`, `linear_w8a8_rows`, ...) are called from the
engine's Python prefill, which leaves the large float matmuls to BLAS.

Numerics. Each stage names the reference function it equals. Where the result feeds a
run-time quantization (every stage of a W8A8 model except the head), a value 1 ulp away
from the unfused path's could round an activation to the next int8 step and move the
logits by ~1e-3, so those stages call the unfused backend's own kernels
(`numba_kernels._layernorm`, `_attention`, `_gelu`, `_matmul_row`, `_quantize_row`) and
give bit-identical results. The int8 x int8 sums are exact in any order, so they use a
faster layout (below). Float32 and weight-only models have no such cliff: they use the
faster float32 attention of this module, within 1e-5 of the unfused path.

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
    _matmul_int8_weight_only,
    _matmul_nt,
    _matmul_row,
    _quantize_row,
)

NAME = "numba"

# Columns of the index table `tab` (int64, one row per tensor): see engine.FusedWeights,
# which writes it. Offsets are element offsets into pf (float32), pq (int8) or pi (int32).
KIND, K, M, W, B, S, Q, P, KP, MP, SUM = range(11)
# Kinds of linear layer (column KIND).
F32, INT8, W8A8 = 0, 1, 2
# Rows: 0 holds the sizes (n_layer, d_model, n_head, vocab, block_size, d_ff in columns
# 0..5), then wte, wpe, ln_f, then ROWS_PER_LAYER rows per block in this order.
ROW_DIMS, ROW_WTE, ROW_WPE, ROW_LNF = 0, 1, 2, 3
LN_1, C_ATTN, ATTN_PROJ, LN_2, C_FC, MLP_PROJ = range(6)
ROWS_PER_LAYER = 6
FIRST_LAYER_ROW = 4
TILE = 64  # outputs per VNNI tile: 4 zmm registers of 16 int32 lanes

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
            flip = ir.Constant(_I32x16, [0x80808080 - 2**32] * 16)  # xq ^ 0x80 = xq + 128 as u8
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
                    xb = builder.insert_element(ir.Constant(_I32x16, None), x4, ir.Constant(i32, 0))
                    xb = builder.shuffle_vector(xb, ir.Constant(_I32x16, None), ir.Constant(_I32x16, [0] * 16))
                    xb = builder.xor(xb, flip)
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


@njit
def _linear_w8a8_row(y, xq, acc, x, wp, wsum, w_scale, bias):
    """One row of `numba_kernels._matmul_w8a8` (bit-identical): quantize x (K,), int32 sums
    on the packed weights wp, then (float32(acc) * sx) * w_scale + bias into y (M,).

    Scratch xq (>= Kp,) int8 and acc (>= Mp,) int32; wsum (Mp,) int32 = column sums of w.
    """
    K, M = x.shape[0], y.shape[0]
    Mp = wsum.shape[0]
    groups = (K + 3) // 4  # padded k rows hold zero weights: their activations do not count
    s = _quantize_row(xq[:K], x)
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

    Outputs y (N, M) float32; scratch xq (N, Kp) int8, sx (N,) float32, acc (4, Mp) int32;
    inputs x (N, K) float32, packed wp, wsum (Mp,), w_scale (M,), bias (M,).
    """
    N, K = x.shape
    M = y.shape[1]
    Kp, Mp = xq.shape[1], wsum.shape[0]
    groups = Kp // 4
    for n in range(N):
        sx[n] = _quantize_row(xq[n, :K], x[n])
        for k in range(K, Kp):
            xq[n, k] = 0
    xflat, aflat = xq.reshape(-1), acc.reshape(-1)
    n = 0
    while n < N:
        rows = 4 if n + 4 <= N else 1
        for tile in range(Mp // TILE):
            _int8_tile(aflat, tile * TILE, Mp, xflat[n * Kp:], Kp, wp, tile * groups * 4 * TILE,
                       groups, rows)
        for r in range(rows):
            yr, ar, s = y[n + r], acc[r], sx[n + r]
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
    `_matmul_int8_weight_only`; W8A8: `_linear_w8a8_row`.
    """
    Kn, Mn = row[K], row[M]
    bias = pf[row[B]:row[B] + Mn]
    if row[KIND] == F32:
        _matmul_row(y, x, pf[row[W]:row[W] + Kn * Mn].reshape((Kn, Mn)))
        for m in range(Mn):
            y[m] += bias[m]
    elif row[KIND] == INT8:
        wq = pq[row[Q]:row[Q] + Kn * Mn].reshape((Kn, Mn))
        _matmul_int8_weight_only(y.reshape((1, Mn)), x.reshape((1, Kn)), wq,
                                 pf[row[S]:row[S] + Mn], bias)
    else:
        Kp, Mp = row[KP], row[MP]
        _linear_w8a8_row(y, xq, acc, x, pq[row[P]:row[P] + Kp * Mp], pi[row[SUM]:row[SUM] + Mp],
                         pf[row[S]:row[S] + Mn], bias)


@njit
def _attention_fast(out, att, q, k, v, n_head, scale):
    """Causal attention of Tq queries against Tk keys, float32 throughout: equals
    `numpy_ref.attention` within TOL[("kernel_attention", float32)] (not bit for bit: the
    exponentials are float32). out (Tq, C), att (NH, Tq, Tk) scratch; q (Tq, C), k, v (Tk, C).
    """
    Tq, C = q.shape
    Tk = k.shape[0]
    HS = C // n_head
    for i in range(Tq):
        last = Tk - Tq + i  # query i's absolute position: it sees keys 0 .. last
        o_row = out[i]
        for c in range(C):
            o_row[c] = 0
        for h in range(n_head):
            c0 = h * HS
            a = att[h, i]
            qi = q[i, c0:c0 + HS]
            mx = np.float32(-np.inf)
            for j in range(last + 1):
                kj = k[j, c0:c0 + HS]
                s = np.float32(0)
                for c in range(HS):
                    s += qi[c] * kj[c]
                s *= scale
                a[j] = s
                mx = max(mx, s)
            total = np.float32(0)
            for j in range(last + 1):
                e = np.exp(a[j] - mx)
                a[j] = e
                total += e
            inv = np.float32(1) / total
            o = o_row[c0:c0 + HS]
            for j in range(last + 1):
                p, vj = a[j] * inv, v[j, c0:c0 + HS]
                for c in range(HS):
                    o[c] += p * vj[c]


@njit
def _head(logits, x, wte):
    """logits (V,) = x (C,) @ wte (V, C).T, the tied head: `numpy_ref.matmul_nt` within
    TOL[("kernel_dot", float32)]; four vocabulary rows per pass over x."""
    V, C = wte.shape
    v = 0
    while v + 4 <= V:
        w0, w1, w2, w3 = wte[v], wte[v + 1], wte[v + 2], wte[v + 3]
        s0 = s1 = s2 = s3 = np.float32(0)
        for c in range(C):
            xc = x[c]
            s0 += xc * w0[c]
            s1 += xc * w1[c]
            s2 += xc * w2[c]
            s3 += xc * w3[c]
        logits[v], logits[v + 1], logits[v + 2], logits[v + 3] = s0, s1, s2, s3
        v += 4
    while v < V:
        s = np.float32(0)
        for c in range(C):
            s += x[c] * wte[v, c]
        logits[v] = s
        v += 1


# ------------------------------------------------------------------------ decode --------


@njit
def decode_step(logits, sf, xq, acc, k_cache, v_cache, pf, pq, pi, tab, token, pos, eps, exact):
    """Logits (V,) of `token` at position `pos`, appending its keys and values to the cache.

    Equals the engine's unfused `_forward` over one token (minitf/engine.py), stage by stage.
    sf is float32 scratch of engine.FusedWeights.scratch_f32 elements; xq int8 and acc int32
    scratch; k_cache, v_cache (n_layer, block_size, d_model); pf, pq, pi, tab the packed
    weights; eps the LayerNorm epsilon; exact: use the unfused kernels' attention (W8A8).
    """
    L, C, NH, V, FF = tab[ROW_DIMS, 0], tab[ROW_DIMS, 1], tab[ROW_DIMS, 2], tab[ROW_DIMS, 3], tab[ROW_DIMS, 5]
    Tk = pos + 1
    x, h, a = sf[:C], sf[C:2 * C], sf[2 * C:3 * C]
    qkv, f, g = sf[3 * C:6 * C], sf[6 * C:6 * C + FF], sf[6 * C + FF:6 * C + 2 * FF]
    att = sf[6 * C + 2 * FF:6 * C + 2 * FF + NH * Tk].reshape((NH, 1, Tk))
    wte = pf[tab[ROW_WTE, W]:tab[ROW_WTE, W] + V * C].reshape((V, C))
    wpe = pf[tab[ROW_WPE, W]:]
    scale = np.float32(1.0 / math.sqrt(C // NH))  # as numba_kernels.attention computes it
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
            _attention(h.reshape((1, C)), att, qkv[:C].reshape((1, C)), kc[:Tk], vc[:Tk], NH, scale)
        else:
            _attention_fast(h.reshape((1, C)), att, qkv[:C].reshape((1, C)), kc[:Tk], vc[:Tk], NH, scale)
        _linear_row(a, h, pf, pq, pi, tab[r + ATTN_PROJ], xq, acc)
        for c in range(C):
            x[c] = x[c] + a[c]  # residual
        ln = tab[r + LN_2]
        _layernorm(h.reshape((1, C)), x.reshape((1, C)), pf[ln[W]:ln[W] + C], pf[ln[B]:ln[B] + C], eps)
        _linear_row(f, h, pf, pq, pi, tab[r + C_FC], xq, acc)
        _gelu(g, f)
        _linear_row(a, g, pf, pq, pi, tab[r + MLP_PROJ], xq, acc)
        for c in range(C):
            x[c] = x[c] + a[c]  # residual
    ln = tab[ROW_LNF]
    _layernorm(h.reshape((1, C)), x.reshape((1, C)), pf[ln[W]:ln[W] + C], pf[ln[B]:ln[B] + C], eps)
    _head(logits, h, wte)
