/* minitf's int8 tile (C, for the Cython fused path; the numba twin: numba_int8_tile.py).
 *
 *   minitf_int8_tile(acc, a_stride, xq, x_stride, wp, groups, rows)
 *
 * writes, for r < rows (1 or 4) and o < MINITF_TILE_M (64):
 *
 *   acc[r * a_stride + o] = sum_{g < groups} sum_{i < 4} (xq[r * x_stride + 4g + i] + 128)
 *                                                        * wp[256 g + 4 o + i]
 *
 * on one tile of weights in the order of layout.pack_vnni (group g holds the 4 bytes
 * k = 4g .. 4g+3 of each of the tile's 64 outputs side by side). The +128 makes the
 * activations unsigned bytes (xq ^ 0x80 is xq + 128 read as unsigned), which vpdpbusd
 * takes; the caller subtracts 128 * (column sum of w). Exact integer arithmetic: every
 * variant gives numpy_ref.matmul_int8_acc's sums bit for bit.
 *
 * With AVX-512 VNNI: vpdpbusd adds, in each of 16 int32 lanes, 4 products of adjacent
 * bytes (64 products per instruction); 4 zmm accumulators per row stay in registers over
 * the whole k loop and each 64-byte weight vector is loaded once for every row. Otherwise
 * the same sums as plain loops. Py_ssize_t comes from Python.h.
 */
#ifndef MINITF_INT8_TILE_H
#define MINITF_INT8_TILE_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MINITF_TILE_K 4  /* bytes of k per int32 lane: layout.TILE_K */
#define MINITF_TILE_M 64 /* outputs per tile, 4 x 16 int32 lanes: layout.TILE_M */

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define MINITF_HAS_VNNI 1

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

#endif /* MINITF_INT8_TILE_H */
