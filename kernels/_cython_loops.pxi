# The Cython backend's loops, written once: `cdef inline` functions on raw pointers.
#
# Both Cython modules `include` this file: `_cython_kernels` (the unfused backend, through
# its entry points) and `_cython_fused` (the decode step and the prefill stages), under the
# compiler directives of their headers. (An include rather than a .pxd: kernels/ installs
# as minitf.kernels, so Cython, which finds a .pxd by its package path, cannot find one
# here.) Compiled into both with the same flags (setup.py), a stage of the fused path
# rounds exactly as the unfused kernel does, which W8A8 models need (a 1-ulp difference
# before a run-time quantization can flip an int8 activation).
#
# Pointers address C-contiguous arrays, outputs first, then inputs, weights and sizes; no
# loop checks anything (the wrappers did) and all run without the GIL. Matmul loops run k
# outside m so that the innermost loop walks a (K, M) weight row and an output row
# contiguously and gcc vectorizes it; k is unrolled by 4 (and rows taken 4 at a time) so
# each output element is loaded and stored once per 4 products. Sums of floats are
# reassociated by the compiler (setup.py: -fassociative-math), as numba's fastmath does;
# int8 products are widened to int32 before they are summed, so those sums are exact.

from libc.float cimport FLT_MIN
from libc.math cimport INFINITY, exp, expf, rintf, sqrt
from libc.stdint cimport int8_t, int32_t, uint32_t

ctypedef fused real:
    float
    double

# rows of w per pass of `_matmul_nt` (64 x C floats: 192 KB at d_model 768, in L2)
cdef Py_ssize_t NT_CHUNK = 64

cdef extern from *:
    """
    #include <string.h>
    #define MINITF_GELU_C 0.7978845608028654  /* sqrt(2 / pi) */
    /* max |x[k]| as the bits of a float: for floats with the sign cleared, the integer order
       of the bits is the float order, and every NaN is above inf (0x7f800000) */
    static inline uint32_t minitf_absmax_bits(const float *x, Py_ssize_t n) {
        uint32_t m = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            uint32_t b;
            memcpy(&b, x + k, 4);
            b &= 0x7fffffffu;
            m = b > m ? b : m;
        }
        return m;
    }
    static inline float minitf_float_of_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
    """
    const double GELU_C "MINITF_GELU_C"
    uint32_t minitf_absmax_bits(const float* x, Py_ssize_t n) noexcept nogil
    float minitf_float_of_bits(uint32_t b) noexcept nogil


# ------------------------------------------------------------------------ float matmuls --


cdef inline real _dot(const real* a, const real* b, Py_ssize_t n) noexcept nogil:
    """sum_k a[k] * b[k], summed in the dtype of the arrays."""
    cdef real acc = 0
    cdef Py_ssize_t k
    for k in range(n):
        acc += a[k] * b[k]
    return acc


cdef inline void _dot4(real* y, const real* x, const real* w, Py_ssize_t K) noexcept nogil:
    """y[j] = sum_k x[k] * w[j * K + k] for the four rows j < 4 of w (4, K): x loaded once
    for four sums, each vectorized into lanes as `_dot`'s."""
    cdef real s0 = 0, s1 = 0, s2 = 0, s3 = 0, a
    cdef Py_ssize_t k
    for k in range(K):
        a = x[k]
        s0 += a * w[k]
        s1 += a * w[K + k]
        s2 += a * w[2 * K + k]
        s3 += a * w[3 * K + k]
    y[0] = s0; y[1] = s1; y[2] = s2; y[3] = s3


cdef inline void _matmul_row(real* y, const real* x, const real* w,
                             Py_ssize_t K, Py_ssize_t M) noexcept nogil:
    """y (M,) = x (K,) @ w (K, M)."""
    cdef Py_ssize_t k = 0, m
    cdef real a0, a1, a2, a3
    cdef const real* w0
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


cdef inline void _matmul_4rows(real* y, const real* x, const real* w,
                               Py_ssize_t K, Py_ssize_t M) noexcept nogil:
    """y[0:4] (4, M) = x[0:4] (4, K) @ w (K, M): each weight loaded once for 4 rows x 4 k.

    Rows are addressed from one base pointer each for y and w (y[r*M + m], w[(k+i)*M + m]):
    with a pointer per row gcc gives up on the alias checks and does not vectorize.
    """
    cdef Py_ssize_t k = 0, m
    cdef Py_ssize_t M2 = 2 * M, M3 = 3 * M
    cdef const real* wk
    cdef real b0, b1, b2, b3
    cdef real a00, a01, a02, a03, a10, a11, a12, a13
    cdef real a20, a21, a22, a23, a30, a31, a32, a33
    for m in range(4 * M):
        y[m] = 0
    while k + 4 <= K:
        wk = w + k * M
        # in locals: the compiler cannot prove that the stores to y leave x unchanged
        a00 = x[k]; a01 = x[k + 1]; a02 = x[k + 2]; a03 = x[k + 3]
        a10 = x[K + k]; a11 = x[K + k + 1]; a12 = x[K + k + 2]; a13 = x[K + k + 3]
        a20 = x[2 * K + k]; a21 = x[2 * K + k + 1]; a22 = x[2 * K + k + 2]; a23 = x[2 * K + k + 3]
        a30 = x[3 * K + k]; a31 = x[3 * K + k + 1]; a32 = x[3 * K + k + 2]; a33 = x[3 * K + k + 3]
        for m in range(M):
            b0 = wk[m]; b1 = wk[M + m]; b2 = wk[M2 + m]; b3 = wk[M3 + m]
            y[m] += a00 * b0 + a01 * b1 + a02 * b2 + a03 * b3
            y[M + m] += a10 * b0 + a11 * b1 + a12 * b2 + a13 * b3
            y[M2 + m] += a20 * b0 + a21 * b1 + a22 * b2 + a23 * b3
            y[M3 + m] += a30 * b0 + a31 * b1 + a32 * b2 + a33 * b3
        k += 4
    while k < K:
        wk = w + k * M
        a00 = x[k]; a10 = x[K + k]; a20 = x[2 * K + k]; a30 = x[3 * K + k]
        for m in range(M):
            y[m] += a00 * wk[m]
            y[M + m] += a10 * wk[m]
            y[M2 + m] += a20 * wk[m]
            y[M3 + m] += a30 * wk[m]
        k += 1


cdef inline void _matmul(real* y, const real* x, const real* w, const real* bias,
                         Py_ssize_t N, Py_ssize_t K, Py_ssize_t M) noexcept nogil:
    """y (N, M) = x (N, K) @ w (K, M) (+ bias (M,) unless NULL)."""
    cdef Py_ssize_t n = 0, m
    while n + 4 <= N:
        _matmul_4rows(y + n * M, x + n * K, w, K, M)
        n += 4
    while n < N:
        _matmul_row(y + n * M, x + n * K, w, K, M)
        n += 1
    if bias != NULL:
        for n in range(N):
            for m in range(M):
                y[n * M + m] += bias[m]


cdef inline void _matmul_nt(real* y, const real* x, const real* w,
                            Py_ssize_t N, Py_ssize_t K, Py_ssize_t M) noexcept nogil:
    """y (N, M) = x (N, K) @ w.T, w (M, K); each output a contiguous dot product.

    NT_CHUNK rows of w at a time for every row of x: a w larger than the caches (the tied
    head, V x C) is read from memory once, not N times. Within a chunk four rows of w per
    pass (`_dot4`), then the last ones one at a time (`_dot`), as
    numba_kernels._matmul_nt_row does (measured there); an output's sum depends only on
    where its group of four starts (a multiple of 4 from the chunk's start).
    """
    cdef Py_ssize_t n, m, m0 = 0, m1
    while m0 < M:
        m1 = m0 + NT_CHUNK if m0 + NT_CHUNK < M else M
        for n in range(N):
            m = m0
            while m + 4 <= m1:
                _dot4(y + n * M + m, x + n * K, w + m * K, K)
                m += 4
            while m < m1:
                y[n * M + m] = _dot(x + n * K, w + m * K, K)
                m += 1
        m0 = m1


# -------------------------------------------------------------------------------- int8 --


cdef inline float _quantize_row(int8_t* xq, const float* x, Py_ssize_t K) noexcept nogil:
    """Quantize one row x (K,) into xq (K,) int8; return its scale (1 for a rejected row).

    `numpy_ref.quantize_rows` bit for bit, in loops gcc vectorizes: the max of |x| through
    the integer order of its bits (exact, and a NaN shows as bits above inf's), then each
    element x / scale rounded half to even (the default rounding mode) and clamped.
    """
    cdef uint32_t amax_bits = minitf_absmax_bits(x, K)
    cdef float scale = minitf_float_of_bits(amax_bits) / <float>127.0, r
    cdef Py_ssize_t k
    if amax_bits > 0x7f800000u or not (scale >= FLT_MIN and scale < INFINITY):
        for k in range(K):  # NaN, zero, subnormal or inf: rejected
            xq[k] = 0
        return 1.0
    for k in range(K):
        r = rintf(x[k] / scale)
        r = 127 if r > 127 else (-127 if r < -127 else r)
        xq[k] = <int8_t>r
    return scale


cdef inline void _int8_acc_row(int32_t* acc, const int8_t* xq, const int8_t* wq,
                               Py_ssize_t K, Py_ssize_t M) noexcept nogil:
    """acc (M,) int32 = xq (K,) @ wq (K, M), every int8 product widened to int32."""
    cdef Py_ssize_t k = 0, m
    cdef int32_t a0, a1, a2, a3
    cdef const int8_t* w0
    for m in range(M):
        acc[m] = 0
    while k + 4 <= K:
        a0 = xq[k]; a1 = xq[k + 1]; a2 = xq[k + 2]; a3 = xq[k + 3]
        w0 = wq + k * M
        for m in range(M):
            acc[m] += (a0 * <int32_t>w0[m] + a1 * <int32_t>w0[M + m]
                       + a2 * <int32_t>w0[2 * M + m] + a3 * <int32_t>w0[3 * M + m])
        k += 4
    while k < K:
        a0 = xq[k]
        w0 = wq + k * M
        for m in range(M):
            acc[m] += a0 * <int32_t>w0[m]
        k += 1


cdef inline void _matmul_int8_row(float* y, const float* x, const int8_t* wq,
                                  const float* w_scale, const float* bias,
                                  Py_ssize_t K, Py_ssize_t M) noexcept nogil:
    """y (M,) = (x (K,) @ float32(wq (K, M))) * w_scale (M,) (+ bias (M,) unless NULL).

    The float twin of `_int8_acc_row`: int8 weights times float activations (float sums
    that the compiler reassociates, where the int8 sums above are exact)."""
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
    if bias != NULL:
        for m in range(M):
            y[m] += bias[m]


cdef inline void _w8a8_epilogue(float* y, const int32_t* acc, float s, const float* w_scale,
                                const float* bias, Py_ssize_t M) noexcept nogil:
    """y (M,) = (float32(acc) * s) * w_scale (+ bias unless NULL): the float end of a W8A8
    row. Three loops: a compiler allowed to reassociate would otherwise compute
    acc * (s * w_scale), which rounds differently from `numpy_ref.matmul_int8`."""
    cdef Py_ssize_t m
    for m in range(M):
        y[m] = <float>acc[m] * s
    for m in range(M):
        y[m] = y[m] * w_scale[m]
    if bias != NULL:
        for m in range(M):
            y[m] += bias[m]


cdef inline void _matmul_nt_int8(float* y, const float* x, const int8_t* wq,
                                 const float* w_scale, Py_ssize_t N, Py_ssize_t K,
                                 Py_ssize_t M, Py_ssize_t ystride) noexcept nogil:
    """y (N, M, rows ystride apart) = (x (N, K) @ float32(wq (M, K)).T) * w_scale (M,): the
    weight-only int8 head. NT_CHUNK rows of wq at a time for every row of x (`_matmul_nt`),
    each output one contiguous dot product of x with an int8 row, then its row's scale."""
    cdef Py_ssize_t n, m, k, m0 = 0, m1
    cdef float s0
    cdef const int8_t* w0
    cdef const float* xn
    while m0 < M:
        m1 = m0 + NT_CHUNK if m0 + NT_CHUNK < M else M
        for n in range(N):
            xn = x + n * K
            for m in range(m0, m1):
                w0 = wq + m * K
                s0 = 0
                for k in range(K):
                    s0 += xn[k] * <float>w0[k]
                y[n * ystride + m] = s0 * w_scale[m]
        m0 = m1


cdef inline void _int8_dot_rows(int32_t* acc, const int8_t* xq, const int8_t* wq,
                                Py_ssize_t K, Py_ssize_t M) noexcept nogil:
    """acc (M,) int32 = wq (M, K) int8 @ xq (K,) int8: a contiguous exact dot per row."""
    cdef Py_ssize_t m, k
    cdef int32_t s0
    cdef const int8_t* w0
    for m in range(M):
        w0 = wq + m * K
        s0 = 0
        for k in range(K):
            s0 += <int32_t>xq[k] * <int32_t>w0[k]
        acc[m] = s0


# ------------------------------------------------------------ softmax, LayerNorm, GELU --


cdef inline void _softmax(real* y, const real* x, Py_ssize_t N, Py_ssize_t M) noexcept nogil:
    """Row softmax of x (N, M) into y; an all -inf row gives zeros. Sums in double."""
    cdef Py_ssize_t n, m
    cdef real mx, e
    cdef double total
    cdef const real* xr
    cdef real* yr
    for n in range(N):
        xr = x + n * M
        yr = y + n * M
        mx = xr[0]
        for m in range(1, M):
            if xr[m] > mx:
                mx = xr[m]
        if mx == -INFINITY:  # nothing to attend to: exp(-inf) would be 0 everywhere
            for m in range(M):
                yr[m] = 0
            continue
        total = 0
        for m in range(M):
            if real is float:
                e = expf(xr[m] - mx)
            else:
                e = exp(xr[m] - mx)
            yr[m] = e
            total += e
        for m in range(M):
            yr[m] = <real>(yr[m] / total)


cdef inline void _layernorm(real* y, const real* x, const real* weight, const real* bias,
                            double eps, Py_ssize_t N, Py_ssize_t C) noexcept nogil:
    """LayerNorm of each row of x (N, C) into y; mean and variance summed in double."""
    cdef Py_ssize_t n, c
    cdef double total, mean, sq, d, rstd
    cdef const real* xr
    cdef real* yr
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
            yr[c] = <real>((xr[c] - mean) * rstd * weight[c] + bias[c])


cdef inline void _gelu(real* y, const real* x, Py_ssize_t n) noexcept nogil:
    """Tanh-approximated GELU of the flat array x (n,) into y, in x's precision.

    0.5 v (1 + tanh(u)) is evaluated as v / (1 + exp(-2u)), the same function
    (0.5 (1 + tanh u) = sigmoid(2u)): exp is several times faster than tanh, and for
    negative v the sigmoid form has no cancellation in 1 + tanh(u) ~ 0.
    """
    cdef Py_ssize_t i
    cdef real v, u
    cdef real c2 = <real>(2.0 * GELU_C), c3 = <real>0.044715
    for i in range(n):
        v = x[i]
        u = -c2 * (v + c3 * v * v * v)
        if real is float:
            y[i] = v / (1 + expf(u))
        else:
            y[i] = v / (1 + exp(u))


# --------------------------------------------------------------------------- attention --


cdef inline void _attention(real* out, real* att, const real* q, const real* k, const real* v,
                            Py_ssize_t Tq, Py_ssize_t Tk, Py_ssize_t C, Py_ssize_t n_head,
                            real scale) noexcept nogil:
    """Causal attention: out (Tq, C), att (NH, Tq, Tk) weights; q (Tq, C), k, v (Tk, C).

    Query i sits at absolute position Tk - Tq + i and sees keys 0 .. that position.
    """
    cdef Py_ssize_t HS = C // n_head
    cdef Py_ssize_t h, i, j, c, last
    cdef real s, p
    cdef double mx, total
    cdef real* a
    cdef real* o
    cdef const real* qi
    cdef const real* vj
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
                a[j] = <real>exp(a[j] - mx)
                total += a[j]  # the rounded weights, which are what is stored
            for j in range(last + 1):
                a[j] = <real>(a[j] / total)
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


# ------------------------------------------------------------------ float32 exp ----


# float32 exp, vectorizable (libm's expf is a call per element): Cephes' expf, as in
# numba_fused; the fused path's fast stages and the training kernels use it. x = k ln 2 + r
# with |r| <= ln(2) / 2, exp(r) by a degree-7 polynomial (~1 ulp), 2^k from its IEEE
# exponent bits. Arguments are clamped to [-87, 88]: never inf,
# and at least 1.6e-38 where the reference underflows to 0 (invisible in softmax and GELU).

cdef extern from *:
    """
    static inline float minitf_exp2i(int32_t k) {  /* 2^k as a float, -126 <= k <= 127 */
        int32_t bits = (k + 127) << 23;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    """
    float minitf_exp2i(int32_t k) noexcept nogil


cdef inline void _exp_into(float* y, const float* x, float shift, Py_ssize_t n) noexcept nogil:
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
