# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Cython backend, fused path: one call per decoded token, and the prefill stages.

The Cython twin of `numba_fused` (read its docstring for the design): `Decoder.step` runs a
whole decode step, the engine's block forward (`Engine._run`) compiled for one token, every
layer, the KV-cache append, attention, the MLP, ln_f and the tied head, without the GIL and
without allocating, on the weights packed once (`layout.PackedWeights`) and the scratch
buffers allocated once (`layout.Buffers`). `Decoder` keeps the arrays' addresses, so a step
costs one Python method call, not one buffer acquisition per array. Every column, row and
offset is `layout`'s: its constants are copied into the C variables below at import, and
the sizes and scratch offsets are read from the index table.

Numerics, stage by stage:
- stages whose result feeds a run-time int8 quantization in a W8A8 model (LayerNorm,
  attention, GELU, float matmuls, the quantizer) are the loops of `_cython_loops.pxi`, the
  ones the unfused backend runs, compiled with the same flags (`exact`): a 1-ulp difference
  there can flip an int8 activation and move the logits by up to 0.05;
- int8 x int8 sums run the int8 tile of int8_tile.h (AVX-512 VNNI `vpdpbusd` where the
  build has it) on the tiles of `layout.pack_vnni`, exact in any order, then the unfused
  epilogue;
- float32 and weight-only models run attention on a transposed copy of the KV cache
  (`_attention_t`) and GELU with a vectorized exp, within 1e-5 of the unfused path.
"""

from libc.stdint cimport int64_t

from minitf.kernels import layout as _layout

include "_cython_loops.pxi"  # the unfused backend's loops

# The layout, as C variables (read in nogil code) set from the one Python definition.
cdef Py_ssize_t NCOL = _layout.NCOL
cdef Py_ssize_t KIND = _layout.KIND, K = _layout.K, M = _layout.M, W = _layout.W
cdef Py_ssize_t B = _layout.B, S = _layout.S, Q = _layout.Q, P = _layout.P
cdef Py_ssize_t KP = _layout.KP, MP = _layout.MP, SUM = _layout.SUM
cdef int64_t F32 = _layout.F32, INT8 = _layout.INT8
cdef Py_ssize_t ROW_DIMS = _layout.ROW_DIMS, ROW_SCRATCH = _layout.ROW_SCRATCH
cdef Py_ssize_t ROW_WTE = _layout.ROW_WTE, ROW_WPE = _layout.ROW_WPE, ROW_LNF = _layout.ROW_LNF
cdef Py_ssize_t FIRST_LAYER_ROW = _layout.FIRST_LAYER_ROW
cdef Py_ssize_t ROWS_PER_LAYER = _layout.ROWS_PER_LAYER
cdef Py_ssize_t LN_1 = _layout.LN_1, C_ATTN = _layout.C_ATTN, ATTN_PROJ = _layout.ATTN_PROJ
cdef Py_ssize_t LN_2 = _layout.LN_2, C_FC = _layout.C_FC, MLP_PROJ = _layout.MLP_PROJ
cdef Py_ssize_t DIM_L = _layout.DIM_L, DIM_C = _layout.DIM_C, DIM_NH = _layout.DIM_NH
cdef Py_ssize_t DIM_V = _layout.DIM_V, DIM_BLOCK = _layout.DIM_BLOCK, DIM_FF = _layout.DIM_FF
cdef Py_ssize_t DIM_BP = _layout.DIM_BP
cdef Py_ssize_t SF_X = _layout.SF_X, SF_H = _layout.SF_H, SF_A = _layout.SF_A
cdef Py_ssize_t SF_QKV = _layout.SF_QKV, SF_F = _layout.SF_F, SF_G = _layout.SF_G
cdef Py_ssize_t SF_ATT = _layout.SF_ATT, SF_S64 = _layout.SF_S64
cdef Py_ssize_t SI_XQ = _layout.SI_XQ, SI_STATE = _layout.SI_STATE, SI_ACC = _layout.SI_ACC
cdef Py_ssize_t TILE_K = _layout.TILE_K, TILE_M = _layout.TILE_M


# ------------------------------------------------------------------------ int8 tile -----

cdef extern from "int8_tile.h":
    int MINITF_HAS_VNNI, MINITF_TILE_K, MINITF_TILE_M
    void minitf_int8_tile(int32_t* acc, Py_ssize_t a_stride, const int8_t* xq,
                          Py_ssize_t x_stride, const int8_t* wp, Py_ssize_t groups,
                          int rows) noexcept nogil

if (MINITF_TILE_K, MINITF_TILE_M) != (TILE_K, TILE_M):  # the tile kernel is written for one shape
    raise ImportError(f"int8_tile.h computes {MINITF_TILE_K} x {MINITF_TILE_M} tiles, "
                      f"layout.py packs {TILE_K} x {TILE_M}: rebuild with matching sources")
HAS_VNNI = bool(MINITF_HAS_VNNI)


# ----------------------------------------------------------------------- linear layers ---


cdef inline void _unsign(int32_t* acc, const int32_t* wsum, Py_ssize_t Mn) noexcept nogil:
    """acc -= 128 * wsum: the tile summed (xq + 128) * w, this leaves xq * w."""
    cdef Py_ssize_t m
    for m in range(Mn):
        acc[m] -= 128 * wsum[m]


cdef void _linear_w8a8_row(float* y, int8_t* xq, int32_t* acc, const float* x,
                           const int8_t* wp, const int32_t* wsum, const float* w_scale,
                           const float* bias, Py_ssize_t Kn, Py_ssize_t Mn,
                           Py_ssize_t Mp) noexcept nogil:
    """One row of `_cython_kernels.matmul_w8a8` (bit-identical): quantize x (Kn,), int32 sums
    on the tiles wp, then the unfused epilogue. Scratch xq (>= Kp,), acc (>= Mp,)."""
    cdef Py_ssize_t groups = (Kn + TILE_K - 1) // TILE_K, tile
    cdef float s = _quantize_row(xq, x, Kn)  # padded k rows hold zero weights: xq ignored
    for tile in range(Mp // TILE_M):
        minitf_int8_tile(acc + tile * TILE_M, 0, xq, 0, wp + tile * groups * TILE_K * TILE_M,
                         groups, 1)
    _unsign(acc, wsum, Mn)
    _w8a8_epilogue(y, acc, s, w_scale, bias, Mn)


cdef void _linear_row(float* y, const float* x, const float* pf, const int8_t* pq,
                      const int32_t* pi, const int64_t* row, int8_t* xq,
                      int32_t* acc) noexcept nogil:
    """y (M,) = the linear layer of table row `row` applied to x (K,), by its kind: F32 and
    INT8 (weight-only) run the unfused kernels' row loops; W8A8 `_linear_w8a8_row`."""
    cdef Py_ssize_t Kn = row[K], Mn = row[M], m
    if row[KIND] == F32:
        _matmul_row(y, x, pf + row[W], Kn, Mn)
        for m in range(Mn):
            y[m] += pf[row[B] + m]
    elif row[KIND] == INT8:
        _matmul_int8_row(y, x, pq + row[Q], pf + row[S], pf + row[B], Kn, Mn)
    else:
        _linear_w8a8_row(y, xq, acc, x, pq + row[P], pi + row[SUM], pf + row[S], pf + row[B],
                         Kn, Mn, row[MP])


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


# ------------------------------------------------------------------------ decode ---------


cdef void _decode_step(float* logits, float* sf, int32_t* si, float* k_cache, float* v_cache,
                       float* kvT, const float* pf, const int8_t* pq, const int32_t* pi,
                       const int64_t* tab, Py_ssize_t token, Py_ssize_t pos, double eps,
                       bint exact) noexcept nogil:
    """Logits (V,) of `token` at `pos`: the engine's block forward over one token.
    Buffers and layout: numba_fused.decode_step."""
    cdef const int64_t* dims = tab + ROW_DIMS * NCOL
    cdef const int64_t* sc = tab + ROW_SCRATCH * NCOL
    cdef Py_ssize_t L = dims[DIM_L], C = dims[DIM_C], NH = dims[DIM_NH], V = dims[DIM_V]
    cdef Py_ssize_t Bk = dims[DIM_BLOCK], FF = dims[DIM_FF], Bp = dims[DIM_BP]
    cdef Py_ssize_t Tk = pos + 1, l, c, t, synced
    cdef float* x = sf + sc[SF_X]
    cdef float* h = sf + sc[SF_H]
    cdef float* a = sf + sc[SF_A]
    cdef float* qkv = sf + sc[SF_QKV]
    cdef float* f = sf + sc[SF_F]
    cdef float* g = sf + sc[SF_G]
    cdef float* att = sf + sc[SF_ATT]
    cdef double* s64 = <double*>(sf + sc[SF_S64])
    cdef int32_t* acc = si + SI_ACC
    cdef int8_t* xq = <int8_t*>(si + sc[SI_XQ])
    cdef const float* wte = pf + tab[ROW_WTE * NCOL + W]
    cdef const float* wpe = pf + tab[ROW_WPE * NCOL + W]
    cdef float scale = <float>(1.0 / sqrt(<double>(C // NH)))  # as the checks compute it
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
        else:  # differs: along the keys of the transposed cache, which vectorizes (1e-5)
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
        else:  # differs: with the vectorized exp (1e-5)
            _gelu_fast(g, f, FF)
        _linear_row(a, g, pf, pq, pi, r + MLP_PROJ * NCOL, xq, acc)
        for c in range(C):
            x[c] = x[c] + a[c]  # residual
    if not exact:
        si[SI_STATE] = Tk
    r = tab + ROW_LNF * NCOL
    _layernorm(h, x, pf + r[W], pf + r[B], eps, 1, C)
    _matmul_nt(logits, h, wte, 1, C, V)  # the tied head


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
# Called by the engine's prefill (minitf/engine.py, `FusedOps`) on T rows, beside the
# unfused backend's own entry points.


def linear_w8a8_rows(float[:, ::1] y, int8_t[:, ::1] xq, float[::1] sx, int32_t[::1] acc,
                     const float[:, ::1] x, const int8_t[::1] wp, const int32_t[::1] wsum,
                     const float[::1] w_scale, const float[::1] bias):
    """`_cython_kernels.matmul_w8a8` for N rows (bit-identical), 4 rows per weight pass.

    Outputs y (N, M); scratch xq (N, Kp) int8, sx (N,), acc (>= 4 Mp,) int32; inputs x (N, K),
    tiles wp, wsum (Mp,) column sums, w_scale (M,), bias (M,).
    """
    cdef Py_ssize_t N = x.shape[0], Kn = x.shape[1], Mn = y.shape[1]
    cdef Py_ssize_t Kp = xq.shape[1], Mp = wsum.shape[0], groups = Kp // TILE_K
    cdef Py_ssize_t n = 0, r, tile
    cdef int rows
    with nogil:
        for r in range(N):
            sx[r] = _quantize_row(&xq[r, 0], &x[r, 0], Kn)
        while n < N:
            rows = 4 if n + 4 <= N else 1
            for tile in range(Mp // TILE_M):
                minitf_int8_tile(&acc[tile * TILE_M], Mp, &xq[n, 0], Kp,
                                 &wp[tile * groups * TILE_K * TILE_M], groups, rows)
            for r in range(rows):
                _unsign(&acc[r * Mp], &wsum[0], Mn)
                _w8a8_epilogue(&y[n + r, 0], &acc[r * Mp], sx[n + r], &w_scale[0], &bias[0], Mn)
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
