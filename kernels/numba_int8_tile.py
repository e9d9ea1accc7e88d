"""The numba int8 tile (the Cython twin: int8_tile.h): the int8 x int8 tile sums of the W8A8
matmuls, for every CPU.

`int8_tile(acc, a_off, a_stride, xq, x_stride, wp, w_off, wsum, s_off, groups, rows)` sums
one tile of 64 outputs for rows = 1 or 4 rows of activations, on weights packed by
kernels/layout.py `pack_vnni` ((M/64, K/4, 64, 4): for a tile of 64 outputs, the 4 bytes of
k = 4g .. 4g+3 of each output side by side, each tile one contiguous stream):

    acc[a_off + r * a_stride + o] = sum_{k < 4 groups} xq[r * x_stride + k] * w[k, o]

where w[k, o] = wp[w_off + 256 (k // 4) + 4 o + k % 4] and wsum[s_off:s_off + 64] holds the
tile's column sums (pack_vnni's `colsum`; only the VNNI variant reads it). acc, wsum int32;
xq, wp int8 (1-D). The result is the exact int32 sum, equal to `numpy_ref.matmul_int8_acc`
bit for bit, for xq in [-128, 127], weights in [-127, 127] (the quantizer's range) and
K <= 131071. The contract,
layout and variants are those of the Cython backend's kernels/int8_tile.h (read it for the
arithmetic); one of three runs, chosen at import (`INT8_ISA`):

- "avx512vnni": vpdpbusd through a numba intrinsic (LLVM does not form it from loops). x
  enters as x ^ 0x80 = x + 128, unsigned, and the accumulators start at -128 * wsum;
- "avx2": vpsignb / vpmaddubsw / vpmaddwd through an intrinsic: |x| times sign(x) w, the
  int16 pairs cannot saturate (2 * 128 * 127 < 2^15), then pairs of pairs in int32;
- "portable": plain loops that LLVM vectorizes for whatever CPU numba targets.

The choice is the fastest variant the CPU numba compiles for runs (its LLVM features:
$NUMBA_CPU_FEATURES if set, else the host's), unless $MINITF_ISA forces one
(kernels/_isa.py). With NUMBA_DISABLE_JIT=1 only "portable" runs (intrinsics need LLVM).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import binding, ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from . import _isa
from ._jit import njit
from .layout import TILE_K, TILE_M

assert TILE_K == 4 and TILE_M == 64, "the intrinsics are written for 4 x 64 tiles"
TILE = TILE_M  # outputs per tile
_GROUP = TILE_K * TILE  # bytes of one group of 4 k of a tile

_I8x32 = ir.VectorType(ir.IntType(8), 32)
_I16x16 = ir.VectorType(ir.IntType(16), 16)
_I32x8 = ir.VectorType(ir.IntType(32), 8)
_I32x16 = ir.VectorType(ir.IntType(32), 16)
_I32, _I64 = ir.IntType(32), ir.IntType(64)


def _cpu_features() -> set[str]:
    """The LLVM features numba compiles for (as numba's codegen picks them)."""
    features = numba.config.CPU_FEATURES or binding.get_host_cpu_features().flatten()
    return {f[1:] for f in features.split(",") if f.startswith("+")}


def variant_status() -> dict[str, str | None]:
    """{variant: None if it runs here, else why not}, for every name of _isa.VARIANTS."""
    jit_off = "NUMBA_DISABLE_JIT=1 (intrinsics need compiled code)" if numba.config.DISABLE_JIT else None
    features = _cpu_features()
    return {name: None if name == "portable" else jit_off or _isa.lacks(name, features)
            for name in _isa.VARIANTS}


# --------------------------------------------------------------- intrinsic helpers ------


def _data(context, builder, ty, value):
    """The data pointer of array argument `value` of numba type `ty`."""
    return context.make_array(ty)(context, builder, value).data


def _broadcast_i32(builder, value, vec_type):
    """A vector of type vec_type (of i32) with every lane `value`."""
    v = builder.insert_element(ir.Constant(vec_type, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vec_type, None),
                                  ir.Constant(vec_type, [0] * vec_type.count))


def _load_vectors(builder, base, vec_type, count):
    """count vectors of vec_type read one after the other from i8* base (unaligned)."""
    p = builder.bitcast(base, vec_type.as_pointer())
    return [builder.load(builder.gep(p, [ir.Constant(_I64, t)]), align=1) for t in range(count)]


def _store_vectors(builder, base, vectors):
    """Store vectors one after the other at i32* base (unaligned)."""
    p = builder.bitcast(base, vectors[0].type.as_pointer())
    for t, v in enumerate(vectors):
        builder.store(v, builder.gep(p, [ir.Constant(_I64, t)]), align=4)


def _load_x4(builder, xq_p, at):
    """The 4 bytes xq[at .. at+3] as one i32."""
    return builder.load(builder.bitcast(builder.gep(xq_p, [at]), _I32.as_pointer()), align=1)


# --------------------------------------------------------------------- AVX-512 VNNI -----


def _make_vnni_tile(rows: int):
    """An intrinsic summing one tile for `rows` rows with vpdpbusd:
    _vnni_tile(acc, a_off, a_stride, xq, x_stride, wp, w_off, wsum, s_off, groups).

    The 4 * rows accumulators (16 lanes each) stay in registers for the whole k loop and
    start at -128 * wsum[s_off:s_off + 64]; each 64-byte weight vector is loaded once and
    used for every row."""

    @intrinsic
    def _vnni_tile(typingctx, acc, a_off, a_stride, xq, x_stride, wp, w_off, wsum, s_off, groups):
        sig = types.void(acc, types.intp, types.intp, xq, types.intp, wp, types.intp, wsum,
                         types.intp, types.intp)

        def codegen(context, builder, signature, args):
            acc_a, a_off_v, a_stride_v, xq_a, x_stride_v, wp_a, w_off_v, ws_a, s_off_v, groups_v = args
            acc_p = _data(context, builder, signature.args[0], acc_a)
            xq_p = _data(context, builder, signature.args[3], xq_a)
            wp_p = _data(context, builder, signature.args[5], wp_a)
            ws_p = _data(context, builder, signature.args[7], ws_a)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_I32x16, [_I32x16] * 3), "llvm.x86.avx512.vpdpbusd.512")
            zero = ir.Constant(_I32x16, [0] * 16)
            seven = ir.Constant(_I32x16, [7] * 16)
            ws = _load_vectors(builder, builder.bitcast(builder.gep(ws_p, [s_off_v]), ir.IntType(8).as_pointer()),
                               _I32x16, 4)
            start = [builder.sub(zero, builder.shl(w, seven)) for w in ws]  # -128 * wsum
            accs = [[cgutils.alloca_once_value(builder, start[t]) for t in range(4)] for _ in range(rows)]
            flip = ir.Constant(_I32, 0x80808080 - 2**32)  # x ^ 0x80 = x + 128 read as unsigned
            w_base = builder.gep(wp_p, [w_off_v])
            with cgutils.for_range(builder, groups_v) as loop:
                g = loop.index
                wv = _load_vectors(builder, builder.gep(w_base, [builder.mul(g, ir.Constant(_I64, _GROUP))]),
                                   _I32x16, 4)
                for r in range(rows):
                    at = builder.add(builder.mul(ir.Constant(_I64, r), x_stride_v),
                                     builder.mul(g, ir.Constant(_I64, 4)))
                    # the xor on the scalar: LLVM 22 never finishes compiling a vector xor
                    # feeding vpdpbusd
                    xb = _broadcast_i32(builder, builder.xor(_load_x4(builder, xq_p, at), flip), _I32x16)
                    for t in range(4):
                        builder.store(builder.call(fn, [builder.load(accs[r][t]), xb, wv[t]]), accs[r][t])
            for r in range(rows):
                at = builder.add(a_off_v, builder.mul(ir.Constant(_I64, r), a_stride_v))
                _store_vectors(builder, builder.gep(acc_p, [at]), [builder.load(a) for a in accs[r]])
            return context.get_dummy_value()

        return sig, codegen

    return _vnni_tile


# ----------------------------------------------------------------------------- AVX2 -----


@intrinsic
def _avx2_row(typingctx, acc, a_off, xq, x_off, wp, w_off, groups):
    """acc[a_off:a_off + 64] = xq[x_off:x_off + 4 groups] @ the tile at wp[w_off:]: one row,
    8 accumulators of 8 lanes in registers for the whole k loop."""
    sig = types.void(acc, types.intp, xq, types.intp, wp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        acc_a, a_off_v, xq_a, x_off_v, wp_a, w_off_v, groups_v = args
        acc_p = _data(context, builder, signature.args[0], acc_a)
        xq_p = _data(context, builder, signature.args[2], xq_a)
        wp_p = _data(context, builder, signature.args[4], wp_a)
        mod = builder.module
        sign = cgutils.get_or_insert_function(mod, ir.FunctionType(_I8x32, [_I8x32] * 2), "llvm.x86.avx2.psign.b")
        maddubs = cgutils.get_or_insert_function(mod, ir.FunctionType(_I16x16, [_I8x32] * 2),
                                                 "llvm.x86.avx2.pmadd.ub.sw")
        madd = cgutils.get_or_insert_function(mod, ir.FunctionType(_I32x8, [_I16x16] * 2), "llvm.x86.avx2.pmadd.wd")
        absb = cgutils.get_or_insert_function(mod, ir.FunctionType(_I8x32, [_I8x32, ir.IntType(1)]),
                                              "llvm.abs.v32i8")
        ones = ir.Constant(_I16x16, [1] * 16)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_I32x8, [0] * 8)) for _ in range(8)]
        w_base = builder.gep(wp_p, [w_off_v])
        with cgutils.for_range(builder, groups_v) as loop:
            g = loop.index
            x4 = _load_x4(builder, xq_p, builder.add(x_off_v, builder.mul(g, ir.Constant(_I64, 4))))
            sx = builder.bitcast(_broadcast_i32(builder, x4, _I32x8), _I8x32)  # x's 4 bytes, per output
            ax = builder.call(absb, [sx, ir.Constant(ir.IntType(1), 0)])  # |x| as unsigned: -128 -> 128
            wv = _load_vectors(builder, builder.gep(w_base, [builder.mul(g, ir.Constant(_I64, _GROUP))]),
                               _I8x32, 8)
            for j in range(8):
                p = builder.call(maddubs, [ax, builder.call(sign, [wv[j], sx])])  # |x| * sign(x) w
                builder.store(builder.add(builder.load(accs[j]), builder.call(madd, [p, ones])), accs[j])
        _store_vectors(builder, builder.gep(acc_p, [a_off_v]), [builder.load(a) for a in accs])
        return context.get_dummy_value()

    return sig, codegen


# ------------------------------------------------------------------------- portable -----


@njit
def _portable_tile(acc, a_off, a_stride, xq, x_stride, wp, w_off, wsum, s_off, groups, rows):
    """The sums of the tile as plain loops (any CPU, and NUMBA_DISABLE_JIT=1).

    Group by group, each of the 64 outputs adds its 4 products; LLVM vectorizes the loop
    over outputs (the stride-4 weights as one interleaved group): 15 Gprod/s measured on
    Zen 4, against 1-2 for the same loop indexing the whole arrays at offsets or a 3-D
    reshape of them (scalar or scattered stores), hence the per-group view."""
    w = wp[w_off:w_off + groups * _GROUP]
    for r in range(rows):
        a = acc[a_off + r * a_stride:a_off + r * a_stride + TILE]
        x = xq[r * x_stride:r * x_stride + 4 * groups]
        for o in range(TILE):
            a[o] = 0
        for g in range(groups):
            x0, x1 = np.int32(x[4 * g]), np.int32(x[4 * g + 1])
            x2, x3 = np.int32(x[4 * g + 2]), np.int32(x[4 * g + 3])
            wg = w[g * _GROUP:(g + 1) * _GROUP]
            for o in range(TILE):
                a[o] += (x0 * np.int32(wg[4 * o]) + x1 * np.int32(wg[4 * o + 1])
                         + x2 * np.int32(wg[4 * o + 2]) + x3 * np.int32(wg[4 * o + 3]))


# ---------------------------------------------------------------------------- tiles -----

_vnni_1, _vnni_4 = _make_vnni_tile(1), _make_vnni_tile(4)


@njit
def _vnni_tile(acc, a_off, a_stride, xq, x_stride, wp, w_off, wsum, s_off, groups, rows):
    """The tile with vpdpbusd (rows 1 or 4)."""
    if rows == 4:
        _vnni_4(acc, a_off, a_stride, xq, x_stride, wp, w_off, wsum, s_off, groups)
    else:
        _vnni_1(acc, a_off, a_stride, xq, x_stride, wp, w_off, wsum, s_off, groups)


@njit
def _avx2_tile(acc, a_off, a_stride, xq, x_stride, wp, w_off, wsum, s_off, groups, rows):
    """The tile with vpmaddubsw, a row at a time (rows 1 or 4): blocking rows gains
    nothing, the multiplies being the limit (measured, kernels/int8_tile.h)."""
    for r in range(rows):
        _avx2_row(acc, a_off + r * a_stride, xq, r * x_stride, wp, w_off, groups)


CPU_NAME = numba.config.CPU_NAME or binding.get_host_cpu_name()  # what numba compiles for
TILES = {"portable": _portable_tile, "avx2": _avx2_tile, "avx512vnni": _vnni_tile}
INT8_STATUS = variant_status()  # {variant: None, or why it cannot run here}
INT8_ISA = _isa.choose_variant(INT8_STATUS, "numba")  # the variant int8_tile runs
int8_tile = TILES[INT8_ISA]  # the signature of every TILES entry: see the module docstring
