"""Models the kernel tests run on (tests/test_fused.py, tests/test_int8_head.py)."""

import numpy as np

from minitf.model import init_params


def perturbed_params(config) -> dict[str, np.ndarray]:
    """init_params(config, seed=4) plus N(0, 0.2) noise (seed 9), float32: larger weights
    than at init, so the logits differ clearly by token."""
    params = init_params(config, seed=4)
    rng = np.random.default_rng(9)
    for name in params:
        params[name] = (params[name] + rng.normal(scale=0.2, size=params[name].shape)).astype(np.float32)
    return params
