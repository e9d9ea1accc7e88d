"""minitf: a small, fast and fully transparent GPT-style language-model engine."""

__version__ = "0.1.0"

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
