"""One training step of the default model (forward, hand-written backward, clipping, AdamW).

    pytest --benchmark bench/bench_train.py

Training runs on the numpy layers of minitf.layers (BLAS for the matmuls) whatever kernel
backend generation uses, so there is one figure per batch shape. Tokens/s = B * T / time.
"""

import numpy as np
import pytest

from minitf.config import GPTConfig
from minitf.model import GPT, init_params
from minitf.optim import AdamW, clip_grad_norm


@pytest.mark.parametrize("batch_size", [8, 32])
def test_training_step(benchmark, batch_size):
    config = GPTConfig()  # the default model, character vocabulary
    params = init_params(config, seed=0)
    model, opt = GPT(config, params), AdamW(params)
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, size=(batch_size, config.block_size))
    y = rng.integers(0, config.vocab_size, size=(batch_size, config.block_size))

    def step():
        loss, grads = model.loss_and_grads(x, y)
        clip_grad_norm(grads, 1.0)
        opt.step(grads, lr=1e-3)
        return loss

    benchmark.group = f"training step, batch {batch_size} x {config.block_size} tokens"
    benchmark.extra_info["tokens_per_step"] = batch_size * config.block_size
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
