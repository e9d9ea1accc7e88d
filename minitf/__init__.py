"""minitf: a small, fast and fully transparent GPT-style language-model engine."""

__version__ = "0.1.0"

import os

# OpenBLAS's idle threads spin for 2^28 cycles (about 0.1 s) after each call before they
# sleep. After a prefill on 2 BLAS threads that spin holds the core that the fused decode
# step's second thread needs: the first tokens after a prompt took 2-3x their time (GPT-2
# small, --threads 2, docs/gpt2.md). 2^18 cycles (about 0.1 ms) still bridges the gaps
# between a prefill's matmuls. OpenBLAS reads the variable when it loads, so this works when
# minitf is imported before numpy, as the commands do; a value already set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")

# kernels/ installs as minitf.kernels (pyproject.toml's package-dir): a source checkout runs
# through `pip install -e .`, whose import hook maps both folders (docs/setup.md).
from .config import PRESETS, GPTConfig, num_params, param_shapes
from .engine import Engine, load_engine
from .model import GPT, init_params
from .tensors import Quantization, check_tensors, tensor_layout

# Training (minitf.trainer) and quantization (minitf.quantization) are imported by name: they
# load the corpus code and the plotting code, which generation does not need at start-up.
__all__ = ["GPTConfig", "PRESETS", "param_shapes", "num_params", "GPT", "init_params", "Engine",
           "load_engine", "Quantization", "tensor_layout", "check_tensors"]
