/* minitf's int8 tile (C, for the Cython fused path; the numba twin: numba_int8_tile.py):
 * int8 x int8 sums of the W8A8 matmuls, for every CPU: one tile of 64 outputs for 1 or 4
 * rows of activations, in three variants chosen at run time.
 *
 * Contract (every variant, bit for bit):
 *
 *   acc[r * a_stride + o] = sum_{k < 4 groups} xq[r * x_stride + k] * w[k][o]
 *
 * for r < rows (1 or 4) and o < 64, the exact int32 sum, where w[k][o] is
 * wp[256 (k / 4) + 4 o + k % 4]: the tile layout of kernels/layout.py `pack_vnni` (groups of
 * 4 k bytes of each output side by side, 256 bytes per group). wsum (64,) holds the tile's
 * column sums, sum_k w[k][o] (the `colsum` of pack_vnni); only the VNNI variant reads it.
 * It equals kernels/numpy_ref.py `matmul_int8_acc` on the tile's columns, provided
 *   - xq is in [-128, 127] and w in [-127, 127] (the quantizer's range; a weight of -128 is
 *     wrong in the AVX2 variant, whose sign trick cannot negate it),
 *   - 4 groups <= 131071, so that no sum leaves int32 (|sum| <= 128 * 127 * K).
 * Order of arguments: outputs, inputs, weights, sizes (as every minitf kernel).
 *
 * Variants (minitf_isa_names):
 *   portable    C in GNU vector types (gcc, clang) that the compiler lowers to what it
 *               targets: SSE2 on the x86-64 baseline, NEON on aarch64; products in int16
 *               (a pair |x0 w0 + x1 w1| <= 32512), widened to int32 by shifts.
 *   avx2        vpmaddubsw on |x| and sign(x) w (vpsignb moves the signs of x to the
 *               weights, so the unsigned x signed product pairs never saturate int16:
 *               2 * 128 * 127 = 32512), then vpmaddwd by ones into int32: 32 products in
 *               4 instructions (the pattern of llama.cpp's AVX2 int8 dot products).
 *   avx512vnni  vpdpbusd, 64 products per instruction. It multiplies unsigned by signed
 *               bytes, so x enters as the byte x ^ 0x80 = x + 128 and the accumulators start
 *               at -128 * wsum: exact, since vpdpbusd wraps modulo 2^32 and the true sum
 *               fits int32.
 * Integers are exact in any order, so the variants agree bit for bit (tests/test_int8_tile.py).
 *
 * Build: every variant compiles in any x86-64 build, the baseline included, because the
 * AVX2 and AVX-512 functions carry their own gcc/clang `target` attribute; the caller picks
 * one at run time with minitf_isa_status() (compiled in, and does this CPU run it?). Other
 * architectures and compilers get the portable variant alone.
 */
#ifndef MINITF_INT8_TILE_H
#define MINITF_INT8_TILE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MINITF_X86 1
#include <immintrin.h>
#else
#define MINITF_X86 0
#endif

#define MINITF_TILE_K 4  /* bytes of k per int32 lane: layout.TILE_K */
#define MINITF_TILE_M 64 /* outputs per tile, 4 x 16 int32 lanes: layout.TILE_M */

enum { MINITF_ISA_PORTABLE = 0, MINITF_ISA_AVX2 = 1, MINITF_ISA_AVX512VNNI = 2, MINITF_ISA_COUNT = 3 };
/* minitf_isa_status: the variant runs here; it is not built for this architecture or
   compiler; this CPU (or its operating system) lacks the instructions */
enum { MINITF_ISA_OK = 0, MINITF_ISA_NOT_BUILT = 1, MINITF_ISA_NO_CPU = 2 };

static const char *const minitf_isa_names[MINITF_ISA_COUNT] = {"portable", "avx2", "avx512vnni"};

typedef void (*minitf_int8_tile_fn)(int32_t *acc, ptrdiff_t a_stride, const int8_t *xq,
                                    ptrdiff_t x_stride, const int8_t *wp, const int32_t *wsum,
                                    ptrdiff_t groups, int rows);

/* ------------------------------------------------------------------- portable --------- */

#if defined(__GNUC__)
/* One row: s (64,) = x (4 groups,) @ the tile, in GNU C vectors of 16 bytes, which gcc and
   clang lower to whatever the target has (SSE2, NEON, or scalar code): a plain loop over the
   tile runs scalar or close to it on the x86-64 baseline (measured 2-5 Gprod/s against
   6-14). Each 16 bytes (4 outputs x 4 k) read as 8 int16 words (k0 k1 | k2 k3 per output):
   the low byte sign-extended by << 8 >> 8, the high by >> 8, times the matching x, summed
   in int16 (|x0 w0 + x1 w1| <= 2 * 128 * 127 fits), then the two int16 halves of each int32
   lane sign-extended and added: output o's 4 products, in lane o. */
typedef int16_t minitf_v8i16 __attribute__((vector_size(16)));
typedef uint16_t minitf_v8u16 __attribute__((vector_size(16)));
typedef int32_t minitf_v4i32 __attribute__((vector_size(16)));
typedef uint32_t minitf_v4u32 __attribute__((vector_size(16)));

static inline void minitf_int8_row_portable(int32_t *s, const int8_t *x, const int8_t *wp,
                                            ptrdiff_t groups) {
    minitf_v4i32 t[MINITF_TILE_M / 4];
    for (int j = 0; j < MINITF_TILE_M / 4; j++) t[j] = (minitf_v4i32){0, 0, 0, 0};
    for (ptrdiff_t g = 0; g < groups; g++) {
        const int8_t *w = wp + 4 * MINITF_TILE_M * g;
        const int16_t x0 = x[4 * g], x1 = x[4 * g + 1], x2 = x[4 * g + 2], x3 = x[4 * g + 3];
        const minitf_v8i16 xlo = {x0, x2, x0, x2, x0, x2, x0, x2};  /* for k0, k2 */
        const minitf_v8i16 xhi = {x1, x3, x1, x3, x1, x3, x1, x3};  /* for k1, k3 */
        for (int j = 0; j < MINITF_TILE_M / 4; j++) {
            minitf_v8i16 v;
            memcpy(&v, w + 16 * j, 16);
            const minitf_v8i16 lo = (minitf_v8i16)((minitf_v8u16)v << 8) >> 8;
            const minitf_v8i16 q = lo * xlo + (v >> 8) * xhi;
            const minitf_v4i32 d = (minitf_v4i32)q;
            t[j] += ((minitf_v4i32)((minitf_v4u32)d << 16) >> 16) + (d >> 16);
        }
    }
    memcpy(s, t, sizeof t);
}
#else
/* Other compilers: the same sums as a plain loop. */
static inline void minitf_int8_row_portable(int32_t *s, const int8_t *x, const int8_t *wp,
                                            ptrdiff_t groups) {
    for (int o = 0; o < MINITF_TILE_M; o++) s[o] = 0;
    for (ptrdiff_t g = 0; g < groups; g++)
        for (int o = 0; o < MINITF_TILE_M; o++)
            for (int i = 0; i < 4; i++)
                s[o] += (int32_t)x[4 * g + i] * wp[4 * MINITF_TILE_M * g + 4 * o + i];
}
#endif

static void minitf_int8_tile_portable(int32_t *acc, ptrdiff_t a_stride, const int8_t *xq,
                                      ptrdiff_t x_stride, const int8_t *wp, const int32_t *wsum,
                                      ptrdiff_t groups, int rows) {
    (void)wsum;
    for (int r = 0; r < rows; r++)
        minitf_int8_row_portable(acc + r * a_stride, xq + r * x_stride, wp, groups);
}

#if MINITF_X86
/* ----------------------------------------------------------------------- AVX2 --------- */

#define MINITF_AVX2 __attribute__((target("avx2")))

/* One row: s (64,) = x (4 groups,) @ the tile, the 8 accumulators (8 outputs each) in
   registers for the whole k loop. Measured (Zen 4, AVX2 code): faster than vpmovsxbw +
   vpmaddwd (1.3-2x), and blocking 2 or 4 rows per weight load gains nothing (the
   multiplies, not the loads, are the limit), so 4 rows are 4 passes over the tile. */
MINITF_AVX2 static inline void minitf_int8_row_avx2(int32_t *s, const int8_t *x, const int8_t *wp,
                                                    ptrdiff_t groups) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a[8];
    for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_si256();
    for (ptrdiff_t g = 0; g < groups; g++) {
        const int8_t *w = wp + 4 * MINITF_TILE_M * g;
        int32_t x4;
        memcpy(&x4, x + 4 * g, 4);
        const __m256i sx = _mm256_set1_epi32(x4);  /* the group's 4 bytes of x, per output */
        const __m256i ax = _mm256_abs_epi8(sx);    /* |x|, read as unsigned: -128 gives 128 */
        for (int j = 0; j < 8; j++) {
            __m256i wj = _mm256_loadu_si256((const __m256i *)(w + 32 * j));
            /* |x| * (sign(x) w) = x w, pairs summed in int16, then pairs of pairs in int32 */
            __m256i p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wj, sx));
            a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(p, ones));
        }
    }
    for (int j = 0; j < 8; j++) _mm256_storeu_si256((__m256i *)(s + 8 * j), a[j]);
}

MINITF_AVX2 static void minitf_int8_tile_avx2(int32_t *acc, ptrdiff_t a_stride, const int8_t *xq,
                                              ptrdiff_t x_stride, const int8_t *wp,
                                              const int32_t *wsum, ptrdiff_t groups, int rows) {
    (void)wsum;
    for (int r = 0; r < rows; r++)
        minitf_int8_row_avx2(acc + r * a_stride, xq + r * x_stride, wp, groups);
}

/* ------------------------------------------------------------------ AVX-512 VNNI ------ */

#define MINITF_VNNI __attribute__((target("avx512f,avx512vnni")))

MINITF_VNNI static void minitf_int8_tile_avx512vnni(int32_t *acc, ptrdiff_t a_stride,
                                                    const int8_t *xq, ptrdiff_t x_stride,
                                                    const int8_t *wp, const int32_t *wsum,
                                                    ptrdiff_t groups, int rows) {
    __m512i a[4][4], start[4];
    for (int t = 0; t < 4; t++)  /* -128 * wsum: the correction for x + 128 */
        start[t] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                    _mm512_slli_epi32(_mm512_loadu_si512(wsum + 16 * t), 7));
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < 4; t++) a[r][t] = start[t];
    if (rows == 4) {
        for (ptrdiff_t g = 0; g < groups; g++) {
            const int8_t *w = wp + 4 * MINITF_TILE_M * g;
            __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
            __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
            for (int r = 0; r < 4; r++) {
                int32_t x4;
                memcpy(&x4, xq + r * x_stride + 4 * g, 4);
                __m512i x = _mm512_set1_epi32(x4 ^ (int32_t)0x80808080u); /* x + 128, unsigned */
                a[r][0] = _mm512_dpbusd_epi32(a[r][0], x, w0);
                a[r][1] = _mm512_dpbusd_epi32(a[r][1], x, w1);
                a[r][2] = _mm512_dpbusd_epi32(a[r][2], x, w2);
                a[r][3] = _mm512_dpbusd_epi32(a[r][3], x, w3);
            }
        }
    } else {
        for (ptrdiff_t g = 0; g < groups; g++) {
            const int8_t *w = wp + 4 * MINITF_TILE_M * g;
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
        for (int t = 0; t < 4; t++) _mm512_storeu_si512(acc + r * a_stride + 16 * t, a[r][t]);
}
#endif /* MINITF_X86 */

/* ------------------------------------------------------------------- dispatch --------- */

/* The variant `isa`, or NULL where it is not built (not x86, or not gcc/clang). */
static inline minitf_int8_tile_fn minitf_int8_tile_variant(int isa) {
    switch (isa) {
    case MINITF_ISA_PORTABLE: return minitf_int8_tile_portable;
#if MINITF_X86
    case MINITF_ISA_AVX2: return minitf_int8_tile_avx2;
    case MINITF_ISA_AVX512VNNI: return minitf_int8_tile_avx512vnni;
#endif
    default: return NULL;
    }
}

/* MINITF_ISA_OK, MINITF_ISA_NOT_BUILT or MINITF_ISA_NO_CPU (the compiler's CPU check also
   asks the operating system whether it saves the AVX / AVX-512 registers). */
static inline int minitf_isa_status(int isa) {
    if (isa < 0 || isa >= MINITF_ISA_COUNT || minitf_int8_tile_variant(isa) == NULL)
        return MINITF_ISA_NOT_BUILT;
#if MINITF_X86
    __builtin_cpu_init();
    if (isa == MINITF_ISA_AVX2 && !__builtin_cpu_supports("avx2")) return MINITF_ISA_NO_CPU;
    if (isa == MINITF_ISA_AVX512VNNI
        && !(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni")))
        return MINITF_ISA_NO_CPU;
#endif
    return MINITF_ISA_OK;
}

/* 1 if this CPU (and its operating system) runs code built with -march=x86-64-v3: AVX2,
   FMA, BMI1/2, and with gcc also F16C, MOVBE and LZCNT (clang 14 cannot ask for those three;
   every CPU with AVX2, FMA and BMI2 has them). setup.py's second build of the Cython modules
   needs it. */
static inline int minitf_cpu_runs_x86_64_v3(void) {
#if MINITF_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
           && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")
#if !defined(__clang__)
           && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe")
           && __builtin_cpu_supports("lzcnt")
#endif
           ;
#else
    return 0;
#endif
}

#endif /* MINITF_INT8_TILE_H */
