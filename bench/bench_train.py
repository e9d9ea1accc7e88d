"""One training step of the default model on every backend (forward, hand-written backward,
clipping, AdamW: `minitf.trainer.train_step`).

    pytest --benchmark bench/bench_train.py

The matmuls are BLAS on every backend; the backends differ in the elementwise and reduction
kernels between them (see bench/train_profile.py for the split). Threads: the libraries'
defaults (set MINITF_BENCH_THREADS to fix them). Tokens/s = B * T / time.
"""

import os

import numpy as np
import pytest

from minitf.config import GPTConfig
from minitf.kernels import BACKENDS, get_backend
from minitf.model import GPT, init_params
from minitf.optim import AdamW
from minitf.threads import set_threads
from minitf.trainer import train_step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("batch_size", [8, 32])
def test_training_step(benchmark, backend, dropout, batch_size):
    K = get_backend(backend)
    if os.environ.get("MINITF_BENCH_THREADS"):
        set_threads(int(os.environ["MINITF_BENCH_THREADS"]))
    config = GPTConfig(dropout=dropout)  # the default model, character vocabulary
    params = init_params(config, seed=0)
    model, opt = GPT(config, params, K), AdamW(params, ops=K)
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, size=(batch_size, config.block_size))
    y = rng.integers(0, config.vocab_size, size=(batch_size, config.block_size))

    def step():
        return train_step(model, opt, x, y, 1e-3, 1.0, model.draw_masks(rng, batch_size))

    benchmark.group = (f"training step, batch {batch_size} x {config.block_size} tokens, "
                       f"dropout {dropout}")
    benchmark.extra_info["tokens_per_step"] = batch_size * config.block_size
    benchmark.pedantic(step, rounds=5, warmup_rounds=2)
