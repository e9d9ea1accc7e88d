"""The fused path's layout, in one place: how the weights are packed and where every
buffer sits. `numba_fused` imports these constants; `_cython_fused` copies them into C
variables when it is imported; the engine packs and allocates through `PackedWeights` and
`Buffers`. Nothing else derives an offset.

Packed weights. A model's tensors are copied once into three flat arrays: pf (float32:
wte, wpe, LayerNorms, float weights, biases, scales), pq (int8 weights, then the W8A8
tiles) and pi (int32 column sums of the tiles). The engine runs on views into them
(`PackedWeights.views`), so every weight is stored once: a W8A8 linear layer only as its
tiles, which are all that the fused path reads of it (the (K, M) array the unfused kernels
take is rebuilt from them on request, `unpack_vnni`). A float32 linear layer of at least
THREAD_MIN_WEIGHTS weights (GPT-2 small's) in a model without W8A8 layers is stored
transposed, (M, K), kind F32T: the decode step then runs it as the tied head, a dot product
per output, and the outputs a thread computes are one contiguous stream of memory (a (K, M)
weight split by outputs is read in strided pieces of every row); its view is that array's
transpose, the (K, M) weight F-contiguous, which BLAS takes as it is. A weight-only int8 head keeps its
(V, C) rows, which the embedding and the head read; a W8A8 one only the tiles of their
transpose (C, V), from which the embedding gathers a token's row (`unpack_vnni_columns`,
and its twins in the decode steps). An index table `tab` (int64, NCOL columns) says where
each tensor is:

    row ROW_DIMS       the sizes, columns DIM_* below
    row ROW_SCRATCH    the offsets of the decode step's buffers, columns SF_* and SI_*
    rows ROW_WTE, ROW_WPE, ROW_LNF
    then ROWS_PER_LAYER rows per block, in the order of LAYER_ROWS

and a tensor row holds, in its columns: KIND (of a linear layer: F32, INT8 weight-only or
W8A8), K and M (its shape; a LayerNorm has M = C), the element offsets W (float weight),
B (bias), S (scale) in pf, Q (the (K, M) int8 weight of a weight-only layer; -1 in a W8A8
layer's row: not stored) and P (the tiles of a W8A8 layer) in pq, SUM (the column sums) in
pi, and KP, MP: K and M padded to the int8 tile. The head's row ROW_WTE
(K = V, M = C) is F32 (W: wte in pf) or, with an int8 head, INT8 (Q: wte (V, C) in pq, S:
its scale per row in pf) or W8A8 (S, and Q = -1: the rows are not stored; P, SUM, KP, MP of
the transpose (C, V) tiled, which the head's W8A8 sums run on, TILE_M vocabulary entries at
a time, and the embedding reads: wte[v, c] is byte P + (v // TILE_M) * KP * TILE_M +
(c // TILE_K) * TILE_K * TILE_M + (v % TILE_M) * TILE_K + c % TILE_K of pq).

The int8 tile. AVX-512 VNNI `vpdpbusd` adds, in each of 16 int32 lanes, the products of 4
adjacent unsigned bytes by 4 signed bytes; 4 registers make a tile of TILE_M = 64 outputs,
and one group of TILE_K = 4 rows of k is one instruction per register. `pack_vnni` lays a
(K, M) int8 weight out in that operand order (the kernels: int8_tile.h, numba_int8_tile.py).

Rows. The decode step runs n sequences ("rows") at once, each with its own KV cache and
position, in one call: every weight is read once per step for all of them, and each row
computes exactly what it would alone. The engine says which rows run in `ctl` (int64, 3
x R): for the i-th row of the step, ctl[CTL_ROW, i] is its row (which caches), ctl[CTL_TOKEN,
i] its token and ctl[CTL_POS, i] its position.

Scratch. The decode step allocates nothing. Row i of the step works in row i of a float32
array sf (the residual stream x, the LayerNorm output h, a, qkv, the MLP's f and g, the
attention weights, float64 scores and the activation scale of W8A8) and of an int32 array
si (from SI_ACC: the int32 sums of a W8A8 layer; the quantized int8 row; the exp scratch),
at the offsets of the scratch row. Both are indexed by the step's row i, so the rows of a
W8A8 layer's sums are evenly spaced and the int8 tile runs 4 of them per weight pass. Per
sequence (indexed by its row): logits, the caches, the transposed caches kvT (float32
models: attention then runs along the keys, which vectorizes) and `synced`, how many
positions of the cache kvT mirrors. `Buffers` allocates all of them and the prefill's
buffers (one sequence at a time, up to block_size positions).

numba's on-disk cache does not notice a change of this module (see _jit.py): after changing
a constant here, clear kernels/__pycache__.
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------- index table ----
NCOL = 11
KIND, K, M, W, B, S, Q, P, KP, MP, SUM = range(NCOL)  # columns of a tensor row
F32, INT8, W8A8, F32T = 0, 1, 2, 3  # kinds of linear layer (column KIND); F32T: see PackedWeights
ROW_DIMS, ROW_SCRATCH, ROW_WTE, ROW_WPE, ROW_LNF = range(5)
FIRST_LAYER_ROW = 5
LAYER_ROWS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
LN_1, C_ATTN, ATTN_PROJ, LN_2, C_FC, MLP_PROJ = range(len(LAYER_ROWS))
ROWS_PER_LAYER = len(LAYER_ROWS)
# columns of ROW_DIMS: n_layer, d_model, n_head, vocab, block_size, d_ff, the largest
# padded M and K of a W8A8 layer (at least one tile), block_size padded to KEY_PAD
DIM_L, DIM_C, DIM_NH, DIM_V, DIM_BLOCK, DIM_FF, DIM_MP, DIM_KP, DIM_BP = range(9)
# columns of ROW_SCRATCH: offsets (in elements) in a row of sf of x, h, a, qkv, f, g, the
# attention weights, the float64 scores and the W8A8 activation scale; in a row of si of the
# int8 row and of the exp scratch
SF_X, SF_H, SF_A, SF_QKV, SF_F, SF_G, SF_ATT, SF_S64, SF_SX, SI_XQ, SI_EX = range(11)
# rows of ctl, the decode step's control array (int64, 3 x R): per row of the step, the
# sequence (row of the caches and logits), its token and its position
CTL_ROW, CTL_TOKEN, CTL_POS = range(3)

# ---------------------------------------------------------------------------- sizes -----
TILE_K, TILE_M = 4, 64  # the int8 tile: 4 bytes of k per int32 lane, 4 x 16 lanes of m
KEY_PAD = 16  # keys of the transposed cache padded to a multiple of 16 (one zmm of floats)
SI_ACC = 0  # a row of si starts with the int32 sums
ROW_ALIGN = 16  # rows of sf and si: a multiple of 16 elements (64 bytes)
HEAD_CHUNK = 64  # the tied head runs 64 vocabulary rows at a time for all rows of a step
# float decode matmuls (Cython) run a block of outputs at a time for all rows: as many as
# keep every row's outputs of the block in 16 KB of L1 (MATMUL_L1_FLOATS), at least 256.
# One row of GPT-2 small (3,072 outputs) is then one block, which streams each weight
# once in order, rather than in strided 1 KB pieces.
MATMUL_BLOCK, MATMUL_L1_FLOATS = 256, 4096
PACK_TILES = 16  # pack_vnni makes 16 tiles (1,024 outputs) at a time
# with several kernel threads (kernels/_threads.py), a linear layer of at least this many
# weights (and the tied head) is split over them: GPT-2 small's smallest, 768 x 768, is
# 589,824; the default model's largest, 240 x 960, is 230,400, and stays serial
THREAD_MIN_WEIGHTS = 1 << 19


def padded(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def pack_vnni(wq: np.ndarray, out: np.ndarray | None = None,
              colsum: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights (K, M) -> (tiles (Mp/64 * Kp/4 * 64 * 4,) int8, column sums (Mp,) int32).

    Tile t holds outputs 64t .. 64t+63; inside it, group g holds the 4 bytes k = 4g .. 4g+3
    of each output side by side, the operand layout of vpdpbusd. K and M are padded with zero
    weights up to Kp = 4 * ceil(K / 4) and Mp = 64 * ceil(M / 64). The column sums undo the
    +128 that makes activations unsigned: sum_k (xq + 128) w = sum_k xq w + 128 sum_k w.

    wq may be any (K, M) int8 array, a transposed view too. out and colsum, if given, are
    written in place (C-contiguous int8 (Kp * Mp,) and int32 (Mp,)), else allocated. The
    tiles are made PACK_TILES at a time, so the only temporary is one padded piece of
    Kp x 64 * PACK_TILES bytes, never a padded or int32 copy of the whole weight.

    Raises:
        ValueError: a weight is -128, outside the quantizer's [-127, 127], which the AVX2
            and portable tiles cannot multiply exactly (int8_tile.h).
    """
    if wq.size and int(wq.min()) < -127:
        raise ValueError("int8 weights must be in [-127, 127] (the quantizer's range), got -128")
    K_, M_ = wq.shape
    Kp, Mp = padded(K_, TILE_K), padded(M_, TILE_M)
    out = np.empty(Kp * Mp, np.int8) if out is None else out
    colsum = np.empty(Mp, np.int32) if colsum is None else colsum
    assert out.shape == (Kp * Mp,) and colsum.shape == (Mp,)
    tiles = out.reshape(Mp // TILE_M, Kp // TILE_K, TILE_M, TILE_K)  # (t, g, o, i)
    piece = np.zeros((Kp, TILE_M * PACK_TILES), np.int8)  # (Kp, outputs of PACK_TILES tiles)
    for t0 in range(0, Mp // TILE_M, PACK_TILES):
        m0 = t0 * TILE_M
        m1 = min(Mp, m0 + TILE_M * PACK_TILES)  # outputs m0..m1-1 (padded)
        w = piece[:, :m1 - m0]  # (Kp, m1 - m0)
        w[...] = 0
        w[:K_, :max(0, min(M_, m1) - m0)] = wq[:, m0:m1]
        tiles[t0:t0 + (m1 - m0) // TILE_M] = (
            w.reshape(Kp // TILE_K, TILE_K, -1, TILE_M).transpose(2, 0, 3, 1))  # (t, g, o, i)
        w.sum(axis=0, dtype=np.int32, out=colsum[m0:m1])
    return out, colsum


def unpack_vnni(tiles: np.ndarray, K_: int, M_: int) -> np.ndarray:
    """The (K, M) int8 weights `pack_vnni` tiled: a new C-contiguous array (the inverse)."""
    Kp, Mp = padded(K_, TILE_K), padded(M_, TILE_M)
    t = tiles.reshape(Mp // TILE_M, Kp // TILE_K, TILE_M, TILE_K)  # (t, g, o, i)
    return np.ascontiguousarray(t.transpose(1, 3, 0, 2).reshape(Kp, Mp)[:K_, :M_])


def unpack_vnni_columns(tiles: np.ndarray, K_: int, M_: int,
                        cols: np.ndarray | None = None) -> np.ndarray:
    """Columns `cols` (n,) of the (K, M) int8 weights `pack_vnni` tiled, as the rows of a new
    C-contiguous int8 array (n, K); all M columns if cols is None (the transpose (M, K)).

    The W8A8 int8 head tiles wte.T (C, V): its columns are wte's rows, which the embedding
    reads. Column m sits in tile m // TILE_M, at lane m % TILE_M of each group: 4 bytes every
    TILE_K * TILE_M, a strided gather that touches only those bytes.

    Raises:
        ValueError: a column is outside [0, M).
    """
    Kp, Mp = padded(K_, TILE_K), padded(M_, TILE_M)
    cols = np.arange(M_) if cols is None else np.asarray(cols)
    if cols.size and (cols.min() < 0 or cols.max() >= M_):
        raise ValueError(f"columns must be in [0, {M_}), got [{cols.min()}, {cols.max()}]")
    t = tiles.reshape(Mp // TILE_M, Kp // TILE_K, TILE_M, TILE_K)  # (t, g, o, i)
    rows = t[cols // TILE_M, :, cols % TILE_M, :]  # (n, g, i): advanced indices first
    return np.ascontiguousarray(rows.reshape(len(cols), Kp)[:, :K_])


class PackedWeights:
    """A GPT-2 model's inference tensors packed once for the fused kernels.

    Args:
        tensors: {GPT-2 name: array}: float tensors (any float dtype, copied as float32),
            and int8 linear weights with their `<name>.weight_scale` (M,) beside them; wte
            float, or int8 (an int8 head) with `wte_scale` (V,). Each is read once, straight
            into its place in the flat arrays (no other copy is made of it).
        n_layer, n_head: the model's sizes (the rest come from the tensors' shapes).
        int8_mode: "weight-only" or "w8a8", how the int8 linear layers run.
        take: remove each tensor from `tensors` (a dict) once it is copied, so that its
            memory is freed (if nothing else holds it) before the next one is copied: a
            loaded file and its packed copy are never both whole in memory.
    Attributes:
        pf, pq, pi: the flat float32, int8 and int32 arrays; tab: the index table.
        views: {name: view into pf or pq} for every tensor of `tensors` but the weights of
            W8A8 linear layers and a W8A8 int8 head's wte, which are stored only as tiles.
        tiles: {"h.<l>.<linear>": (tiles, column sums)} of the W8A8 layers, and "wte" for a
            W8A8 int8 head (its transpose (C, V) tiled, wte's only copy), views into pq and
            pi (Kp*Mp bytes and Mp int32 per W8A8 layer).
        shapes: {name: (K, M)} of what is tiled, "wte": (C, V) (what `unpack_vnni` and
            `unpack_vnni_columns` need).
        exact: a W8A8 layer exists, so every stage before a quantization must round as the
            unfused kernels do (no transposed-cache attention, no fast GELU).
    """

    def __init__(self, tensors, n_layer: int, n_head: int, int8_mode: str, take: bool = False):
        V, C = tensors["wte"].shape
        block_size = tensors["wpe"].shape[0]
        d_ff = tensors["h.0.mlp.c_fc.bias"].shape[0]
        tab = np.zeros((FIRST_LAYER_ROW + ROWS_PER_LAYER * n_layer, NCOL), np.int64)
        # first the offsets, from the shapes alone; the flat arrays are filled after
        places = {"f": [], "q": []}  # (name, shape, offset) per flat array
        sizes = {"f": 0, "q": 0, "i": 0}

        def put(kind: str, name: str, shape: tuple[int, ...]) -> int:
            off = sizes[kind]
            places[kind].append((name, tuple(shape), off))
            sizes[kind] += int(np.prod(shape))
            return off

        def norm(row: int, name: str) -> None:
            tab[row, M] = C
            tab[row, W] = put("f", name + ".weight", (C,))
            tab[row, B] = put("f", name + ".bias", (C,))

        tiled = []  # (row, name) of the W8A8 layers (and head)
        int8_head = tensors["wte"].dtype == np.int8
        exact = int8_mode == "w8a8" and any(
            t.dtype == np.int8 for n, t in tensors.items() if n == "wte" or n.endswith(".weight"))
        transposed = set()  # the F32T weights: stored (M, K)
        tab[ROW_WTE, [K, M]] = V, C
        if not int8_head:
            tab[ROW_WTE, W] = put("f", "wte", (V, C))
        elif int8_mode == "w8a8":  # the int8 head: wte.T (C, V) tiled, its only copy (below)
            tab[ROW_WTE, [KIND, Q]] = W8A8, -1
            tab[ROW_WTE, S] = put("f", "wte_scale", (V,))
        else:  # the weight-only int8 head: rows of wte with a scale each
            tab[ROW_WTE, [KIND, Q]] = INT8, put("q", "wte", (V, C))
            tab[ROW_WTE, S] = put("f", "wte_scale", (V,))
        tab[ROW_WPE, [K, M, W]] = block_size, C, put("f", "wpe", (block_size, C))
        norm(ROW_LNF, "ln_f")
        self.shapes: dict[str, tuple[int, int]] = {}
        for l in range(n_layer):
            for j, layer in enumerate(LAYER_ROWS):
                row, name = FIRST_LAYER_ROW + l * ROWS_PER_LAYER + j, f"h.{l}.{layer}"
                if layer.startswith("ln"):
                    norm(row, name)
                    continue
                w = tensors[name + ".weight"]
                tab[row, [K, M]] = w.shape
                tab[row, B] = put("f", name + ".bias", (w.shape[1],))
                if w.dtype != np.int8 and (exact or w.size < THREAD_MIN_WEIGHTS):
                    tab[row, [KIND, W]] = F32, put("f", name + ".weight", w.shape)
                    continue
                if w.dtype != np.int8:  # F32T: w.T (M, K) stored, each output's weights a row
                    tab[row, [KIND, W]] = F32T, put("f", name + ".weight", w.shape[::-1])
                    transposed.add(name + ".weight")
                    continue
                tab[row, S] = put("f", name + ".weight_scale", (w.shape[1],))
                if int8_mode == "w8a8":  # the tiles are its only copy (below)
                    tab[row, [KIND, Q]] = W8A8, -1
                    tiled.append((row, name))
                    self.shapes[name] = w.shape
                else:
                    tab[row, [KIND, Q]] = INT8, put("q", name + ".weight", w.shape)
        if int8_head and int8_mode == "w8a8":
            tiled.append((ROW_WTE, "wte"))  # read last in a decode step, so packed last
            self.shapes["wte"] = (C, V)
        for row, name in tiled:  # the tiles last, in the order decode reads them
            Kn, Mn = tab[row, [K, M]] if row != ROW_WTE else (C, V)  # the tiled (K, M)
            tab[row, [KP, MP]] = padded(Kn, TILE_K), padded(Mn, TILE_M)
            tab[row, P] = sizes["q"]
            sizes["q"] += int(tab[row, KP] * tab[row, MP])
            tab[row, SUM] = sizes["i"]
            sizes["i"] += int(tab[row, MP])
        Kp = max(TILE_K, int(tab[:, KP].max()))
        # the sums of a step's rows hold the widest W8A8 layer; the head runs TILE_M
        # vocabulary entries at a time through them
        Mp = max(TILE_M, int(tab[FIRST_LAYER_ROW:, MP].max(initial=0)))
        Bp = padded(block_size, KEY_PAD)
        tab[ROW_DIMS, :DIM_BP + 1] = n_layer, C, n_head, V, block_size, d_ff, Mp, Kp, Bp
        tab[ROW_SCRATCH, :SI_EX + 1] = _scratch_offsets(C, d_ff, n_head, Bp, Mp, Kp)

        self.tab = tab
        self.pf = np.empty(sizes["f"], np.float32)
        self.pq = np.empty(sizes["q"], np.int8)
        self.pi = np.empty(sizes["i"], np.int32)
        self.views: dict[str, np.ndarray] = {}
        for flat, kind in ((self.pf, "f"), (self.pq, "q")):
            for name, shape, off in places[kind]:
                view = flat[off:off + int(np.prod(shape))].reshape(shape)
                if name in transposed:
                    view[...] = tensors[name].T  # (M, K)
                    view = view.T  # the (K, M) weight, F-contiguous: BLAS takes it as it is
                else:
                    view[...] = tensors[name]  # float32 by assignment (as astype does)
                self.views[name] = view
                if take:
                    del tensors[name]
        self.tiles: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for row, name in tiled:
            Kp_, Mp_ = int(tab[row, KP]), int(tab[row, MP])
            out = self.pq[tab[row, P]:tab[row, P] + Kp_ * Mp_]
            colsum = self.pi[tab[row, SUM]:tab[row, SUM] + Mp_]
            key = "wte" if row == ROW_WTE else name + ".weight"
            w = tensors[key].T if row == ROW_WTE else tensors[key]  # (K, M)
            self.tiles[name] = pack_vnni(w, out, colsum)
            if take:
                del w, tensors[key]
        self.exact = exact

    def nbytes(self) -> int:
        """Bytes of pf, pq, pi and the index table."""
        return self.pf.nbytes + self.pq.nbytes + self.pi.nbytes + self.tab.nbytes


def _scratch_offsets(C: int, FF: int, NH: int, Bp: int, Mp: int, Kp: int) -> tuple[int, ...]:
    """The scratch row, columns SF_X .. SI_EX: element offsets in a row of sf and of si.

    sf: x, h, a (C each), qkv (3C), f, g (FF each), attention weights (NH, Bp), then the
    float64 scores (Bp), which start at an even float offset (8-byte aligned: C, FF and Bp
    terms are all even), then the activation scale (1). si: the int32 sums (Mp, from SI_ACC =
    0), the int8 row (Kp bytes, rounded up to 64), then the exp scratch (2 max(FF, Bp), see
    `Buffers`)."""
    sf_x, sf_h, sf_a, sf_qkv = 0, C, 2 * C, 3 * C
    sf_f, sf_g, sf_att = 6 * C, 6 * C + FF, 6 * C + 2 * FF
    sf_s64 = sf_att + NH * Bp
    sf_sx = sf_s64 + 2 * Bp
    si_xq = SI_ACC + Mp
    si_ex = si_xq + padded(Kp, 64) // 4
    return sf_x, sf_h, sf_a, sf_qkv, sf_f, sf_g, sf_att, sf_s64, sf_sx, si_xq, si_ex


class Buffers:
    """Every buffer of the fused path, allocated once for the sizes in an index table.

    decode, for up to `rows` sequences: per row of a step, sf (rows, SFW) float32 and si
    (rows, SIW) int32 (their widths multiples of ROW_ALIGN); per sequence, logits (rows, V),
    kvT (rows, 2, n_layer, C, Bp): the caches transposed, keys (or values) of the cache in
    columns (empty for an exact model, whose attention is the unfused kernel's), synced
    (rows,) int64: the positions kvT mirrors; ctl (3, rows) int64, see the module docstring.
    prefill, one sequence of up to block_size positions T: x, h, a, q (T, C), qkv (T, 3C), f,
    g (T, FF), att (NH * T * T,), xq_rows (T * Kp,) int8, sx (T,), acc_rows (T * Mp,) int32
    (flat: a layer with smaller Kp, Mp takes a (T, Kp), (T, Mp) view of their start) and ex,
    the exp scratch.
    """

    def __init__(self, tab: np.ndarray, exact: bool, rows: int = 1):
        L, C, NH, V, T, FF, Mp, Kp, Bp = (int(v) for v in tab[ROW_DIMS, :DIM_BP + 1])
        sc = tab[ROW_SCRATCH]
        self.rows = rows
        self.sf = np.zeros((rows, padded(sc[SF_SX] + 1, ROW_ALIGN)), np.float32)
        self.si = np.zeros((rows, padded(sc[SI_EX] + 2 * max(FF, Bp), ROW_ALIGN)), np.int32)
        self.logits = np.zeros((rows, V), np.float32)
        self.kvT = np.zeros((rows, 2, L, C, 0 if exact else Bp), np.float32)
        self.synced = np.zeros(rows, np.int64)
        self.ctl = np.zeros((3, rows), np.int64)
        self.x, self.h, self.a, self.q = (np.zeros((T, C), np.float32) for _ in range(4))
        self.qkv = np.zeros((T, 3 * C), np.float32)
        self.f, self.g = np.zeros((T, FF), np.float32), np.zeros((T, FF), np.float32)
        self.att = np.zeros(NH * T * T, np.float32)
        self.xq_rows = np.zeros(T * Kp, np.int8)
        self.sx = np.zeros(T, np.float32)
        self.acc_rows = np.zeros(T * Mp, np.int32)
        self.ex = np.zeros(2 * max(FF, T), np.int32)

    def nbytes(self) -> dict[str, int]:
        """{"kv_cache_transposed": bytes of kvT, "scratch": bytes of every other buffer}."""
        scratch = (self.sf, self.si, self.logits, self.synced, self.ctl, self.x, self.h, self.a,
                   self.q, self.qkv, self.f, self.g, self.att, self.xq_rows, self.sx,
                   self.acc_rows, self.ex)
        return {"kv_cache_transposed": self.kvT.nbytes,
                "scratch": sum(a.nbytes for a in scratch)}
