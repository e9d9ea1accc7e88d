# The int8 tile variants of int8_tile.h, for a Cython module: `include "int8_tile.pxi"`
# (with kernels/ on the C and Cython include paths) declares them and
# `int8_variant_status()`. The module then picks one with kernels/_isa.py `choose_variant`.

from libc.stdint cimport int8_t, int32_t

from minitf.kernels import _isa

cdef extern from "int8_tile.h":
    # acc (rows, 64 at a_stride) = exact int32 xq (rows, 4 groups at x_stride) @ a tile
    ctypedef void (*minitf_int8_tile_fn)(int32_t* acc, Py_ssize_t a_stride, const int8_t* xq,
                                         Py_ssize_t x_stride, const int8_t* wp,
                                         const int32_t* wsum, Py_ssize_t groups,
                                         int rows) noexcept nogil
    minitf_int8_tile_fn minitf_int8_tile_variant(int isa) noexcept nogil
    int minitf_isa_status(int isa) noexcept nogil
    int MINITF_ISA_OK, MINITF_ISA_NOT_BUILT


def int8_variant_status():
    """{variant: None if it runs here, else why not}, for every name of _isa.VARIANTS."""
    status = {}
    for isa, name in enumerate(_isa.VARIANTS):
        code = minitf_isa_status(isa)
        if code == MINITF_ISA_OK:
            status[name] = None
        elif code == MINITF_ISA_NOT_BUILT:
            status[name] = "not built for this architecture or compiler"
        else:
            status[name] = (f"this CPU (or its operating system) lacks "
                            f"{' and '.join(_isa.NEEDS[name])}")
    return status
