"""Cython backend: `CythonLoops`, the table `Backend` calls the compiled loops by.

The checked public functions are `backend.Backend`'s (`get_backend("cython")`). The loops
are the entry points of `_cython_kernels`, compiled ahead of time by `pip install .` (or
`pip install -e .` in a checkout). They come in a `_f32` and a `_f64` version where both
dtypes are supported, and the functions here pick one by dtype (cheaper than Cython's
fused-type dispatch on every call). If the extension is missing, importing this module
fails with ImportError, which `minitf.kernels.get_backend` turns into a BackendError that
says why and how to build it. There is no pure-Python fallback.

Builds. On x86-64 the extension modules exist twice (setup.py): the baseline set
`_cython_kernels` / `_cython_fused` / `_cython_train`, which runs on every x86-64 CPU, and
the x86-64-v3 set with the suffix `_v3`. The baseline fused module, safe to import
anywhere, tells whether this CPU runs v3 code; `_isa.cython_suffix` picks the set (the
"pair" of its messages), and its modules are used together (`FUSED` is the fused path's
module, `TRAIN` the training loops'), so the fused path rounds exactly as these loops do.
"""

from __future__ import annotations

import importlib
import importlib.util

from . import _cython_fused as _baseline  # any CPU of the architecture runs it
from . import _isa
from ._checks import F32
from .numpy_loops import ReferenceLoops

_HAS_V3 = importlib.util.find_spec(f"{__package__}._cython_kernels{_isa.V3_SUFFIX}") is not None
SUFFIX, WHY = _isa.cython_suffix(_baseline.CPU_RUNS_X86_64_V3, _HAS_V3)  # the pair, and why
_ck = importlib.import_module(f"{__package__}._cython_kernels{SUFFIX}")
FUSED = importlib.import_module(f"{__package__}._cython_fused{SUFFIX}")  # the fused path
TRAIN = importlib.import_module(f"{__package__}._cython_train{SUFFIX}")  # training loops
BUILD = FUSED.BUILD  # what the pair was compiled for: x86-64, x86-64-v3, native, aarch64


def _matmul(y, x, w, bias):
    (_ck.matmul_f32 if x.dtype == F32 else _ck.matmul_f64)(y, x, w, bias)


def _matmul_nt(y, x, w):
    (_ck.matmul_nt_f32 if x.dtype == F32 else _ck.matmul_nt_f64)(y, x, w)


def _softmax(y, x):
    (_ck.softmax_f32 if x.dtype == F32 else _ck.softmax_f64)(y, x)


def _layernorm(y, x, weight, bias, eps):
    (_ck.layernorm_f32 if x.dtype == F32 else _ck.layernorm_f64)(y, x, weight, bias, eps)


def _gelu(y, x):
    (_ck.gelu_f32 if x.dtype == F32 else _ck.gelu_f64)(y, x)


def _attention(out, att, q, k, v, n_head, scale):
    (_ck.attention_f32 if q.dtype == F32 else _ck.attention_f64)(out, att, q, k, v, n_head, scale)


class CythonLoops(ReferenceLoops):
    """The loops of the Cython backend (signatures: `numpy_loops.ReferenceLoops`)."""

    REFERENCE_OPS: frozenset[str] = frozenset()  # every op is compiled

    matmul = staticmethod(_matmul)
    matmul_nt = staticmethod(_matmul_nt)
    quantize_rows = staticmethod(_ck.quantize_rows)
    matmul_int8_acc = staticmethod(_ck.matmul_int8_acc)
    matmul_int8_weight_only = staticmethod(_ck.matmul_int8_weight_only)
    matmul_w8a8 = staticmethod(_ck.matmul_w8a8)
    matmul_nt_int8_weight_only = staticmethod(_ck.matmul_nt_int8_weight_only)
    matmul_nt_w8a8 = staticmethod(_ck.matmul_nt_w8a8)
    softmax = staticmethod(_softmax)
    layernorm = staticmethod(_layernorm)
    gelu = staticmethod(_gelu)
    attention = staticmethod(_attention)


LOOPS = CythonLoops
