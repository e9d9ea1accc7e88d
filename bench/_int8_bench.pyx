# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Timing loops for bench/int8_tiles.py: the decode and prefill loops of the Cython fused
path, called `repeats` times from C (no Python call per repetition), compiled with the flags
bench/int8_tiles.py chooses, so that one source gives the portable, AVX2 and native builds.

The fused module's own loops are included as they are (`_matmul_row`,
`_matmul_int8_weight_only_row`, `_quantize`, `_w8a8_epilogue`, and its VNNI-or-scalar tile
`minitf_int8_tile`), beside the variants of kernels/int8_tile.h.
"""

include "_cython_fused.pyx"

include "int8_tile.pxi"

RUNS = {name: why is None for name, why in int8_variant_status().items()}
OLD_TILE_HAS_VNNI = HAS_VNNI  # today's minitf_int8_tile: VNNI if compiled for it, else loops


cdef minitf_int8_tile_fn _tile_of(str variant) except NULL:
    """A header variant by name, or "old": today's minitf_int8_tile (the +128 form)."""
    if variant == "old":
        return <minitf_int8_tile_fn>_old_tile
    if not RUNS.get(variant, False):
        raise ValueError(f"variant {variant!r} does not run here")
    return minitf_int8_tile_variant(_isa.VARIANTS.index(variant))


cdef void _old_tile(int32_t* acc, Py_ssize_t a_stride, const int8_t* xq, Py_ssize_t x_stride,
                    const int8_t* wp, const int32_t* wsum, Py_ssize_t groups,
                    int rows) noexcept nogil:
    minitf_int8_tile(acc, a_stride, xq, x_stride, wp, groups, rows)


def f32_rows(float[:, ::1] y, const float[:, ::1] x, const float[:, ::1] w, Py_ssize_t repeats):
    """y = x @ w, row by row with the decode loop `_matmul_row`."""
    cdef Py_ssize_t r, n
    with nogil:
        for r in range(repeats):
            for n in range(x.shape[0]):
                _matmul_row(&y[n, 0], &x[n, 0], &w[0, 0], w.shape[0], w.shape[1])


def weight_only_rows(float[:, ::1] y, const float[:, ::1] x, const int8_t[:, ::1] wq,
                     const float[::1] w_scale, const float[::1] bias, Py_ssize_t repeats):
    """Weight-only int8 linear, row by row with the decode loop."""
    cdef Py_ssize_t r, n
    with nogil:
        for r in range(repeats):
            for n in range(x.shape[0]):
                _matmul_int8_weight_only_row(&y[n, 0], &x[n, 0], &wq[0, 0], &w_scale[0],
                                             &bias[0], wq.shape[0], wq.shape[1])


def w8a8_rows(str variant, float[:, ::1] y, int8_t[:, ::1] xq, float[::1] sx, int32_t[::1] acc,
              const float[:, ::1] x, const int8_t[::1] wp, const int32_t[::1] wsum,
              const int32_t[::1] zeros, const float[::1] w_scale, const float[::1] bias,
              Py_ssize_t repeats):
    """The W8A8 linear of the fused path (quantize, tiles 4 rows per pass, epilogue) with a
    tile variant; the epilogue subtracts 128 * wsum for "old" and nothing (zeros) for the
    header's exact sums."""
    cdef minitf_int8_tile_fn tile = _tile_of(variant)
    cdef const int32_t* corr = &wsum[0] if variant == "old" else &zeros[0]
    cdef Py_ssize_t N = x.shape[0], Kn = x.shape[1], Mn = y.shape[1]
    cdef Py_ssize_t Kp = xq.shape[1], Mp = wsum.shape[0], groups = Kp // 4
    cdef Py_ssize_t rep, n, r, t
    cdef int rows
    with nogil:
        for rep in range(repeats):
            for r in range(N):
                sx[r] = _quantize(&xq[r, 0], &x[r, 0], Kn)
            n = 0
            while n < N:
                rows = 4 if n + 4 <= N else 1
                for t in range(Mp // TILE):
                    tile(&acc[t * TILE], Mp, &xq[n, 0], Kp, &wp[t * groups * 4 * TILE],
                         &wsum[t * TILE], groups, rows)
                for r in range(rows):
                    _w8a8_epilogue(&y[n + r, 0], &acc[r * Mp], corr, sx[n + r], &w_scale[0],
                                   &bias[0], Mn)
                n += rows


def tiles_only(str variant, int32_t[::1] acc, const int8_t[:, ::1] xq, const int8_t[::1] wp,
               const int32_t[::1] wsum, Py_ssize_t n_tiles, Py_ssize_t repeats):
    """The int32 sums alone: the first n_tiles tiles for the rows of xq (1 or 4)."""
    cdef minitf_int8_tile_fn tile = _tile_of(variant)
    cdef Py_ssize_t Kp = xq.shape[1], Mp = wsum.shape[0], groups = Kp // 4, rep, t
    cdef int rows = xq.shape[0]
    with nogil:
        for rep in range(repeats):
            for t in range(n_tiles):
                tile(&acc[t * TILE], Mp, &xq[0, 0], Kp, &wp[t * groups * 4 * TILE],
                     &wsum[t * TILE], groups, rows)
