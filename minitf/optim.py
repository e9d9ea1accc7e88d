"""AdamW, global-norm gradient clipping and the warmup + cosine learning-rate schedule.

The update follows Loshchilov & Hutter 2019 (decoupled weight decay) exactly as
`torch.optim.AdamW` computes it (`minitf.kernels.numpy_ref.adamw` is the formula), so the
tests can compare step by step with PyTorch. The optimizer keeps parameters, gradients and
moments in flat buffers, and a step is one pass of a kernel backend over them.
Weight decay applies to 2-D tensors only (embeddings and linear weights), never to biases or
LayerNorm parameters, as nanoGPT does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .kernels import get_backend


def decays(name: str, shape: tuple[int, ...]) -> bool:
    """True for the tensors that get weight decay: every 2-D one (wte, wpe, linear weights)."""
    return len(shape) == 2


class AdamW:
    """AdamW over a `{name: array}` parameter dict, on flat buffers, updated in place.

    The parameters move into one contiguous buffer, `flat_params` (P,), the tensors that
    get weight decay first (the first `n_decay` elements): afterwards every `params[name]`
    is a view into it (the dict is updated in place, so a model holding the same dict works
    on the views). The gradients (`grads`, views into `flat_grads`) and the two moments
    (`m`, `v`, views into `flat_m`, `flat_v`) have the same layout. A step is one pass of
    the backend's `adamw` over the four buffers, and `grad_norm` one pass over
    `flat_grads`: nothing parameter-sized is allocated per step, and a data-parallel run
    sums the gradients of every process with one reduction of `flat_grads`.

    Args:
        params: the model's parameters, all float32 or all float64 (moved as above).
        lr: default learning rate; `step` may pass the scheduled one.
        betas: (beta1, beta2) moment decay rates.
        eps: added to sqrt of the bias-corrected second moment.
        weight_decay: decoupled decay coefficient for 2-D tensors.
        ops: the kernel backend that runs the passes (`get_backend(name)`); default numpy.
    Raises:
        ValueError: a hyperparameter is out of its range, or the parameters mix dtypes.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                 ops=None):
        if not lr >= 0:
            raise ValueError(f"learning rate {lr} must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas {betas} must each be in [0, 1)")
        if not eps > 0:
            raise ValueError(f"eps {eps} must be > 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay {weight_decay} must be >= 0")
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"parameters must share one float dtype, got {sorted(map(str, dtypes))}")
        self.ops = get_backend("numpy") if ops is None else ops
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        # the decayed tensors first, so that weight decay covers one prefix of the buffer
        order = sorted(params, key=lambda n: not decays(n, params[n].shape))  # stable
        sizes = {n: params[n].size for n in order}
        self.n_decay = sum(sizes[n] for n in order if decays(n, params[n].shape))
        dtype = dtypes.pop()
        P = sum(sizes.values())
        self.flat_params = np.empty(P, dtype=dtype)
        self.flat_grads, self.flat_m, self.flat_v = (np.zeros(P, dtype=dtype) for _ in range(3))
        self._offsets, start = {}, 0
        for n in order:
            self._offsets[n] = slice(start, start + sizes[n])
            start += sizes[n]
        self._shapes = {n: params[n].shape for n in params}
        self.grads = self.views(self.flat_grads)  # in the params' order
        self.m = self.views(self.flat_m)  # first moments
        self.v = self.views(self.flat_v)  # second moments
        for n in params:
            self.flat_params[self._offsets[n]] = params[n].reshape(-1)
        params.update(self.views(self.flat_params))
        self.params = params
        self.t = 0  # number of steps taken

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """{name: view} of a (P,) buffer laid out as `flat_params` (e.g. another process's or
        thread's gradients, to be summed into `flat_grads`)."""
        return {n: flat[self._offsets[n]].reshape(shape) for n, shape in self._shapes.items()}

    def grad_norm(self) -> float:
        """The global L2 norm of the gradients in `flat_grads` (inf or nan if one is not
        finite): one pass."""
        return self.ops.global_norm(self.flat_grads)

    def step(self, grads: dict[str, np.ndarray] | None = None, lr: float | None = None,
             grad_scale: float = 1.0) -> None:
        """One AdamW update of every parameter, one pass over the flat buffers.

        Args:
            grads: None to use `grads` (what a backward wrote there), or `{name: array}`
                with the parameters' names and shapes, copied into the flat buffer first.
            lr: this step's learning rate (default: the constructor's).
            grad_scale: multiplies the gradients first: the clipping coefficient
                (`clip_coefficient`), folded into the update's pass.
        """
        if grads is not None and grads is not self.grads:
            for name, g in grads.items():
                self.grads[name][...] = g
        lr = self.lr if lr is None else lr
        beta1, beta2 = self.betas
        self.t += 1
        state = (self.flat_params, self.flat_m, self.flat_v)
        self.ops.adamw(self.flat_params, self.flat_grads, self.flat_m, self.flat_v, self.n_decay,
                       lr, beta1, beta2, self.eps, self.weight_decay, self.t, grad_scale,
                       out=state)

    def state_dict(self) -> dict:
        """{"m": {name: first moment}, "v": {name: second moment}, "step": steps taken}, the
        arrays themselves (views, not copies): the optimizer state a checkpoint stores."""
        return {"m": self.m, "v": self.v, "step": self.t}

    def load_state_dict(self, state: dict) -> None:
        """Restore the moments and the step count saved by `state_dict` (copied into the
        flat buffers).

        Raises:
            ValueError: a moment is missing or has the wrong shape.
            KeyError: state has no "m", "v" or "step".
        """
        for kind, store in (("m", self.m), ("v", self.v)):
            moments = state[kind]
            for n, p in self.params.items():
                if n not in moments:
                    raise ValueError(f"optimizer state is missing {kind}.{n}")
                if moments[n].shape != p.shape:
                    raise ValueError(f"optimizer state {kind}.{n} has shape {moments[n].shape}, "
                                     f"expected {p.shape}")
                store[n][...] = moments[n]
        self.t = int(state["step"])


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor global-norm clipping scales the gradients by, as
    `torch.nn.utils.clip_grad_norm_`: max_norm / (norm + 1e-6), clamped to 1."""
    return min(max_norm / (norm + 1e-6), 1.0)


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float = 1.0) -> float:
    """Scale all gradients in place so their global L2 norm is at most `max_norm`
    (`clip_coefficient`), on a `{name: array}` dict.

    Returns:
        The global norm before clipping (inf or NaN if a gradient is not finite).
    """
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    coef = clip_coefficient(total, max_norm)
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return total


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup, then cosine decay to `min_lr`, then constant (as nanoGPT's get_lr).

    lr(it) = max_lr * (it + 1) / (warmup + 1)                     for it < warmup
           = min_lr + 0.5 (1 + cos(pi * r)) (max_lr - min_lr)       r = (it - warmup) / (decay_steps - warmup)
           = min_lr                                                  for it > decay_steps
    """

    max_lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # floor reached at decay_steps
    warmup: int = 100  # steps of linear warmup
    decay_steps: int = 2000  # step at which the cosine reaches min_lr

    def __post_init__(self):
        if not (0 <= self.min_lr <= self.max_lr):
            raise ValueError(f"need 0 <= min_lr ({self.min_lr}) <= max_lr ({self.max_lr})")
        if self.warmup < 0 or self.decay_steps < 0:
            raise ValueError(f"warmup ({self.warmup}) and decay_steps ({self.decay_steps}) must be >= 0")

    def __call__(self, it: int) -> float:
        if it < self.warmup:
            return self.max_lr * (it + 1) / (self.warmup + 1)
        if it > self.decay_steps or self.decay_steps <= self.warmup:
            return self.min_lr
        ratio = (it - self.warmup) / (self.decay_steps - self.warmup)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.max_lr - self.min_lr)
