# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Cython backend, fused path: one call per decode step, and the prefill stages.

The Cython twin of `numba_fused` (read its docstring for the design): `Decoder.step` runs a
whole decode step for n sequences, the engine's block forward (`Engine._run`) compiled for
one token per row, every layer, the KV-cache appends, attention, the MLP, ln_f and the tied
head, without the GIL and without allocating, on the weights packed once
(`layout.PackedWeights`) and the scratch buffers allocated once (`layout.Buffers`). Every
linear layer and the head run weight block outer, rows inner (each weight read once per
step for all rows), and a row's arithmetic never depends on the other rows, so a sequence
decoded with others gets what it gets alone, bit for bit. `Decoder` keeps the arrays'
addresses, so a step costs one Python method call, not one buffer acquisition per array. Every column, row and
offset is `layout`'s: its constants are copied into the C variables below at import, and
the sizes and scratch offsets are read from the index table.

Numerics, stage by stage:
- stages whose result feeds a run-time int8 quantization in a W8A8 model (LayerNorm,
  attention, GELU, float matmuls, the quantizer) are the loops of `_cython_loops.pxi`, the
  ones the unfused backend runs, compiled with the same flags (`exact`): a 1-ulp difference
  there can flip an int8 activation and move the logits by up to 0.05;
- int8 x int8 sums run the int8 tile of int8_tile.h on the tiles of `layout.pack_vnni`, in
  the variant `INT8_ISA` chosen at import (AVX-512 VNNI, AVX2 or portable: the fastest this
  CPU runs, unless $MINITF_ISA forces one; kernels/_isa.py), exact in any order, then the
  unfused epilogue;
- float32 and weight-only models run attention on a transposed copy of the KV cache
  (`_attention_t`) and GELU with a vectorized exp, within 1e-5 of the unfused path;
- an int8 tied head (`quantize --int8-head`) runs weight-only as the unfused kernel's int8
  row dots (`_matmul_nt_int8`), W8A8 on the int8 tiles of wte.T (`_head_w8a8`, as many
  vocabulary entries per pass as the rows' int32 sums hold), exact sums then the unfused
  epilogue; the embedding dequantizes the token's int8 row.

Threads: with `minitf.threads.set_threads(n)` (kernels/_threads.py) every linear layer of
at least `layout.THREAD_MIN_WEIGHTS` weights and the tied head split their outputs into n
contiguous ranges, one per OpenMP thread (`prange`; setup.py compiles with -fopenmp where
the compiler links it, else the loops run serially). Each output runs the same loop
whatever the split, so the logits do not depend on n, bit for bit (tests/test_threads.py).
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t

from minitf.kernels import _isa, layout as _layout
from minitf.kernels._threads import kernel_threads

include "_cython_loops.pxi"  # the unfused backend's loops

# The layout, as C variables (read in nogil code) set from the one Python definition.
cdef Py_ssize_t NCOL = _layout.NCOL
cdef Py_ssize_t KIND = _layout.KIND, K = _layout.K, M = _layout.M, W = _layout.W
cdef Py_ssize_t B = _layout.B, S = _layout.S, Q = _layout.Q, P = _layout.P
cdef Py_ssize_t KP = _layout.KP, MP = _layout.MP, SUM = _layout.SUM
cdef int64_t F32 = _layout.F32, INT8 = _layout.INT8, W8A8 = _layout.W8A8, F32T = _layout.F32T
cdef Py_ssize_t ROW_DIMS = _layout.ROW_DIMS, ROW_SCRATCH = _layout.ROW_SCRATCH
cdef Py_ssize_t ROW_WTE = _layout.ROW_WTE, ROW_WPE = _layout.ROW_WPE, ROW_LNF = _layout.ROW_LNF
cdef Py_ssize_t FIRST_LAYER_ROW = _layout.FIRST_LAYER_ROW
cdef Py_ssize_t ROWS_PER_LAYER = _layout.ROWS_PER_LAYER
cdef Py_ssize_t LN_1 = _layout.LN_1, C_ATTN = _layout.C_ATTN, ATTN_PROJ = _layout.ATTN_PROJ
cdef Py_ssize_t LN_2 = _layout.LN_2, C_FC = _layout.C_FC, MLP_PROJ = _layout.MLP_PROJ
cdef Py_ssize_t DIM_L = _layout.DIM_L, DIM_C = _layout.DIM_C, DIM_NH = _layout.DIM_NH
cdef Py_ssize_t DIM_V = _layout.DIM_V, DIM_BLOCK = _layout.DIM_BLOCK, DIM_FF = _layout.DIM_FF
cdef Py_ssize_t DIM_BP = _layout.DIM_BP, DIM_MP = _layout.DIM_MP
cdef Py_ssize_t SF_X = _layout.SF_X, SF_H = _layout.SF_H, SF_A = _layout.SF_A
cdef Py_ssize_t SF_QKV = _layout.SF_QKV, SF_F = _layout.SF_F, SF_G = _layout.SF_G
cdef Py_ssize_t SF_ATT = _layout.SF_ATT, SF_S64 = _layout.SF_S64, SF_SX = _layout.SF_SX
cdef Py_ssize_t SI_XQ = _layout.SI_XQ, SI_ACC = _layout.SI_ACC
cdef Py_ssize_t CTL_ROW = _layout.CTL_ROW, CTL_TOKEN = _layout.CTL_TOKEN, CTL_POS = _layout.CTL_POS
cdef Py_ssize_t TILE_K = _layout.TILE_K, TILE_M = _layout.TILE_M, HEAD_CHUNK = _layout.HEAD_CHUNK
cdef Py_ssize_t MATMUL_BLOCK = _layout.MATMUL_BLOCK, MATMUL_L1_FLOATS = _layout.MATMUL_L1_FLOATS
cdef Py_ssize_t THREAD_MIN_WEIGHTS = _layout.THREAD_MIN_WEIGHTS


# ------------------------------------------------------------------------ int8 tile -----

cdef extern from "int8_tile.h":
    int MINITF_TILE_K, MINITF_TILE_M
    # acc (rows, 64 at a_stride) = exact int32 xq (rows, 4 groups at x_stride) @ one tile
    ctypedef void (*minitf_int8_tile_fn)(int32_t* acc, Py_ssize_t a_stride, const int8_t* xq,
                                         Py_ssize_t x_stride, const int8_t* wp,
                                         const int32_t* wsum, Py_ssize_t groups,
                                         int rows) noexcept nogil
    minitf_int8_tile_fn minitf_int8_tile_variant(int isa) noexcept nogil
    int minitf_isa_status(int isa) noexcept nogil
    int minitf_cpu_runs_x86_64_v3() noexcept nogil
    int MINITF_ISA_OK, MINITF_ISA_NOT_BUILT

cdef extern from *:
    """
    #ifndef MINITF_BUILD
    #define MINITF_BUILD "unknown"  /* setup.py names the build: x86-64, x86-64-v3, native, ... */
    #endif
    """
    const char* MINITF_BUILD

if (MINITF_TILE_K, MINITF_TILE_M) != (TILE_K, TILE_M):  # the tile kernel is written for one shape
    raise ImportError(f"int8_tile.h computes {MINITF_TILE_K} x {MINITF_TILE_M} tiles, "
                      f"layout.py packs {TILE_K} x {TILE_M}: rebuild with matching sources")


def _int8_variant_status():
    """{variant: None if it runs here, else why not}, for every name of _isa.VARIANTS."""
    status = {}
    for isa, name in enumerate(_isa.VARIANTS):
        code = minitf_isa_status(isa)
        if code == MINITF_ISA_OK:
            status[name] = None
        elif code == MINITF_ISA_NOT_BUILT:
            status[name] = "not built for this architecture or compiler"
        else:
            status[name] = _isa.lacks(name)
    return status


BUILD = MINITF_BUILD.decode()  # the target this module was compiled for (setup.py)
CPU_RUNS_X86_64_V3 = bool(minitf_cpu_runs_x86_64_v3())  # may the x86-64-v3 build run here?
INT8_STATUS = _int8_variant_status()  # {variant: None, or why it cannot run here}
INT8_ISA = _isa.choose_variant(INT8_STATUS, "cython")  # the variant the fused path runs
cdef minitf_int8_tile_fn _int8_tile = minitf_int8_tile_variant(_isa.VARIANTS.index(INT8_ISA))


def int8_matmul_acc(str variant, int32_t[:, ::1] acc, const int8_t[:, ::1] xq,
                    const int8_t[::1] wp, const int32_t[::1] wsum):
    """acc (N, Mp) int32 = xq (N, Kp) int8 @ the tiles wp (layout.pack_vnni, column sums
    wsum (Mp,)), exact, with the tile variant `variant` (a name of INT8_STATUS that runs
    here), 4 rows per pass over the weights then single rows, as linear_w8a8_rows runs
    them. For the tests, which run every variant against numpy_ref.matmul_int8_acc.

    Raises:
        ValueError: the variant does not run here, or the shapes do not fit.
    """
    if INT8_STATUS.get(variant, "unknown") is not None:
        raise ValueError(f"int8 tile variant {variant!r} does not run here: "
                         f"{INT8_STATUS.get(variant, 'unknown')}")
    cdef minitf_int8_tile_fn tile = minitf_int8_tile_variant(_isa.VARIANTS.index(variant))
    cdef Py_ssize_t N = xq.shape[0], Kp = xq.shape[1], Mp = wsum.shape[0]
    cdef Py_ssize_t groups = Kp // TILE_K, n = 0, t
    cdef int rows
    if (acc.shape[0] != N or acc.shape[1] != Mp or wp.shape[0] != Kp * Mp or Kp % TILE_K
            or Mp % TILE_M):
        raise ValueError(f"int8_matmul_acc: acc ({acc.shape[0]}, {acc.shape[1]}), xq ({N}, {Kp}), "
                         f"wp ({wp.shape[0]},), wsum ({Mp},) do not fit one packed matmul")
    with nogil:
        while n < N:
            rows = 4 if n + 4 <= N else 1
            for t in range(Mp // TILE_M):
                tile(&acc[n, t * TILE_M], Mp, &xq[n, 0], Kp, &wp[t * groups * TILE_K * TILE_M],
                     &wsum[t * TILE_M], groups, rows)
            n += rows


# ----------------------------------------------------------------------- linear layers ---


cdef inline Py_ssize_t _split(Py_ssize_t M_, Py_ssize_t t, Py_ssize_t threads,
                              Py_ssize_t multiple) noexcept nogil:
    """The start of thread t's range of M_ outputs split `threads` ways, a multiple of
    `multiple`; M_ for t = threads (numba_fused._split)."""
    return M_ if t >= threads else M_ * t // threads // multiple * multiple


cdef void _w8a8_tiles(int32_t* acc, Py_ssize_t a_stride, const int8_t* xq, Py_ssize_t x_stride,
                      Py_ssize_t n, const int8_t* wp, const int32_t* wsum, Py_ssize_t Kp,
                      Py_ssize_t t0, Py_ssize_t t1) noexcept nogil:
    """acc[i * a_stride + m] = sum_k xq[i * x_stride + k] * w[k, m], rows i < n, the outputs
    m of tiles t0 .. t1-1 (64 each), on the tiles wp with column sums wsum
    (numba_fused._w8a8_tiles): tile outer, 4 rows per weight pass, so each tile of weights
    is read once for all rows. Exact int32 sums, in the variant INT8_ISA."""
    cdef Py_ssize_t groups = Kp // TILE_K, tile, i
    cdef int rows
    for tile in range(t0, t1):
        i = 0
        while i < n:
            rows = 4 if i + 4 <= n else 1
            _int8_tile(acc + i * a_stride + tile * TILE_M, a_stride, xq + i * x_stride,
                       x_stride, wp + tile * groups * TILE_K * TILE_M, wsum + tile * TILE_M,
                       groups, rows)
            i += rows


cdef void _w8a8_sums(int32_t* acc, Py_ssize_t a_stride, const int8_t* xq, Py_ssize_t x_stride,
                     Py_ssize_t n, const int8_t* wp, const int32_t* wsum, Py_ssize_t Kp,
                     Py_ssize_t Mp, int threads) noexcept nogil:
    """`_w8a8_tiles` of all Mp // 64 tiles: split into `threads` contiguous ranges, one per
    OpenMP thread, if there are more than one and the weight has at least
    THREAD_MIN_WEIGHTS bytes, else serially (a tile's sums do not depend on who computes
    them)."""
    cdef Py_ssize_t tiles = Mp // TILE_M, t
    if threads > 1 and Kp * Mp >= THREAD_MIN_WEIGHTS:
        for t in prange(threads, num_threads=threads, schedule="static"):
            _w8a8_tiles(acc, a_stride, xq, x_stride, n, wp, wsum, Kp, tiles * t // threads,
                        tiles * (t + 1) // threads)
    else:
        _w8a8_tiles(acc, a_stride, xq, x_stride, n, wp, wsum, Kp, 0, tiles)


ctypedef fused weight_t:  # a float layer's weights, or a weight-only int8 layer's
    float
    int8_t


cdef void _matmul_cols(float* sf, Py_ssize_t sw, Py_ssize_t o, Py_ssize_t i0,
                       const weight_t* w, Py_ssize_t Kn, Py_ssize_t Mn, Py_ssize_t n,
                       Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Row i < n of sf (sw floats each): [o+c0, o+c1) = [i0, i0+K) @ float(w (K, M))[:, c0:c1],
    w float or int8 (weight-only: the caller applies the channel scale). Blocks of outputs (layout.py:
    MATMUL_L1_FLOATS / n, at least MATMUL_BLOCK) outer, then groups of 8 k, then rows, so
    that the rows' outputs of a block stay in L1 while each group of weights is read once
    for all rows. Every row runs the same loop
    body (8 k per pass, k ascending, then the last k one by one), so a row's result depends
    neither on n nor on the blocks and column ranges. 8 k per pass rather than
    `_matmul_row`'s 4: half the loads and stores of the outputs per weight byte
    (numba_fused._matmul_cols, measured there); float32 and weight-only models only, W8A8
    ones take `_matmul_row` (exact)."""
    cdef Py_ssize_t i, k, m, m0 = c0, m1
    cdef Py_ssize_t block = MATMUL_L1_FLOATS // n // 16 * 16  # layout.py: MATMUL_BLOCK
    cdef float a0, a1, a2, a3, a4, a5, a6, a7
    cdef float* y
    cdef const float* x
    cdef const weight_t* w0
    if block < MATMUL_BLOCK:
        block = MATMUL_BLOCK
    while m0 < c1:
        m1 = m0 + block if m0 + block < c1 else c1
        for i in range(n):
            y = sf + i * sw + o
            for m in range(m0, m1):
                y[m] = 0
        k = 0
        while k + 8 <= Kn:
            w0 = w + k * Mn
            for i in range(n):
                y = sf + i * sw + o
                x = sf + i * sw + i0
                a0 = x[k]; a1 = x[k + 1]; a2 = x[k + 2]; a3 = x[k + 3]
                a4 = x[k + 4]; a5 = x[k + 5]; a6 = x[k + 6]; a7 = x[k + 7]
                for m in range(m0, m1):
                    y[m] += ((a0 * <float>w0[m] + a1 * <float>w0[Mn + m]
                              + a2 * <float>w0[2 * Mn + m] + a3 * <float>w0[3 * Mn + m])
                             + (a4 * <float>w0[4 * Mn + m] + a5 * <float>w0[5 * Mn + m]
                                + a6 * <float>w0[6 * Mn + m] + a7 * <float>w0[7 * Mn + m]))
            k += 8
        while k < Kn:
            w0 = w + k * Mn
            for i in range(n):
                y = sf + i * sw + o
                a0 = sf[i * sw + i0 + k]
                for m in range(m0, m1):
                    y[m] += a0 * <float>w0[m]
            k += 1
        m0 = m1


cdef void _matmul_rows(float* sf, Py_ssize_t sw, Py_ssize_t o, Py_ssize_t i0,
                       const weight_t* w, Py_ssize_t Kn, Py_ssize_t Mn, Py_ssize_t n,
                       int threads) noexcept nogil:
    """`_matmul_cols` of all M outputs: split into `threads` ranges (multiples of 16 floats,
    a cache line, so that two threads never write the same line), one per OpenMP thread,
    if there are more than one and w has at least THREAD_MIN_WEIGHTS weights."""
    cdef Py_ssize_t t
    if threads > 1 and Kn * Mn >= THREAD_MIN_WEIGHTS:
        for t in prange(threads, num_threads=threads, schedule="static"):
            _matmul_cols(sf, sw, o, i0, w, Kn, Mn, n, _split(Mn, t, threads, 16),
                         _split(Mn, t + 1, threads, 16))
    else:
        _matmul_cols(sf, sw, o, i0, w, Kn, Mn, n, 0, Mn)


cdef void _matmul_nt_cols(float* sf, Py_ssize_t sw, Py_ssize_t o, Py_ssize_t i0,
                          const float* wt, Py_ssize_t Kn, Py_ssize_t n, Py_ssize_t c0,
                          Py_ssize_t c1) noexcept nogil:
    """Row i < n of sf: [o+c0, o+c1) = [i0, i0+K) @ wt[c0:c1].T, wt (M, K) float32 (an F32T
    layer, layout.py): HEAD_CHUNK outputs at a time for all rows, each a dot product as the
    tied head's (`_matmul_nt`; c0 a multiple of 4), as numba_fused._matmul_nt_cols."""
    cdef Py_ssize_t i, m0 = c0, m1
    while m0 < c1:
        m1 = m0 + HEAD_CHUNK if m0 + HEAD_CHUNK < c1 else c1
        for i in range(n):
            _matmul_nt(sf + i * sw + o + m0, sf + i * sw + i0, wt + m0 * Kn, 1, Kn, m1 - m0)
        m0 = m1


cdef void _matmul_nt_rows(float* sf, Py_ssize_t sw, Py_ssize_t o, Py_ssize_t i0,
                          const float* wt, Py_ssize_t Kn, Py_ssize_t Mn, Py_ssize_t n,
                          int threads) noexcept nogil:
    """`_matmul_nt_cols` of all M outputs, split over `threads` threads as `_matmul_rows`
    splits `_matmul_cols`."""
    cdef Py_ssize_t t
    if threads > 1 and Kn * Mn >= THREAD_MIN_WEIGHTS:
        for t in prange(threads, num_threads=threads, schedule="static"):
            _matmul_nt_cols(sf, sw, o, i0, wt, Kn, n, _split(Mn, t, threads, 16),
                            _split(Mn, t + 1, threads, 16))
    else:
        _matmul_nt_cols(sf, sw, o, i0, wt, Kn, n, 0, Mn)


cdef void _linear_rows(float* sf, Py_ssize_t sw, int32_t* si, Py_ssize_t siw,
                       const int64_t* sc, Py_ssize_t o, Py_ssize_t i0, const float* pf,
                       const int8_t* pq, const int32_t* pi, const int64_t* row, Py_ssize_t n,
                       bint exact, int threads) noexcept nogil:
    """Rows i < n of sf: [o, o+M) = the linear layer of table row `row` applied to [i0,
    i0+K), by its kind (numba_fused._linear_rows): F32, F32T and INT8 all rows per weight pass, or
    in a W8A8 model (`exact`) the unfused kernels' row loops; W8A8: each row quantized, the
    int8 tile on 4 rows per weight pass, the unfused epilogue per row. sc: the scratch row.
    The weight passes of a large layer run on `threads` threads (`_matmul_rows`,
    `_w8a8_sums`)."""
    cdef Py_ssize_t Kn = row[K], Mn = row[M], Mp = row[MP], i, m
    cdef const float* bias = pf + row[B]
    cdef float* y
    cdef int8_t* xq
    if row[KIND] == F32 or row[KIND] == F32T:
        if row[KIND] == F32T:
            _matmul_nt_rows(sf, sw, o, i0, pf + row[W], Kn, Mn, n, threads)
        elif exact:  # feeds a quantization: the unfused kernel, bit for bit
            for i in range(n):
                _matmul_row(sf + i * sw + o, sf + i * sw + i0, pf + row[W], Kn, Mn)
        else:
            _matmul_rows(sf, sw, o, i0, pf + row[W], Kn, Mn, n, threads)
        for i in range(n):
            y = sf + i * sw + o
            for m in range(Mn):
                y[m] += bias[m]
    elif row[KIND] == INT8:
        if exact:
            for i in range(n):
                _matmul_int8_row(sf + i * sw + o, sf + i * sw + i0, pq + row[Q], pf + row[S],
                                 bias, Kn, Mn)
        else:
            _matmul_rows(sf, sw, o, i0, pq + row[Q], Kn, Mn, n, threads)
            for i in range(n):
                y = sf + i * sw + o
                for m in range(Mn):
                    y[m] = y[m] * pf[row[S] + m]  # the channel scale, once per output
                for m in range(Mn):
                    y[m] += bias[m]
    else:
        xq = <int8_t*>(si + sc[SI_XQ])  # row i's int8 activations 4 siw bytes further on
        for i in range(n):
            sf[i * sw + sc[SF_SX]] = _quantize_row(xq + 4 * i * siw, sf + i * sw + i0, Kn)
        _w8a8_sums(si + SI_ACC, siw, xq, 4 * siw, n, pq + row[P], pi + row[SUM], row[KP], Mp,
                   threads)
        for i in range(n):
            _w8a8_epilogue(sf + i * sw + o, si + i * siw + SI_ACC, sf[i * sw + sc[SF_SX]],
                           pf + row[S], bias, Mn)


cdef void _head_w8a8_part(float* y, Py_ssize_t ystride, const int64_t* yrows, float* sx,
                          Py_ssize_t sx_stride, int32_t* acc, Py_ssize_t a_stride,
                          const int8_t* xq, Py_ssize_t x_stride, Py_ssize_t n, const int8_t* wp,
                          const int32_t* wsum, const float* w_scale, Py_ssize_t Kp,
                          Py_ssize_t V, Py_ssize_t v0, Py_ssize_t v1,
                          Py_ssize_t width) noexcept nogil:
    """The W8A8 head's vocabulary entries [v0, v1) (multiples of TILE_M, v1 <= Vp) for the n
    rows already quantized (`_head_w8a8`), `width` entries per pass: their sums in
    acc + i * a_stride, then the unfused epilogue into row yrows[i] (or i, yrows NULL) of y."""
    cdef Py_ssize_t i, m0 = v0, m1, mp, r
    while m0 < v1 and m0 < V:  # tiles from m0 // TILE_M: Kp * TILE_M bytes each from m0 * Kp
        mp = width if width < v1 - m0 else v1 - m0
        m1 = m0 + mp if m0 + mp < V else V
        _w8a8_tiles(acc, a_stride, xq, x_stride, n, wp + m0 * Kp, wsum + m0, Kp, 0, mp // TILE_M)
        for i in range(n):
            r = yrows[i] if yrows != NULL else i
            _w8a8_epilogue(y + r * ystride + m0, acc + i * a_stride, sx[i * sx_stride],
                           w_scale + m0, NULL, m1 - m0)
        m0 += mp


cdef void _head_w8a8(float* y, Py_ssize_t ystride, const int64_t* yrows, float* sx,
                     Py_ssize_t sx_stride, int32_t* acc, Py_ssize_t a_stride, int8_t* xq,
                     Py_ssize_t x_stride, const float* x, Py_ssize_t xs, Py_ssize_t n,
                     const int8_t* wp, const int32_t* wsum, const float* w_scale,
                     Py_ssize_t C, Py_ssize_t Kp, Py_ssize_t V, Py_ssize_t Vp,
                     Py_ssize_t chunk, int threads) noexcept nogil:
    """The W8A8 int8 head of n rows (numba_fused.head_w8a8_rows): row i (x + i * xs) is
    quantized into xq + i * x_stride (its scale at sx[i * sx_stride]), then `chunk` (a
    multiple of TILE_M) vocabulary entries at a time on the tiles wp of wte.T (Vp columns,
    4 rows per weight pass), its sums at acc + i * a_stride (a_stride >= chunk), the
    unfused epilogue into row yrows[i] (or i, yrows NULL) of y (rows ystride apart). With
    `threads` > 1 (and C * V >= THREAD_MIN_WEIGHTS, a tile of sums per thread) the
    vocabulary is split into that many ranges, one per OpenMP thread, each with its own
    chunk // threads columns of the sums."""
    cdef Py_ssize_t i, t, width
    for i in range(n):
        sx[i * sx_stride] = _quantize_row(xq + i * x_stride, x + i * xs, C)
    if threads > 1 and C * V >= THREAD_MIN_WEIGHTS and chunk >= threads * TILE_M:
        width = chunk // threads // TILE_M * TILE_M
        for t in prange(threads, num_threads=threads, schedule="static"):
            _head_w8a8_part(y, ystride, yrows, sx, sx_stride, acc + t * width, a_stride, xq,
                            x_stride, n, wp, wsum, w_scale, Kp, V, _split(Vp, t, threads, TILE_M),
                            _split(Vp, t + 1, threads, TILE_M), width)
    else:
        _head_w8a8_part(y, ystride, yrows, sx, sx_stride, acc, a_stride, xq, x_stride, n, wp,
                        wsum, w_scale, Kp, V, 0, Vp, chunk)


cdef void _head_chunks(float* logits, const float* sf, Py_ssize_t sw, Py_ssize_t H,
                       const int64_t* rows, const int64_t* er, const float* pf,
                       const int8_t* pq, Py_ssize_t V, Py_ssize_t C, Py_ssize_t n,
                       Py_ssize_t v0, Py_ssize_t v1) noexcept nogil:
    """The float32 or weight-only int8 tied head (table row er) of rows i < n of sf
    ([H, H+C)) for the vocabulary entries [v0, v1): HEAD_CHUNK rows of wte at a time for
    all rows, into row rows[i] of logits (each output sums as in the whole row)."""
    cdef Py_ssize_t i, m0 = v0, m1
    while m0 < v1:
        m1 = m0 + HEAD_CHUNK if m0 + HEAD_CHUNK < v1 else v1
        for i in range(n):
            if er[KIND] == F32:
                _matmul_nt(logits + rows[i] * V + m0, sf + i * sw + H, pf + er[W] + m0 * C, 1,
                           C, m1 - m0)
            else:  # INT8: the weight-only int8 head
                _matmul_nt_int8(logits + rows[i] * V + m0, sf + i * sw + H, pq + er[Q] + m0 * C,
                                pf + er[S] + m0, 1, C, m1 - m0, V)
        m0 = m1


# ------------------------------------------------------------- float32 fast stages ------


# float32 exp: `_exp_into` of _cython_loops.pxi (shared with the training kernels).


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


cdef void _attention_t(float* out, float* s, double* s64, const float* q, const float* k,
                       const float* v, float* kT, float* vT, Py_ssize_t Tk, Py_ssize_t Bp,
                       Py_ssize_t C, Py_ssize_t n_head, float scale) noexcept nogil:
    """One query against the first Tk keys of a transposed cache (numba_fused._attention_t),
    the last of them (k, v (C,), the query's own) written into column Tk - 1 on the way,
    channel by channel just before that channel's row is read.

    `numpy_ref.attention` for the last query row within TOL[("kernel_attention", float32)].
    out (C,); scratch s (NH, Bp), s64 (Bp,); q, k, v (C,); kT, vT (C, Bp): key/value j in
    column j. Scores and weighted sums run along the keys, the contiguous axis, so they vectorize
    whatever the head size; keys are padded to a multiple of 16 with weight 0. Scores are
    summed in double: summed channel by channel in float they would round more than the
    unfused kernel's dot products (2e-5 in the logits of a trained model).
    """
    cdef Py_ssize_t HS = C // n_head
    cdef Py_ssize_t Tp = (Tk + 15) // 16 * 16, t = Tk - 1
    cdef Py_ssize_t h, j, c, c1
    cdef double q0, q1, q2, q3
    cdef float mx, total, acc
    cdef float* sh
    cdef float* k0
    cdef float* vc
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
            k0[t] = k[c]; k0[Bp + t] = k[c + 1]; k0[2 * Bp + t] = k[c + 2]; k0[3 * Bp + t] = k[c + 3]
            for j in range(Tp):
                s64[j] += q0 * k0[j] + q1 * k0[Bp + j] + q2 * k0[2 * Bp + j] + q3 * k0[3 * Bp + j]
            c += 4
        while c < c1:
            q0 = q[c]
            k0 = kT + c * Bp
            k0[t] = k[c]
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
            vc[t] = v[c]
            acc = 0
            for j in range(Tp):
                acc += sh[j] * vc[j]
            out[c] = acc


# ------------------------------------------------------------------------ decode ---------


cdef void _layernorm_rows(float* sf, Py_ssize_t sw, Py_ssize_t o, Py_ssize_t i0,
                          const float* pf, const int64_t* ln, Py_ssize_t n,
                          double eps) noexcept nogil:
    """Rows i < n of sf: [o, o+C) = LayerNorm of [i0, i0+C), weights of table row `ln`."""
    cdef Py_ssize_t i
    for i in range(n):
        _layernorm(sf + i * sw + o, sf + i * sw + i0, pf + ln[W], pf + ln[B], eps, 1, ln[M])


cdef void _int8_head_row(float* x, const int8_t* pq, const int64_t* er, Py_ssize_t token,
                         float s, Py_ssize_t C) noexcept nogil:
    """x (C,) = row `token` of the int8 head (table row er, ROW_WTE) times s, float32: read
    from the (V, C) rows (INT8), or gathered from the tiles of wte.T (W8A8, its only copy:
    4 bytes every TILE_K * TILE_M, `layout.unpack_vnni_columns`)."""
    cdef Py_ssize_t c, at
    if er[KIND] == INT8:
        at = er[Q] + token * C
        for c in range(C):
            x[c] = <float>pq[at + c] * s
    else:
        at = er[P] + (token // TILE_M) * er[KP] * TILE_M + (token % TILE_M) * TILE_K
        for c in range(C):
            x[c] = <float>pq[at + (c // TILE_K) * (TILE_K * TILE_M) + c % TILE_K] * s


cdef void _decode_rows(float* logits, float* sf, Py_ssize_t sw, int32_t* si, Py_ssize_t siw,
                       float* k_cache, float* v_cache, float* kvT, int64_t* synced,
                       const float* pf, const int8_t* pq, const int32_t* pi,
                       const int64_t* tab, const int64_t* ctl, Py_ssize_t R, Py_ssize_t n,
                       double eps, bint exact, int threads) noexcept nogil:
    """One decode step of n sequences: the engine's block forward over one token per row.
    Buffers and layout: numba_fused.decode_rows (ctl (3, R): rows, tokens, positions); the
    large linear layers and the head on `threads` OpenMP threads (the same logits, bit for
    bit, for any count)."""
    cdef const int64_t* dims = tab + ROW_DIMS * NCOL
    cdef const int64_t* sc = tab + ROW_SCRATCH * NCOL
    cdef Py_ssize_t L = dims[DIM_L], C = dims[DIM_C], NH = dims[DIM_NH], V = dims[DIM_V]
    cdef Py_ssize_t Bk = dims[DIM_BLOCK], FF = dims[DIM_FF], Bp = dims[DIM_BP]
    cdef Py_ssize_t X = sc[SF_X], H = sc[SF_H], A = sc[SF_A], QKV = sc[SF_QKV]
    cdef Py_ssize_t F = sc[SF_F], G = sc[SF_G]
    cdef Py_ssize_t i, l, c, t, r, pos, Tk, sync
    cdef const int64_t* rows = ctl + CTL_ROW * R
    cdef const int64_t* tokens = ctl + CTL_TOKEN * R
    cdef const int64_t* positions = ctl + CTL_POS * R
    cdef const int64_t* er = tab + ROW_WTE * NCOL  # the tied head's row: float or int8
    cdef const float* wte = pf + er[W]
    cdef const float* wpe = pf + tab[ROW_WPE * NCOL + W]
    cdef float s
    cdef float scale = <float>(1.0 / sqrt(<double>(C // NH)))  # as the checks compute it
    cdef const int64_t* lr
    cdef float* row
    cdef float* kc
    cdef float* vc
    cdef float* kT
    cdef float* vT
    for i in range(n):  # embedding: token and position
        row = sf + i * sw
        if er[KIND] == F32:
            for c in range(C):
                row[X + c] = wte[tokens[i] * C + c] + wpe[positions[i] * C + c]
        else:  # the int8 head's row, dequantized, then the position: two roundings, as
            s = pf[er[S] + tokens[i]]  # the unfused path
            _int8_head_row(row + X, pq, er, tokens[i], s, C)
            for c in range(C):
                row[X + c] = row[X + c] + wpe[positions[i] * C + c]
    for l in range(L):
        lr = tab + (FIRST_LAYER_ROW + l * ROWS_PER_LAYER) * NCOL
        _layernorm_rows(sf, sw, H, X, pf, lr + LN_1 * NCOL, n, eps)
        _linear_rows(sf, sw, si, siw, sc, QKV, H, pf, pq, pi, lr + C_ATTN * NCOL, n, exact, threads)
        for i in range(n):  # append each row's key and value to its cache, attend to it
            r, pos, row = rows[i], positions[i], sf + i * sw
            Tk = pos + 1
            kc = k_cache + (r * L + l) * Bk * C
            vc = v_cache + (r * L + l) * Bk * C
            for c in range(C):
                kc[pos * C + c] = row[QKV + C + c]
                vc[pos * C + c] = row[QKV + 2 * C + c]
            if exact:
                _attention(row + H, row + sc[SF_ATT], row + QKV, kc, vc, 1, Tk, C, NH, scale)
            else:  # differs: along the keys of the transposed cache, which vectorizes (1e-5)
                kT = kvT + ((r * 2) * L + l) * C * Bp
                vT = kvT + ((r * 2 + 1) * L + l) * C * Bp
                sync = synced[r] if synced[r] < pos else pos
                for t in range(sync, pos):  # positions written by anything else
                    for c in range(C):
                        kT[c * Bp + t] = kc[t * C + c]
                        vT[c * Bp + t] = vc[t * C + c]
                _attention_t(row + H, row + sc[SF_ATT], <double*>(row + sc[SF_S64]), row + QKV,
                             row + QKV + C, row + QKV + 2 * C, kT, vT, Tk, Bp, C, NH, scale)
        _linear_rows(sf, sw, si, siw, sc, A, H, pf, pq, pi, lr + ATTN_PROJ * NCOL, n, exact, threads)
        for i in range(n):
            row = sf + i * sw
            for c in range(C):
                row[X + c] = row[X + c] + row[A + c]  # residual
        _layernorm_rows(sf, sw, H, X, pf, lr + LN_2 * NCOL, n, eps)
        _linear_rows(sf, sw, si, siw, sc, F, H, pf, pq, pi, lr + C_FC * NCOL, n, exact, threads)
        for i in range(n):
            row = sf + i * sw
            if exact:
                _gelu(row + G, row + F, FF)
            else:  # differs: with the vectorized exp (1e-5)
                _gelu_fast(row + G, row + F, FF)
        _linear_rows(sf, sw, si, siw, sc, A, G, pf, pq, pi, lr + MLP_PROJ * NCOL, n, exact, threads)
        for i in range(n):
            row = sf + i * sw
            for c in range(C):
                row[X + c] = row[X + c] + row[A + c]  # residual
    if not exact:
        for i in range(n):
            synced[rows[i]] = positions[i] + 1
    _layernorm_rows(sf, sw, H, X, pf, tab + ROW_LNF * NCOL, n, eps)
    if er[KIND] == W8A8:  # the int8 head, W8A8: on the tiles of wte.T
        _head_w8a8(logits, V, rows, sf + sc[SF_SX], sw, si + SI_ACC, siw,
                   <int8_t*>(si + sc[SI_XQ]), 4 * siw, sf + H, sw, n, pq + er[P], pi + er[SUM],
                   pf + er[S], C, er[KP], V, er[MP], dims[DIM_MP], threads)
    elif threads > 1 and V * C >= THREAD_MIN_WEIGHTS:  # the vocabulary split over the threads
        for t in prange(threads, num_threads=threads, schedule="static"):
            _head_chunks(logits, sf, sw, H, rows, er, pf, pq, V, C, n,
                         _split(V, t, threads, HEAD_CHUNK), _split(V, t + 1, threads, HEAD_CHUNK))
    else:
        _head_chunks(logits, sf, sw, H, rows, er, pf, pq, V, C, n, 0, V)


cdef class Decoder:
    """Decode steps on arrays bound once: `step(n)` runs the first n rows of ctl.

    Arguments as numba_fused.decode_rows's (all C-contiguous; this object keeps them alive):
    logits (R, V) out; scratch sf (R, SFW) float32, si (R, SIW) int32; k_cache, v_cache (R,
    n_layer, block_size, d_model); kvT (R, 2, n_layer, d_model, Bp); synced (R,) int64; pf,
    pq, pi, tab the packed weights; ctl (3, R) int64, written by the engine; eps; exact: a
    W8A8 model, every stage bit for bit as the unfused path.
    """

    cdef object _keep
    cdef float* logits
    cdef float* sf
    cdef int32_t* si
    cdef float* k_cache
    cdef float* v_cache
    cdef float* kvT
    cdef int64_t* synced
    cdef const float* pf
    cdef const int8_t* pq
    cdef const int32_t* pi
    cdef const int64_t* tab
    cdef const int64_t* ctl
    cdef Py_ssize_t sw, siw, rows
    cdef double eps
    cdef bint exact

    def __init__(self, float[:, ::1] logits, float[:, ::1] sf, int32_t[:, ::1] si,
                 float[:, :, :, ::1] k_cache, float[:, :, :, ::1] v_cache,
                 float[:, :, :, :, ::1] kvT, int64_t[::1] synced, const float[::1] pf,
                 const int8_t[::1] pq, const int32_t[::1] pi, const int64_t[:, ::1] tab,
                 const int64_t[:, ::1] ctl, double eps, bint exact):
        self._keep = (logits, sf, si, k_cache, v_cache, kvT, synced, pf, pq, pi, tab, ctl)
        self.logits, self.sf, self.si = &logits[0, 0], &sf[0, 0], &si[0, 0]
        self.k_cache, self.v_cache = &k_cache[0, 0, 0, 0], &v_cache[0, 0, 0, 0]
        self.kvT = &kvT[0, 0, 0, 0, 0] if kvT.shape[4] else NULL
        self.synced = &synced[0]
        self.pf = &pf[0]
        self.pq = &pq[0] if pq.shape[0] else NULL
        self.pi = &pi[0] if pi.shape[0] else NULL
        self.tab, self.ctl = &tab[0, 0], &ctl[0, 0]
        self.sw, self.siw, self.rows = sf.shape[1], si.shape[1], sf.shape[0]
        self.eps, self.exact = eps, exact

    def step(self, Py_ssize_t n):
        """Run the first n rows of ctl (checked by the engine) on the kernel threads
        (kernels/_threads.py); fills their logits."""
        cdef int threads = kernel_threads()
        if not 1 <= n <= self.rows:
            raise ValueError(f"n={n} rows: the buffers hold 1..{self.rows}")
        with nogil:
            _decode_rows(self.logits, self.sf, self.sw, self.si, self.siw, self.k_cache,
                         self.v_cache, self.kvT, self.synced, self.pf, self.pq, self.pi,
                         self.tab, self.ctl, self.rows, n, self.eps, self.exact, threads)


# ------------------------------------------------------------------------ prefill --------
# Called by the engine's prefill (minitf/engine.py, `FusedPath`) on T rows, beside the
# unfused backend's own entry points.


def linear_w8a8_rows(float[:, ::1] y, int8_t[:, ::1] xq, float[::1] sx, int32_t[:, ::1] acc,
                     const float[:, ::1] x, const int8_t[::1] wp, const int32_t[::1] wsum,
                     const float[::1] w_scale, const float[::1] bias, int threads):
    """`_cython_kernels.matmul_w8a8` for N rows (bit-identical), 4 rows per weight pass,
    the tiles split over `threads` threads (numba_fused.linear_w8a8_rows).

    Outputs y (N, M); scratch xq (N, Kp) int8, sx (N,), acc (N, Mp) int32; inputs x (N, K),
    tiles wp, wsum (Mp,) column sums, w_scale (M,), bias (M,).
    """
    cdef Py_ssize_t N = x.shape[0], Kn = x.shape[1], Mn = y.shape[1]
    cdef Py_ssize_t Kp = xq.shape[1], Mp = wsum.shape[0], r
    with nogil:
        for r in range(N):
            sx[r] = _quantize_row(&xq[r, 0], &x[r, 0], Kn)
        _w8a8_sums(&acc[0, 0], Mp, &xq[0, 0], Kp, N, &wp[0], &wsum[0], Kp, Mp, threads)
        for r in range(N):
            _w8a8_epilogue(&y[r, 0], &acc[r, 0], sx[r], &w_scale[0], &bias[0], Mn)


def head_w8a8_rows(float[:, ::1] y, int8_t[:, ::1] xq, float[::1] sx, int32_t[:, ::1] acc,
                   const float[:, ::1] x, const int8_t[::1] wp, const int32_t[::1] wsum,
                   const float[::1] w_scale, int threads):
    """The W8A8 int8 head for N rows (numba_fused.head_w8a8_rows, bit-identical to
    `_cython_kernels.matmul_nt_w8a8`): outputs y (N, V); scratch xq (N, Kp) int8, sx (N,),
    acc (N, chunk) int32 (chunk a multiple of TILE_M: the entries per pass); inputs x (N, C),
    wp the tiles of wte.T, wsum (Vp,), w_scale (V,)."""
    cdef Py_ssize_t N = x.shape[0]
    with nogil:
        _head_w8a8(&y[0, 0], y.shape[1], NULL, &sx[0], 1, &acc[0, 0], acc.shape[1], &xq[0, 0],
                   xq.shape[1], &x[0, 0], x.shape[1], N, &wp[0], &wsum[0], &w_scale[0],
                   x.shape[1], xq.shape[1], y.shape[1], wsum.shape[0], acc.shape[1], threads)


def causal_softmax_rows(float[:, ::1] att, float scale, int32_t[::1] si):
    """In place, row i of att (Tq, Tk) becomes softmax(scale * att[i, :j+1]) followed by
    zeros, j = Tk - Tq + i (numba_fused.causal_softmax_rows). si: unused (numba's scratch)."""
    cdef Py_ssize_t Tq = att.shape[0], Tk = att.shape[1], i, j, last
    cdef float mx, total
    cdef float* row
    with nogil:
        for i in range(Tq):
            last = Tk - Tq + i
            row = &att[i, 0]
            for j in range(last + 1):
                row[j] *= scale
            mx = row[0]
            for j in range(1, last + 1):
                if row[j] > mx:
                    mx = row[j]
            _exp_into(row, row, mx, last + 1)
            total = 0
            for j in range(last + 1):
                total += row[j]
            for j in range(last + 1):
                row[j] = row[j] / total
            for j in range(last + 1, Tk):
                row[j] = 0


def gelu_fast_rows(float[:, ::1] y, const float[:, ::1] x, int32_t[::1] si):
    """GELU of x (T, FF) into y with the vectorized exp (`_gelu_fast`); si: unused."""
    with nogil:
        _gelu_fast(&y[0, 0], &x[0, 0], x.shape[0] * x.shape[1])
