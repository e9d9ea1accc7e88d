# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""The Cython backend's entry points (private: `cython_kernels.CythonLoops` calls them, and
`backend.Backend` is the checked public API).

Each `def` takes C-contiguous typed memoryviews, outputs first, then inputs, weights and
sizes; it does no checking (the wrapper did) and runs its loop without the GIL. The loops
themselves are `_cython_loops.pxi`'s, shared with the fused path. Entry points come in a
`_f32` and a `_f64` version where both dtypes are supported, so the caller picks one by
dtype instead of paying for Cython's fused-type dispatch on every call.
"""

include "_cython_loops.pxi"  # the loops, shared with _cython_fused


# ------------------------------------------------------------------- entry points -------
# Shapes come from the memoryviews; `&a[0, 0]` is only an address, valid for empty arrays.


def matmul_f32(float[:, ::1] y, const float[:, ::1] x, const float[:, ::1] w,
               const float[::1] bias):
    """y (N, M) = x (N, K) @ w (K, M) + bias (M,) or None; float32."""
    cdef const float* b = &bias[0] if bias is not None else NULL
    with nogil:
        _matmul(&y[0, 0], &x[0, 0], &w[0, 0], b, x.shape[0], x.shape[1], w.shape[1])


def matmul_f64(double[:, ::1] y, const double[:, ::1] x, const double[:, ::1] w,
               const double[::1] bias):
    """y (N, M) = x (N, K) @ w (K, M) + bias (M,) or None; float64."""
    cdef const double* b = &bias[0] if bias is not None else NULL
    with nogil:
        _matmul(&y[0, 0], &x[0, 0], &w[0, 0], b, x.shape[0], x.shape[1], w.shape[1])


def matmul_nt_f32(float[:, ::1] y, const float[:, ::1] x, const float[:, ::1] w):
    """y (N, M) = x (N, K) @ w.T, w (M, K); float32."""
    with nogil:
        _matmul_nt(&y[0, 0], &x[0, 0], &w[0, 0], x.shape[0], x.shape[1], w.shape[0])


def matmul_nt_f64(double[:, ::1] y, const double[:, ::1] x, const double[:, ::1] w):
    """y (N, M) = x (N, K) @ w.T, w (M, K); float64."""
    with nogil:
        _matmul_nt(&y[0, 0], &x[0, 0], &w[0, 0], x.shape[0], x.shape[1], w.shape[0])


def quantize_rows(int8_t[:, ::1] xq, float[::1] scale, const float[:, ::1] x):
    """xq (N, K) int8 and scale (N,) float32 from x (N, K) float32, row by row."""
    cdef Py_ssize_t n, K = x.shape[1]
    with nogil:
        for n in range(x.shape[0]):
            scale[n] = _quantize_row(&xq[n, 0], &x[n, 0], K)


def matmul_int8_acc(int32_t[:, ::1] acc, const int8_t[:, ::1] xq, const int8_t[:, ::1] wq):
    """acc (N, M) int32 = xq (N, K) int8 @ wq (K, M) int8, exact."""
    cdef Py_ssize_t n, K = xq.shape[1], M = wq.shape[1]
    with nogil:
        for n in range(xq.shape[0]):
            _int8_acc_row(&acc[n, 0], &xq[n, 0], &wq[0, 0], K, M)


def matmul_int8_weight_only(float[:, ::1] y, const float[:, ::1] x, const int8_t[:, ::1] wq,
                            const float[::1] w_scale, const float[::1] bias):
    """y (N, M) = (x (N, K) @ float32(wq (K, M))) * w_scale (M,) + bias (M,) or None."""
    cdef Py_ssize_t n, K = x.shape[1], M = wq.shape[1]
    cdef const float* b = &bias[0] if bias is not None else NULL
    with nogil:
        for n in range(x.shape[0]):
            _matmul_int8_row(&y[n, 0], &x[n, 0], &wq[0, 0], &w_scale[0], b, K, M)


def matmul_w8a8(float[:, ::1] y, int8_t[:, ::1] xq, float[::1] sx, int32_t[::1] acc,
                const float[:, ::1] x, const int8_t[:, ::1] wq, const float[::1] w_scale,
                const float[::1] bias):
    """W8A8 linear: quantize each row of x, int32 int8 x int8 sums, then both scales.

    Outputs y (N, M) float32; scratch xq (N, K) int8, sx (N,) float32, acc (M,) int32;
    inputs x (N, K) float32, wq (K, M) int8, w_scale (M,) float32, bias (M,) or None.
    """
    cdef Py_ssize_t n, K = x.shape[1], M = wq.shape[1]
    cdef const float* b = &bias[0] if bias is not None else NULL
    with nogil:
        for n in range(x.shape[0]):
            sx[n] = _quantize_row(&xq[n, 0], &x[n, 0], K)
            _int8_acc_row(&acc[0], &xq[n, 0], &wq[0, 0], K, M)
            _w8a8_epilogue(&y[n, 0], &acc[0], sx[n], &w_scale[0], b, M)


def matmul_nt_int8_weight_only(float[:, ::1] y, const float[:, ::1] x,
                               const int8_t[:, ::1] wq, const float[::1] w_scale):
    """y (N, M) = (x (N, K) @ float32(wq (M, K)).T) * w_scale (M,): the int8 head."""
    with nogil:
        _matmul_nt_int8(&y[0, 0], &x[0, 0], &wq[0, 0], &w_scale[0], x.shape[0], x.shape[1],
                        wq.shape[0], y.shape[1])


def matmul_nt_w8a8(float[:, ::1] y, int8_t[:, ::1] xq, float[::1] sx, int32_t[::1] acc,
                   const float[:, ::1] x, const int8_t[:, ::1] wq, const float[::1] w_scale):
    """The W8A8 head: quantize each row of x, exact int32 sums against the int8 rows of wq
    (M, K), then both scales; acc.shape[0] rows of wq at a time for every row of x.

    Outputs y (N, M) float32; scratch xq (N, K) int8, sx (N,) float32, acc (chunk,) int32;
    inputs x (N, K) float32, wq (M, K) int8, w_scale (M,) float32.
    """
    cdef Py_ssize_t n, m0 = 0, m1, N = x.shape[0], K = x.shape[1], M = wq.shape[0]
    cdef Py_ssize_t chunk = acc.shape[0]
    with nogil:
        for n in range(N):
            sx[n] = _quantize_row(&xq[n, 0], &x[n, 0], K)
        while m0 < M:
            m1 = m0 + chunk if m0 + chunk < M else M
            for n in range(N):
                _int8_dot_rows(&acc[0], &xq[n, 0], &wq[m0, 0], K, m1 - m0)
                _w8a8_epilogue(&y[n, m0], &acc[0], sx[n], &w_scale[m0], NULL, m1 - m0)
            m0 = m1


def softmax_f32(float[:, ::1] y, const float[:, ::1] x):
    """Row softmax of x (N, M) float32 into y."""
    with nogil:
        _softmax(&y[0, 0], &x[0, 0], x.shape[0], x.shape[1])


def softmax_f64(double[:, ::1] y, const double[:, ::1] x):
    """Row softmax of x (N, M) float64 into y."""
    with nogil:
        _softmax(&y[0, 0], &x[0, 0], x.shape[0], x.shape[1])


def layernorm_f32(float[:, ::1] y, const float[:, ::1] x, const float[::1] weight,
                  const float[::1] bias, double eps):
    """LayerNorm of x (N, C) float32 into y, weight and bias (C,)."""
    with nogil:
        _layernorm(&y[0, 0], &x[0, 0], &weight[0], &bias[0], eps, x.shape[0], x.shape[1])


def layernorm_f64(double[:, ::1] y, const double[:, ::1] x, const double[::1] weight,
                  const double[::1] bias, double eps):
    """LayerNorm of x (N, C) float64 into y, weight and bias (C,)."""
    with nogil:
        _layernorm(&y[0, 0], &x[0, 0], &weight[0], &bias[0], eps, x.shape[0], x.shape[1])


def gelu_f32(float[::1] y, const float[::1] x):
    """GELU of the flat float32 array x into y."""
    with nogil:
        _gelu(&y[0], &x[0], x.shape[0])


def gelu_f64(double[::1] y, const double[::1] x):
    """GELU of the flat float64 array x into y."""
    with nogil:
        _gelu(&y[0], &x[0], x.shape[0])


def attention_f32(float[:, ::1] out, float[:, :, ::1] att, const float[:, ::1] q,
                  const float[:, ::1] k, const float[:, ::1] v, Py_ssize_t n_head,
                  float scale):
    """Causal attention, float32: out (Tq, C), att (NH, Tq, Tk); q (Tq, C), k, v (Tk, C)."""
    with nogil:
        _attention(&out[0, 0], &att[0, 0, 0], &q[0, 0], &k[0, 0], &v[0, 0],
                   q.shape[0], k.shape[0], q.shape[1], n_head, scale)


def attention_f64(double[:, ::1] out, double[:, :, ::1] att, const double[:, ::1] q,
                  const double[:, ::1] k, const double[:, ::1] v, Py_ssize_t n_head,
                  double scale):
    """Causal attention, float64: out (Tq, C), att (NH, Tq, Tk); q (Tq, C), k, v (Tk, C)."""
    with nogil:
        _attention(&out[0, 0], &att[0, 0, 0], &q[0, 0], &k[0, 0], &v[0, 0],
                   q.shape[0], k.shape[0], q.shape[1], n_head, scale)
