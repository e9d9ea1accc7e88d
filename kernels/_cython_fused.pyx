# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Cython backend, fused path: one call per decoded token, and the prefill stages.

The Cython twin of `numba_fused` (read its docstring for the design): `Decoder.step` runs a
whole decode step, every layer, the KV-cache append, attention, the MLP, ln_f and the tied
head, without the GIL and without allocating, on the weights the engine packed once
(minitf/engine.py, "Fused path") and on scratch buffers it allocated once. `Decoder` keeps
the arrays' addresses, so a step costs one Python method call, not one buffer acquisition
per array.

Numerics, stage by stage:
- stages whose result feeds a run-time int8 quantization in a W8A8 model (LayerNorm,
  attention, GELU, float matmuls) round exactly as the unfused path does (`exact`): a 1-ulp
  difference there can flip an int8 activation and move the logits by up to 0.05. They are
  copies of `_cython_kernels`' loops, compiled with the same flags (copies, because that
  module has no .pxd to cimport them from; tests/test_fused.py checks their bits against
  the originals'), and a vectorized quantizer with the same per-element operations;
- int8 x int8 sums use AVX-512 VNNI `vpdpbusd` (64 products per instruction) on weights
  in the tile layout of `engine.pack_vnni`; exact in any order. Activations enter as
  unsigned bytes xq ^ 0x80 = xq + 128, and 128 * (column sum of w) is subtracted after.
  Without VNNI the same sums run as plain loops;
- float32 and weight-only models run attention on a transposed copy of the KV cache
  (`_attention_t`) and GELU with a vectorized exp, within 1e-5 of the unfused path.
"""

from libc.float cimport FLT_MIN
from libc.math cimport INFINITY, exp, expf, rintf, sqrt
from libc.stdint cimport int8_t, int32_t, int64_t, uint32_t

# The prefill stages that must round as the unfused path: the backend's own entry points.
from minitf.kernels._cython_kernels import attention_f32 as attention_rows
from minitf.kernels._cython_kernels import gelu_f32 as gelu_rows
from minitf.kernels._cython_kernels import layernorm_f32 as layernorm_rows
from minitf.kernels._cython_kernels import matmul_f32 as matmul_rows
from minitf.kernels._cython_kernels import matmul_int8_weight_only as matmul_int8_rows
from minitf.kernels._cython_kernels import matmul_nt_f32 as head_rows

NAME = "cython"

# Index table columns, kinds and rows: the layout engine.FusedWeights writes.
cdef enum:
    # columns
    KIND = 0
    K = 1
    M = 2
    W = 3
    B = 4
    S = 5
    Q = 6
    P = 7
    KP = 8
    MP = 9
    SUM = 10
    NCOL = 11
    # kinds of linear layer
    F32 = 0
    INT8 = 1
    W8A8 = 2
    # rows, and a block's rows in order
    ROW_DIMS = 0
    ROW_WTE = 1
    ROW_WPE = 2
    ROW_LNF = 3
    FIRST_LAYER_ROW = 4
    ROWS_PER_LAYER = 6
    LN_1 = 0
    C_ATTN = 1
    ATTN_PROJ = 2
    LN_2 = 3
    C_FC = 4
    MLP_PROJ = 5
    # outputs per VNNI tile: 4 zmm registers of 16 int32 lanes
    TILE = 64
    # decode_step's int32 scratch: state, then the int32 sums (see numba_fused.decode_step)
    SI_STATE = 0
    SI_ACC = 16

LAYOUT = dict(KIND=KIND, K=K, M=M, W=W, B=B, S=S, Q=Q, P=P, KP=KP, MP=MP, SUM=SUM, F32=F32,
              INT8=INT8, W8A8=W8A8, ROW_DIMS=ROW_DIMS, ROW_WTE=ROW_WTE, ROW_WPE=ROW_WPE,
              ROW_LNF=ROW_LNF, FIRST_LAYER_ROW=FIRST_LAYER_ROW, ROWS_PER_LAYER=ROWS_PER_LAYER,
              TILE=TILE, SI_STATE=SI_STATE, SI_ACC=SI_ACC)

cdef double GELU_C = 0.7978845608028654  # sqrt(2 / pi)


# ------------------------------------------------------------------ int8 tiles (VNNI) ----
# C, because the instruction is reached through an intrinsic: one tile of 64 outputs for
# 1 or 4 rows, 4 zmm accumulators per row kept in registers over the whole k loop.

cdef extern from *:
    """
    #include <immintrin.h>
    #include <stdint.h>
    #include <string.h>

    #if defined(__AVX512F__) && defined(__AVX512VNNI__)
    #define MINITF_HAS_VNNI 1
    /* acc[r * a_stride + o] = sum_g sum_i (xq[r * x_stride + 4g + i] + 128) * wp[256 g + 4 o + i] */
    static void minitf_int8_tile(int32_t *acc, Py_ssize_t a_stride, const int8_t *xq,
                                 Py_ssize_t x_stride, const int8_t *wp, Py_ssize_t groups,
                                 int rows) {
        __m512i a[4][4];
        for (int r = 0; r < 4; r++)
            for (int t = 0; t < 4; t++) a[r][t] = _mm512_setzero_si512();
        if (rows == 4) {
            for (Py_ssize_t g = 0; g < groups; g++) {
                const int8_t *w = wp + 256 * g;
                __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
                __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
                for (int r = 0; r < 4; r++) {
                    int32_t x4;
                    memcpy(&x4, xq + r * x_stride + 4 * g, 4);
                    __m512i x = _mm512_set1_epi32(x4 ^ (int32_t)0x80808080u);  /* + 128 */
                    a[r][0] = _mm512_dpbusd_epi32(a[r][0], x, w0);
                    a[r][1] = _mm512_dpbusd_epi32(a[r][1], x, w1);
                    a[r][2] = _mm512_dpbusd_epi32(a[r][2], x, w2);
                    a[r][3] = _mm512_dpbusd_epi32(a[r][3], x, w3);
                }
            }
        } else {
            for (Py_ssize_t g = 0; g < groups; g++) {
                const int8_t *w = wp + 256 * g;
                int32_t x4;
                memcpy(&x4, xq + 4 * g, 4);
                __m512i x = _mm512_set1_epi32(x4 ^ (int32_t)0x80808080u);
                a[0][0] = _mm512_dpbusd_epi32(a[0][0], x, _mm512_loadu_si512(w));
                a[0][1] = _mm512_dpbusd_epi32(a[0][1], x, _mm512_loadu_si512(w + 64));
                a[0][2] = _mm512_dpbusd_epi32(a[0][2], x, _mm512_loadu_si512(w + 128));
                a[0][3] = _mm512_dpbusd_epi32(a[0][3], x, _mm512_loadu_si512(w + 192));
            }
        }
        for (int r = 0; r < rows; r++)
            for (int t = 0; t < 4; t++)
                _mm512_storeu_si512(acc + r * a_stride + 16 * t, a[r][t]);
    }
    #else
    #define MINITF_HAS_VNNI 0
    /* the same sums as plain loops, for CPUs without AVX-512 VNNI */
    static void minitf_int8_tile(int32_t *acc, Py_ssize_t a_stride, const int8_t *xq,
                                 Py_ssize_t x_stride, const int8_t *wp, Py_ssize_t groups,
                                 int rows) {
        for (int r = 0; r < rows; r++)
            for (int o = 0; o < 64; o++) {
                int32_t s = 0;
                for (Py_ssize_t g = 0; g < groups; g++)
                    for (int i = 0; i < 4; i++)
                        s += ((int32_t)xq[r * x_stride + 4 * g + i] + 128)
                             * (int32_t)wp[256 * g + 4 * o + i];
                acc[r * a_stride + o] = s;
            }
    }
    #endif
    """
    int MINITF_HAS_VNNI
    void minitf_int8_tile(int32_t* acc, Py_ssize_t a_stride, const int8_t* xq,
                          Py_ssize_t x_stride, const int8_t* wp, Py_ssize_t groups,
                          int rows) noexcept nogil

HAS_VNNI = bool(MINITF_HAS_VNNI)


# ------------------------------------------- stages copied from _cython_kernels ----------
# Float-only copies of `_cython_kernels`' loops, compiled with the same flags (setup.py):
# they give the same bits, which W8A8 models need (module docstring). Keep them identical.


cdef inline float _dot(const float* a, const float* b, Py_ssize_t n) noexcept nogil:
    """_cython_kernels._dot: sum_k a[k] * b[k] in float32."""
    cdef float acc = 0
    cdef Py_ssize_t k
    for k in range(n):
        acc += a[k] * b[k]
    return acc


cdef void _matmul_row(float* y, const float* x, const float* w,
                      Py_ssize_t K, Py_ssize_t M) noexcept nogil:
    """_cython_kernels._matmul_row: y (M,) = x (K,) @ w (K, M)."""
    cdef Py_ssize_t k = 0, m
    cdef float a0, a1, a2, a3
    cdef const float* w0
    for m in range(M):
        y[m] = 0
    while k + 4 <= K:
        a0 = x[k]; a1 = x[k + 1]; a2 = x[k + 2]; a3 = x[k + 3]
        w0 = w + k * M
        for m in range(M):
            y[m] += a0 * w0[m] + a1 * w0[M + m] + a2 * w0[2 * M + m] + a3 * w0[3 * M + m]
        k += 4
    while k < K:
        a0 = x[k]
        w0 = w + k * M
        for m in range(M):
            y[m] += a0 * w0[m]
        k += 1


cdef void _layernorm(float* y, const float* x, const float* weight, const float* bias,
                     double eps, Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    """_cython_kernels._layernorm: rows of x (N, C) into y; sums in double."""
    cdef Py_ssize_t n, c
    cdef double total, mean, sq, d, rstd
    cdef const float* xr
    cdef float* yr
    for n in range(N):
        xr = x + n * C
        yr = y + n * C
        total = 0
        for c in range(C):
            total += xr[c]
        mean = total / C
        sq = 0
        for c in range(C):
            d = xr[c] - mean
            sq += d * d
        rstd = 1.0 / sqrt(sq / C + eps)  # biased variance, as torch / GPT-2
        for c in range(C):
            yr[c] = <float>((xr[c] - mean) * rstd * weight[c] + bias[c])


cdef void _gelu(float* y, const float* x, Py_ssize_t n) noexcept nogil:
    """_cython_kernels._gelu: GELU of x (n,) into y, as v / (1 + exp(-2u)) in float32."""
    cdef Py_ssize_t i
    cdef float v, u
    cdef float c2 = <float>(2.0 * GELU_C), c3 = <float>0.044715
    for i in range(n):
        v = x[i]
        u = -c2 * (v + c3 * v * v * v)
        y[i] = v / (1 + expf(u))


cdef void _attention(float* out, float* att, const float* q, const float* k, const float* v,
                     Py_ssize_t Tq, Py_ssize_t Tk, Py_ssize_t C, Py_ssize_t n_head,
                     float scale) noexcept nogil:
    """_cython_kernels._attention: causal attention, out (Tq, C), att (NH, Tq, Tk) weights."""
    cdef Py_ssize_t HS = C // n_head
    cdef Py_ssize_t h, i, j, c, last
    cdef float s, p
    cdef double mx, total
    cdef float* a
    cdef float* o
    cdef const float* qi
    cdef const float* vj
    for h in range(n_head):
        for i in range(Tq):
            last = Tk - Tq + i
            a = att + (h * Tq + i) * Tk  # (Tk,)
            qi = q + i * C + h * HS  # (HS,)
            mx = -INFINITY
            for j in range(last + 1):
                s = _dot(qi, k + j * C + h * HS, HS) * scale
                a[j] = s
                if s > mx:
                    mx = s
            total = 0
            for j in range(last + 1):
                a[j] = <float>exp(a[j] - mx)
                total += a[j]  # the rounded weights, which are what is stored
            for j in range(last + 1):
                a[j] = <float>(a[j] / total)
            for j in range(last + 1, Tk):
                a[j] = 0
            o = out + i * C + h * HS  # (HS,)
            for c in range(HS):
                o[c] = 0
            for j in range(last + 1):
                p = a[j]
                vj = v + j * C + h * HS
                for c in range(HS):
                    o[c] += p * vj[c]


# ------------------------------------------------------------------ fused stages ---------


cdef extern from *:
    """
    /* max |x[k]| as the bits of a float: for floats with the sign cleared, the integer order
       of the bits is the float order, and every NaN is above inf (0x7f800000) */
    static uint32_t minitf_absmax_bits(const float *x, Py_ssize_t n) {
        uint32_t m = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            uint32_t b;
            memcpy(&b, x + k, 4);
            b &= 0x7fffffffu;
            m = b > m ? b : m;
        }
        return m;
    }
    static float minitf_float_of_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
    """
    uint32_t minitf_absmax_bits(const float* x, Py_ssize_t n) noexcept nogil
    float minitf_float_of_bits(uint32_t b) noexcept nogil


cdef float _quantize(int8_t* xq, const float* x, Py_ssize_t K) noexcept nogil:
    """`_cython_kernels._quantize_row` bit for bit, in loops gcc vectorizes: the max of |x|
    through the integer order of its bits (exact, and a NaN shows as bits above inf's),
    then the same x / scale rounded half to even and clamped, element by element."""
    cdef uint32_t amax_bits = minitf_absmax_bits(x, K)
    cdef float scale = minitf_float_of_bits(amax_bits) / <float>127.0, r
    cdef Py_ssize_t k
    if amax_bits > 0x7f800000u or not (scale >= FLT_MIN and scale < INFINITY):
        for k in range(K):
            xq[k] = 0
        return 1.0
    for k in range(K):
        r = rintf(x[k] / scale)
        r = 127 if r > 127 else (-127 if r < -127 else r)
        xq[k] = <int8_t>r
    return scale


cdef void _matmul_int8_weight_only_row(float* y, const float* x, const int8_t* wq,
                                       const float* w_scale, const float* bias,
                                       Py_ssize_t K, Py_ssize_t M) noexcept nogil:
    """One row of `_cython_kernels.matmul_int8_weight_only`: (x @ float(wq)) * w_scale + bias."""
    cdef Py_ssize_t k = 0, m
    cdef float a0, a1, a2, a3
    cdef const int8_t* w0
    for m in range(M):
        y[m] = 0
    while k + 4 <= K:
        a0 = x[k]; a1 = x[k + 1]; a2 = x[k + 2]; a3 = x[k + 3]
        w0 = wq + k * M
        for m in range(M):
            y[m] += (a0 * <float>w0[m] + a1 * <float>w0[M + m]
                     + a2 * <float>w0[2 * M + m] + a3 * <float>w0[3 * M + m])
        k += 4
    while k < K:
        a0 = x[k]
        w0 = wq + k * M
        for m in range(M):
            y[m] += a0 * <float>w0[m]
        k += 1
    for m in range(M):
        y[m] = y[m] * w_scale[m]  # the channel scale, once per output
    for m in range(M):
        y[m] += bias[m]


cdef void _w8a8_epilogue(float* y, const int32_t* acc, const int32_t* wsum, float s,
                         const float* w_scale, const float* bias, Py_ssize_t M) noexcept nogil:
    """y = (float32(acc - 128 wsum) * s) * w_scale + bias, in the loops (and so the rounding)
    of `_cython_kernels.matmul_w8a8`."""
    cdef Py_ssize_t m
    for m in range(M):
        y[m] = <float>(acc[m] - 128 * wsum[m]) * s
    for m in range(M):
        y[m] = y[m] * w_scale[m]
    for m in range(M):
        y[m] += bias[m]


cdef void _linear_w8a8_row(float* y, int8_t* xq, int32_t* acc, const float* x,
                           const int8_t* wp, const int32_t* wsum, const float* w_scale,
                           const float* bias, Py_ssize_t K, Py_ssize_t M,
                           Py_ssize_t Mp) noexcept nogil:
    """One row of `_cython_kernels.matmul_w8a8` (bit-identical): quantize x (K,), int32 sums
    on the tiled weights wp, then both scales. Scratch xq (>= Kp,), acc (>= Mp,)."""
    cdef Py_ssize_t groups = (K + 3) // 4, tile
    cdef float s = _quantize(xq, x, K)
    for tile in range(Mp // TILE):
        minitf_int8_tile(acc + tile * TILE, 0, xq, 0, wp + tile * groups * 4 * TILE, groups, 1)
    _w8a8_epilogue(y, acc, wsum, s, w_scale, bias, M)


cdef void _linear_row(float* y, const float* x, const float* pf, const int8_t* pq,
                      const int32_t* pi, const int64_t* row, int8_t* xq,
                      int32_t* acc) noexcept nogil:
    """y (M,) = the linear layer of table row `row` applied to x (K,), by its kind."""
    cdef Py_ssize_t Kn = row[K], Mn = row[M], m
    if row[KIND] == F32:  # _cython_kernels.matmul_f32 for one row, bit for bit
        _matmul_row(y, x, pf + row[W], Kn, Mn)
        for m in range(Mn):
            y[m] += pf[row[B] + m]
    elif row[KIND] == INT8:
        _matmul_int8_weight_only_row(y, x, pq + row[Q], pf + row[S], pf + row[B], Kn, Mn)
    else:
        _linear_w8a8_row(y, xq, acc, x, pq + row[P], pi + row[SUM], pf + row[S], pf + row[B],
                         Kn, Mn, row[MP])


# float32 exp, vectorizable (libm's expf is a call per element): Cephes' expf, as in
# numba_fused. x = k ln 2 + r with |r| <= ln(2) / 2, exp(r) by a degree-7 polynomial
# (~1 ulp), 2^k from its IEEE exponent bits. Arguments are clamped to [-87, 88]: never inf,
# and at least 1.6e-38 where the reference underflows to 0 (invisible in softmax and GELU).

cdef extern from *:
    """
    #include <string.h>
    static inline float minitf_exp2i(int32_t k) {  /* 2^k as a float, -126 <= k <= 127 */
        int32_t bits = (k + 127) << 23;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    """
    float minitf_exp2i(int32_t k) noexcept nogil


cdef void _exp_into(float* y, const float* x, float shift, Py_ssize_t n) noexcept nogil:
    """y[i] = exp(x[i] - shift) for i < n, float32, within 2 ulp of expf; y may be x."""
    cdef Py_ssize_t i
    cdef float v, k, r, p
    cdef int32_t ki
    for i in range(n):
        v = x[i] - shift
        v = -87.0 if v < -87.0 else (88.0 if v > 88.0 else v)
        ki = <int32_t>(v * <float>1.44269504088896341 + <float>128.5) - 128  # floor(v log2 e + 1/2)
        k = <float>ki
        r = v - k * <float>0.693359375 - k * <float>-2.12194440e-4  # ln 2 in two parts
        p = (((((<float>1.9875691500e-4 * r + <float>1.3981999507e-3) * r + <float>8.3334519073e-3) * r
               + <float>4.1665795894e-2) * r + <float>1.6666665459e-1) * r + <float>5.0000001201e-1)
        y[i] = (p * r * r + r + 1) * minitf_exp2i(ki)


cdef void _gelu_fast(float* y, const float* x, Py_ssize_t n) noexcept nogil:
    """GPT-2's GELU as `_cython_kernels._gelu` computes it, v / (1 + exp(-2u)), with the
    vectorized exp: `numpy_ref.gelu` within TOL[("kernel", float32)]."""
    cdef Py_ssize_t i
    cdef float v
    cdef float c2 = <float>(2.0 * GELU_C), c3 = <float>0.044715
    for i in range(n):
        v = x[i]
        y[i] = -c2 * (v + c3 * v * v * v)  # -2u
    _exp_into(y, y, 0, n)
    for i in range(n):
        y[i] = x[i] / (1 + y[i])


cdef void _attention_t(float* out, float* s, double* s64, const float* q, const float* kT,
                       const float* vT, Py_ssize_t Tk, Py_ssize_t Bp, Py_ssize_t C,
                       Py_ssize_t n_head, float scale) noexcept nogil:
    """One query against the first Tk keys of a transposed cache (numba_fused._attention_t).

    `numpy_ref.attention` for the last query row within TOL[("kernel_attention", float32)].
    out (C,); scratch s (NH, Bp), s64 (Bp,); q (C,); kT, vT (C, Bp): key/value j in column
    j. Scores and weighted sums run along the keys, the contiguous axis, so they vectorize
    whatever the head size; keys are padded to a multiple of 16 with weight 0. Scores are
    summed in double: summed channel by channel in float they would round more than the
    unfused kernel's dot products (2e-5 in the logits of a trained model).
    """
    cdef Py_ssize_t HS = C // n_head
    cdef Py_ssize_t Tp = (Tk + 15) // 16 * 16
    cdef Py_ssize_t h, j, c, c1
    cdef double q0, q1, q2, q3
    cdef float mx, total, acc
    cdef float* sh
    cdef const float* k0
    cdef const float* vc
    if Tp > Bp:
        Tp = Bp
    for h in range(n_head):
        for j in range(Tp):
            s64[j] = 0
        c = h * HS
        c1 = c + HS
        while c + 4 <= c1:  # scores = q_h @ K_h^T, 4 channels per pass
            q0 = q[c]; q1 = q[c + 1]; q2 = q[c + 2]; q3 = q[c + 3]
            k0 = kT + c * Bp
            for j in range(Tp):
                s64[j] += q0 * k0[j] + q1 * k0[Bp + j] + q2 * k0[2 * Bp + j] + q3 * k0[3 * Bp + j]
            c += 4
        while c < c1:
            q0 = q[c]
            k0 = kT + c * Bp
            for j in range(Tp):
                s64[j] += q0 * k0[j]
            c += 1
        sh = s + h * Bp
        for j in range(Tp):
            sh[j] = <float>s64[j] * scale  # as the unfused kernel: dot, then scale
        mx = sh[0]
        for j in range(1, Tk):
            if sh[j] > mx:
                mx = sh[j]
        _exp_into(sh, sh, mx, Tk)  # softmax over the Tk real keys
        total = 0
        for j in range(Tk):
            total += sh[j]
        for j in range(Tk):
            sh[j] = sh[j] / total
        for j in range(Tk, Tp):
            sh[j] = 0  # padding keys weigh nothing
        for c in range(h * HS, c1):  # out_h = p @ V_h
            vc = vT + c * Bp
            acc = 0
            for j in range(Tp):
                acc += sh[j] * vc[j]
            out[c] = acc


cdef void _head(float* logits, const float* x, const float* wte, Py_ssize_t V,
                Py_ssize_t C) noexcept nogil:
    """logits (V,) = x (C,) @ wte (V, C).T, the tied head (`_cython_kernels.matmul_nt_f32`)."""
    cdef Py_ssize_t v
    for v in range(V):
        logits[v] = _dot(x, wte + v * C, C)


# ------------------------------------------------------------------------ decode ---------


cdef void _decode_step(float* logits, float* sf, int32_t* si, float* k_cache, float* v_cache,
                       float* kvT, const float* pf, const int8_t* pq, const int32_t* pi,
                       const int64_t* tab, Py_ssize_t token, Py_ssize_t pos, double eps,
                       bint exact) noexcept nogil:
    """Logits (V,) of `token` at `pos`: the engine's unfused `_forward` over one token.
    Buffers and layout: numba_fused.decode_step."""
    cdef const int64_t* dims = tab + ROW_DIMS * NCOL
    cdef Py_ssize_t L = dims[0], C = dims[1], NH = dims[2], V = dims[3], Bk = dims[4], FF = dims[5]
    cdef Py_ssize_t Bp = dims[8], Tk = pos + 1, l, c, t, synced
    cdef float* x = sf
    cdef float* h = sf + C
    cdef float* a = sf + 2 * C
    cdef float* qkv = sf + 3 * C
    cdef float* f = sf + 6 * C
    cdef float* g = sf + 6 * C + FF
    cdef float* att = sf + 6 * C + 2 * FF
    cdef double* s64 = <double*>(sf + 6 * C + 2 * FF + NH * Bp)
    cdef int32_t* acc = si + SI_ACC
    cdef int8_t* xq = <int8_t*>(si + dims[9])
    cdef const float* wte = pf + tab[ROW_WTE * NCOL + W]
    cdef const float* wpe = pf + tab[ROW_WPE * NCOL + W]
    cdef float scale = <float>(1.0 / sqrt(<double>(C // NH)))  # as cython_kernels.attention
    cdef const int64_t* r
    cdef float* kc
    cdef float* vc
    cdef float* kT
    cdef float* vT
    synced = si[SI_STATE] if si[SI_STATE] < pos else pos
    for c in range(C):  # embedding: token and position
        x[c] = wte[token * C + c] + wpe[pos * C + c]
    for l in range(L):
        r = tab + (FIRST_LAYER_ROW + l * ROWS_PER_LAYER) * NCOL
        _layernorm(h, x, pf + r[LN_1 * NCOL + W], pf + r[LN_1 * NCOL + B], eps, 1, C)
        _linear_row(qkv, h, pf, pq, pi, r + C_ATTN * NCOL, xq, acc)
        kc = k_cache + l * Bk * C
        vc = v_cache + l * Bk * C
        for c in range(C):  # append this step's key and value to the cache
            kc[pos * C + c] = qkv[C + c]
            vc[pos * C + c] = qkv[2 * C + c]
        if exact:
            _attention(h, att, qkv, kc, vc, 1, Tk, C, NH, scale)
        else:
            kT = kvT + l * C * Bp
            vT = kvT + (L + l) * C * Bp
            for t in range(synced, Tk):  # positions the transposed cache does not have yet
                for c in range(C):
                    kT[c * Bp + t] = kc[t * C + c]
                    vT[c * Bp + t] = vc[t * C + c]
            _attention_t(h, att, s64, qkv, kT, vT, Tk, Bp, C, NH, scale)
        _linear_row(a, h, pf, pq, pi, r + ATTN_PROJ * NCOL, xq, acc)
        for c in range(C):
            x[c] = x[c] + a[c]  # residual
        _layernorm(h, x, pf + r[LN_2 * NCOL + W], pf + r[LN_2 * NCOL + B], eps, 1, C)
        _linear_row(f, h, pf, pq, pi, r + C_FC * NCOL, xq, acc)
        if exact:
            _gelu(g, f, FF)
        else:
            _gelu_fast(g, f, FF)
        _linear_row(a, g, pf, pq, pi, r + MLP_PROJ * NCOL, xq, acc)
        for c in range(C):
            x[c] = x[c] + a[c]  # residual
    if not exact:
        si[SI_STATE] = Tk
    r = tab + ROW_LNF * NCOL
    _layernorm(h, x, pf + r[W], pf + r[B], eps, 1, C)
    _head(logits, h, wte, V, C)


cdef class Decoder:
    """One decode step per `step(token, pos)` call, on arrays bound once.

    Arguments as numba_fused.decode_step's (all C-contiguous; this object keeps them alive):
    logits (V,) out; scratch sf float32, si int32; k_cache, v_cache (n_layer, block_size,
    d_model); kvT (2, n_layer, d_model, Bp); pf, pq, pi, tab the packed weights; eps;
    exact: a W8A8 model, every stage bit for bit as the unfused path.
    """

    cdef object _keep
    cdef float* logits
    cdef float* sf
    cdef int32_t* si
    cdef float* k_cache
    cdef float* v_cache
    cdef float* kvT
    cdef const float* pf
    cdef const int8_t* pq
    cdef const int32_t* pi
    cdef const int64_t* tab
    cdef double eps
    cdef bint exact
    cdef Py_ssize_t block_size

    def __init__(self, float[::1] logits, float[::1] sf, int32_t[::1] si,
                 float[:, :, ::1] k_cache, float[:, :, ::1] v_cache, float[:, :, :, ::1] kvT,
                 const float[::1] pf, const int8_t[::1] pq, const int32_t[::1] pi,
                 const int64_t[:, ::1] tab, double eps, bint exact):
        self._keep = (logits, sf, si, k_cache, v_cache, kvT, pf, pq, pi, tab)
        self.logits, self.sf, self.si = &logits[0], &sf[0], &si[0]
        self.k_cache, self.v_cache = &k_cache[0, 0, 0], &v_cache[0, 0, 0]
        self.kvT = &kvT[0, 0, 0, 0] if kvT.shape[3] else NULL
        self.pf = &pf[0]
        self.pq = &pq[0] if pq.shape[0] else NULL
        self.pi = &pi[0] if pi.shape[0] else NULL
        self.tab = &tab[0, 0]
        self.eps, self.exact, self.block_size = eps, exact, k_cache.shape[1]

    def step(self, Py_ssize_t token, Py_ssize_t pos):
        """Run token (checked by the engine) at position pos < block_size; fills logits."""
        if not 0 <= pos < self.block_size:
            raise ValueError(f"pos={pos} is outside the cache (block_size {self.block_size})")
        with nogil:
            _decode_step(self.logits, self.sf, self.si, self.k_cache, self.v_cache, self.kvT,
                         self.pf, self.pq, self.pi, self.tab, token, pos, self.eps, self.exact)


# ------------------------------------------------------------------------ prefill --------
# Called by the engine's prefill (FusedPath.prefill) once per layer operation on T rows.
# layernorm_rows, matmul_rows, matmul_int8_rows, attention_rows, gelu_rows and head_rows
# (imported above) are the unfused backend's entry points themselves.


def linear_w8a8_rows(float[:, ::1] y, int8_t[:, ::1] xq, float[::1] sx, int32_t[::1] acc,
                     const float[:, ::1] x, const int8_t[::1] wp, const int32_t[::1] wsum,
                     const float[::1] w_scale, const float[::1] bias):
    """`_cython_kernels.matmul_w8a8` for N rows (bit-identical), 4 rows per weight pass.

    Outputs y (N, M); scratch xq (N, Kp) int8, sx (N,), acc (>= 4 Mp,) int32; inputs x (N, K),
    tiled weights wp, wsum (Mp,) column sums, w_scale (M,), bias (M,).
    """
    cdef Py_ssize_t N = x.shape[0], Kn = x.shape[1], Mn = y.shape[1]
    cdef Py_ssize_t Kp = xq.shape[1], Mp = wsum.shape[0], groups = Kp // 4
    cdef Py_ssize_t n = 0, r, tile
    cdef int rows
    with nogil:
        for r in range(N):
            sx[r] = _quantize(&xq[r, 0], &x[r, 0], Kn)
        while n < N:
            rows = 4 if n + 4 <= N else 1
            for tile in range(Mp // TILE):
                minitf_int8_tile(&acc[tile * TILE], Mp, &xq[n, 0], Kp,
                                 &wp[tile * groups * 4 * TILE], groups, rows)
            for r in range(rows):
                _w8a8_epilogue(&y[n + r, 0], &acc[r * Mp], &wsum[0], sx[n + r], &w_scale[0],
                               &bias[0], Mn)
            n += rows


def causal_softmax_rows(float[:, ::1] att, float scale, int32_t[::1] si):
    """In place, row i of att (T, T) becomes softmax(scale * att[i, :i+1]) followed by zeros
    (numba_fused.causal_softmax_rows). si: unused (numba's exp scratch)."""
    cdef Py_ssize_t T = att.shape[0], i, j
    cdef float mx, total
    cdef float* row
    with nogil:
        for i in range(T):
            row = &att[i, 0]
            for j in range(i + 1):
                row[j] *= scale
            mx = row[0]
            for j in range(1, i + 1):
                if row[j] > mx:
                    mx = row[j]
            _exp_into(row, row, mx, i + 1)
            total = 0
            for j in range(i + 1):
                total += row[j]
            for j in range(i + 1):
                row[j] = row[j] / total
            for j in range(i + 1, T):
                row[j] = 0


def gelu_fast_rows(float[:, ::1] y, const float[:, ::1] x, int32_t[::1] si):
    """GELU of x (T, FF) into y with the vectorized exp (`_gelu_fast`); si: unused."""
    with nogil:
        _gelu_fast(&y[0, 0], &x[0, 0], x.shape[0] * x.shape[1])


def head(float[::1] logits, const float[::1] x, const float[:, ::1] wte):
    """logits (V,) = x (C,) @ wte (V, C).T: one row of the tied head."""
    with nogil:
        _head(&logits[0], &x[0], &wte[0, 0], wte.shape[0], wte.shape[1])


# For tests/test_fused.py: the copied loops, run alone, to compare bit for bit with the
# `_cython_kernels` entry points they copy (so that a change there cannot go unnoticed).


def _copied_attention(float[:, ::1] out, float[:, :, ::1] att, const float[:, ::1] q,
                      const float[:, ::1] k, const float[:, ::1] v, Py_ssize_t n_head,
                      float scale):
    _attention(&out[0, 0], &att[0, 0, 0], &q[0, 0], &k[0, 0], &v[0, 0], q.shape[0],
               k.shape[0], q.shape[1], n_head, scale)


def _copied_gelu(float[::1] y, const float[::1] x):
    _gelu(&y[0], &x[0], x.shape[0])


def _copied_layernorm(float[:, ::1] y, const float[:, ::1] x, const float[::1] weight,
                      const float[::1] bias, double eps):
    _layernorm(&y[0, 0], &x[0, 0], &weight[0], &bias[0], eps, x.shape[0], x.shape[1])


def _copied_matmul_row(float[::1] y, const float[::1] x, const float[:, ::1] w):
    _matmul_row(&y[0], &x[0], &w[0, 0], w.shape[0], w.shape[1])


def _vectorized_quantize(int8_t[::1] xq, const float[::1] x):
    return _quantize(&xq[0], &x[0], x.shape[0])
