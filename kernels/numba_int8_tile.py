"""The numba int8 tile: int32 sums of one tile of 64 outputs for 1 or 4 rows of int8
activations, on weights in `layout.pack_vnni`'s order (the Cython twin: int8_tile.h).

    int8_tile(acc, a_off, a_stride, xq, x_stride, wp, w_off, groups, rows)

writes, for r < rows and o < TILE_M (64):

    acc[a_off + r * a_stride + o] =
        sum_{g < groups} sum_{i < 4} (xq[r * x_stride + 4g + i] + 128) * wp[w_off + 256 g + 4 o + i]

acc int32, xq and wp int8 (1-D arrays), rows 1 or 4. The +128 makes the activations
unsigned bytes (xq ^ 0x80 is xq + 128 read as unsigned), which is what `vpdpbusd` takes;
the caller subtracts 128 * (column sum of w). Exact integer arithmetic, so every variant
gives `numpy_ref.matmul_int8_acc`'s sums bit for bit.

With AVX-512 VNNI, `vpdpbusd` multiplies 4 adjacent unsigned bytes by 4 signed bytes and
adds the 4 products to an int32 lane, 64 products per instruction; LLVM does not form it
from loops by itself (it stops at `vpmaddwd`, ~4x slower here), so `_make_dpbusd_tile`
emits it through a numba intrinsic. Without VNNI (or with NUMBA_DISABLE_JIT=1) the plain
loops `int8_tile_loops` compute the same sums.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import binding, ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from ._jit import njit
from .layout import TILE_K, TILE_M

assert TILE_K == 4 and TILE_M % 16 == 0, "vpdpbusd: 4 bytes per lane, 16 lanes per register"
_LANES = 16  # int32 lanes of a zmm register
_VECS = TILE_M // _LANES  # accumulator registers per row
_GROUP = TILE_K * TILE_M  # bytes of one group of k in a tile
_I32xL = ir.VectorType(ir.IntType(32), _LANES)


def _make_dpbusd_tile(rows: int):
    """An intrinsic computing `int8_tile` for `rows` rows with vpdpbusd. The _VECS * rows
    accumulators stay in registers for the whole k loop; each 64-byte weight vector is
    loaded once and used for every row."""

    @intrinsic
    def _dpbusd_tile(typingctx, acc, a_off, a_stride, xq, x_stride, wp, w_off, groups):
        sig = types.void(acc, types.intp, types.intp, xq, types.intp, wp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            acc_a, a_off_v, a_stride_v, xq_a, x_stride_v, wp_a, w_off_v, groups_v = args
            i64, i32 = ir.IntType(64), ir.IntType(32)
            acc_p = context.make_array(signature.args[0])(context, builder, acc_a).data
            xq_p = context.make_array(signature.args[3])(context, builder, xq_a).data
            wp_p = context.make_array(signature.args[5])(context, builder, wp_a).data
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_I32xL, [_I32xL] * 3), "llvm.x86.avx512.vpdpbusd.512")
            zero = ir.Constant(_I32xL, [0] * _LANES)
            flip = ir.Constant(i32, 0x80808080 - 2**32)  # xq ^ 0x80 = xq + 128 read as unsigned
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(_VECS)] for _ in range(rows)]
            w_base = builder.gep(wp_p, [w_off_v])
            with cgutils.for_range(builder, groups_v) as loop:
                g = loop.index
                w_g = builder.bitcast(builder.gep(w_base, [builder.mul(g, ir.Constant(i64, _GROUP))]),
                                      _I32xL.as_pointer())
                wv = [builder.load(builder.gep(w_g, [ir.Constant(i64, t)]), align=1) for t in range(_VECS)]
                for r in range(rows):
                    x_at = builder.add(builder.mul(ir.Constant(i64, r), x_stride_v),
                                       builder.mul(g, ir.Constant(i64, TILE_K)))
                    x4 = builder.load(builder.bitcast(builder.gep(xq_p, [x_at]), i32.as_pointer()), align=1)
                    # (on the scalar: LLVM 22 never finishes compiling a vector xor feeding vpdpbusd)
                    x4 = builder.xor(x4, flip)
                    xb = builder.insert_element(ir.Constant(_I32xL, None), x4, ir.Constant(i32, 0))
                    xb = builder.shuffle_vector(xb, ir.Constant(_I32xL, None), ir.Constant(_I32xL, [0] * _LANES))
                    for t in range(_VECS):
                        builder.store(builder.call(fn, [builder.load(accs[r][t]), xb, wv[t]]), accs[r][t])
            for r in range(rows):
                at = builder.add(a_off_v, builder.mul(ir.Constant(i64, r), a_stride_v))
                out = builder.bitcast(builder.gep(acc_p, [at]), _I32xL.as_pointer())
                for t in range(_VECS):
                    builder.store(builder.load(accs[r][t]), builder.gep(out, [ir.Constant(i64, t)]), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return _dpbusd_tile


@njit
def int8_tile_loops(acc, a_off, a_stride, xq, x_stride, wp, w_off, groups, rows):
    """`int8_tile` as plain loops (no VNNI, or NUMBA_DISABLE_JIT=1)."""
    for r in range(rows):
        for o in range(TILE_M):
            s = np.int32(0)
            for g in range(groups):
                for i in range(TILE_K):
                    a = np.int32(xq[r * x_stride + TILE_K * g + i]) + np.int32(128)
                    s += a * np.int32(wp[w_off + g * _GROUP + TILE_K * o + i])
            acc[a_off + r * a_stride + o] = s


HAS_VNNI = ("+avx512vnni" in binding.get_host_cpu_features().flatten().split(",")
            and not numba.config.DISABLE_JIT)
if HAS_VNNI:
    _tile_1 = _make_dpbusd_tile(1)
    _tile_4 = _make_dpbusd_tile(4)

    @njit
    def int8_tile(acc, a_off, a_stride, xq, x_stride, wp, w_off, groups, rows):
        """acc tile (rows x 64) = (xq + 128) @ packed weights; rows is 1 or 4."""
        if rows == 4:
            _tile_4(acc, a_off, a_stride, xq, x_stride, wp, w_off, groups)
        else:
            _tile_1(acc, a_off, a_stride, xq, x_stride, wp, w_off, groups)
else:
    int8_tile = int8_tile_loops
