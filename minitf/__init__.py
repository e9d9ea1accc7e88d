"""minitf: a small, fast and fully transparent GPT-style language-model engine."""

import os as _os

__version__ = "0.1.0"

# In a source checkout, kernels/ sits beside this folder and is installed as minitf.kernels
# (see pyproject.toml); searching the checkout's root as well makes `minitf.kernels` resolve
# when minitf is run from there. An installed minitf has minitf/kernels/ and skips this.
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")):
    __path__.append(_os.path.dirname(_os.path.abspath(__path__[0])))

from .config import PRESETS, GPTConfig, num_params, param_shapes  # noqa: E402
from .engine import Engine, load_engine  # noqa: E402
from .model import GPT, init_params  # noqa: E402
from .tensors import Quantization, check_tensors, tensor_layout  # noqa: E402

# Training (minitf.trainer) and quantization (minitf.quantization) are imported by name: they
# load the corpus code and the plotting code, which generation does not need at start-up.
__all__ = ["GPTConfig", "PRESETS", "param_shapes", "num_params", "GPT", "init_params", "Engine",
           "load_engine", "Quantization", "tensor_layout", "check_tensors"]
