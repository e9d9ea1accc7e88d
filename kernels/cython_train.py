"""Cython backend, training: `CythonTrainLoops`, the Cython backend's loops with the
training ones (`_cython_train`, compiled by `pip install .` like `_cython_kernels`, in
the build `cython_kernels` picked).

Each training loop is a fused-type entry point of `_cython_train` that picks its float32 or
float64 version from the arguments (a training step makes a few dozen such calls, so the
dispatch costs nothing that matters). If the extension is missing, importing this module
fails with ImportError, which `minitf.kernels.get_backend` turns into a BackendError saying
how to build it.
"""

from __future__ import annotations

from .cython_kernels import TRAIN as _ct  # the build cython_kernels picked for this CPU
from .cython_kernels import CythonLoops


class CythonTrainLoops(CythonLoops):
    """The Cython backend's loops, inference (`cython_kernels.CythonLoops`) and training."""

    REFERENCE_OPS: frozenset[str] = frozenset()  # every op is compiled

    embedding_forward = staticmethod(_ct.embedding_forward)
    embedding_backward = staticmethod(_ct.embedding_backward)
    layernorm_forward = staticmethod(_ct.layernorm_forward)
    layernorm_backward = staticmethod(_ct.layernorm_backward)
    gelu_forward = staticmethod(_ct.gelu_forward)
    gelu_backward = staticmethod(_ct.gelu_backward)
    causal_softmax = staticmethod(_ct.causal_softmax)
    causal_softmax_backward = staticmethod(_ct.causal_softmax_backward)
    cross_entropy_forward = staticmethod(_ct.cross_entropy_forward)
    cross_entropy_backward = staticmethod(_ct.cross_entropy_backward)
    dropout_mask = staticmethod(_ct.dropout_mask)
    dropout = staticmethod(_ct.dropout)
    residual_add = staticmethod(_ct.residual_add)
    global_norm = staticmethod(_ct.global_norm)
    adamw = staticmethod(_ct.adamw)


LOOPS = CythonTrainLoops
