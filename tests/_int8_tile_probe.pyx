# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""The variants of kernels/int8_tile.h, callable from Python: a test extension, built by
tests/int8_probe.py (not by setup.py) until the fused modules include the header.

It chooses its variant at import as a fused module would (`INT8_ISA`, from $MINITF_ISA
through kernels/_isa.py), and runs any variant by name for the tests.
"""

include "int8_tile.pxi"

cdef enum:
    TILE = 64  # MINITF_TILE: outputs per tile

INT8_STATUS = int8_variant_status()
INT8_ISA = _isa.choose_variant(INT8_STATUS, "cython")


cdef minitf_int8_tile_fn _variant(str name) except NULL:
    if name not in _isa.VARIANTS or INT8_STATUS[name] is not None:
        raise ValueError(f"int8 tile variant {name!r} does not run here: {INT8_STATUS.get(name)}")
    return minitf_int8_tile_variant(_isa.VARIANTS.index(name))


def matmul_acc(str name, int32_t[:, ::1] acc, const int8_t[:, ::1] xq, const int8_t[::1] wp,
               const int32_t[::1] wsum, Py_ssize_t repeats=1):
    """acc (N, Mp) int32 = xq (N, Kp) int8 @ the packed weights wp (engine.pack_vnni, with
    its column sums wsum (Mp,)), exact, with variant `name` ("auto": INT8_ISA): 4 rows per
    pass over the weights, then single rows, as the fused W8A8 prefill runs them. The whole
    product is computed `repeats` times (for timing without Python in the loop)."""
    cdef minitf_int8_tile_fn tile = _variant(INT8_ISA if name == "auto" else name)
    cdef Py_ssize_t N = xq.shape[0], Kp = xq.shape[1], Mp = wsum.shape[0]
    cdef Py_ssize_t groups = Kp // 4, n, t, rep
    cdef int rows
    if acc.shape[0] != N or acc.shape[1] != Mp or wp.shape[0] != Kp * Mp or Kp % 4 or Mp % TILE:
        raise ValueError(f"shapes: acc {tuple(acc.shape)[:2]}, xq ({N}, {Kp}), wp "
                         f"({wp.shape[0]},), wsum ({Mp},) do not fit a packed (Kp, Mp) matrix")
    if N == 0:
        return
    with nogil:
        for rep in range(repeats):
            n = 0
            while n < N:
                rows = 4 if n + 4 <= N else 1
                for t in range(Mp // TILE):
                    tile(&acc[n, t * TILE], Mp, &xq[n, 0], Kp, &wp[t * groups * 4 * TILE],
                         &wsum[t * TILE], groups, rows)
                n += rows


def tile_acc(str name, int32_t[::1] acc, const int8_t[::1] xq, const int8_t[::1] wp,
             const int32_t[::1] wsum, Py_ssize_t groups, int rows, Py_ssize_t repeats=1):
    """One tile: acc (rows * 64,) = xq (rows * 4 groups,) @ the tile wp (256 groups,), wsum
    (64,), with variant `name`, `repeats` times."""
    cdef minitf_int8_tile_fn tile = _variant(INT8_ISA if name == "auto" else name)
    cdef Py_ssize_t rep
    if (rows not in (1, 4) or acc.shape[0] < rows * TILE or xq.shape[0] < rows * 4 * groups
            or wp.shape[0] < groups * 4 * TILE or wsum.shape[0] < TILE):
        raise ValueError("tile_acc: rows must be 1 or 4 and the arrays hold one tile")
    with nogil:
        for rep in range(repeats):
            tile(&acc[0], TILE, &xq[0], 4 * groups, &wp[0], &wsum[0], groups, rows)
