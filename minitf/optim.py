"""AdamW, global-norm gradient clipping and the warmup + cosine learning-rate schedule.

The update follows Loshchilov & Hutter 2019 (decoupled weight decay) exactly as
`torch.optim.AdamW` computes it, so the tests can compare step by step with PyTorch.
Weight decay applies to 2-D tensors only (embeddings and linear weights), never to biases or
LayerNorm parameters, as nanoGPT does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def decays(name: str, shape: tuple[int, ...]) -> bool:
    """True for the tensors that get weight decay: every 2-D one (wte, wpe, linear weights)."""
    return len(shape) == 2


class AdamW:
    """AdamW over a `{name: array}` parameter dict, updated in place.

    Args:
        params: the model's parameters (float32 or float64 arrays, updated in place).
        lr: default learning rate; `step` may pass the scheduled one.
        betas: (beta1, beta2) moment decay rates.
        eps: added to sqrt of the bias-corrected second moment.
        weight_decay: decoupled decay coefficient for 2-D tensors.
    Raises:
        ValueError: a hyperparameter is out of its range.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1):
        if not lr >= 0:
            raise ValueError(f"learning rate {lr} must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas {betas} must each be in [0, 1)")
        if not eps > 0:
            raise ValueError(f"eps {eps} must be > 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay {weight_decay} must be >= 0")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.m = {n: np.zeros_like(p) for n, p in params.items()}  # first moments
        self.v = {n: np.zeros_like(p) for n, p in params.items()}  # second moments
        self.t = 0  # number of steps taken

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """One AdamW update of every parameter from `grads` (same names and shapes)."""
        lr = self.lr if lr is None else lr
        beta1, beta2 = self.betas
        self.t += 1
        bias1 = 1.0 - beta1**self.t
        bias2 = 1.0 - beta2**self.t
        for name, p in self.params.items():
            g = grads[name]
            if self.weight_decay and decays(name, p.shape):
                p *= 1.0 - lr * self.weight_decay  # decoupled: shrink before the Adam step
            m, v = self.m[name], self.v[name]
            m *= beta1
            m += (1.0 - beta1) * g
            v *= beta2
            v += (1.0 - beta2) * (g * g)
            denom = np.sqrt(v) / math.sqrt(bias2) + self.eps
            p -= (lr / bias1) * (m / denom)

    def state_dict(self) -> dict:
        """{"m": {name: first moment}, "v": {name: second moment}, "step": steps taken}, the
        arrays themselves (not copies): the optimizer state a checkpoint stores."""
        return {"m": self.m, "v": self.v, "step": self.t}

    def load_state_dict(self, state: dict) -> None:
        """Restore the moments and the step count saved by `state_dict`.

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
                store[n] = np.array(moments[n], dtype=p.dtype)
        self.t = int(state["step"])


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float = 1.0) -> float:
    """Scale all gradients in place so their global L2 norm is at most `max_norm`.

    As `torch.nn.utils.clip_grad_norm_`: coefficient max_norm / (norm + 1e-6), clamped to 1.

    Returns:
        The global norm before clipping (inf or NaN if a gradient is not finite).
    """
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    coef = min(max_norm / (total + 1e-6), 1.0)
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
