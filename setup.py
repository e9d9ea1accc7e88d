"""Build of the Cython kernels; all metadata lives in pyproject.toml."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class build_ext_and_checkout(build_ext):
    """Build the extension, then also copy it next to its .pyx in the source tree.

    `pip install .` builds in the checkout; the copy lets `python -m minitf...` run from the
    checkout's root too, where Python imports the source tree before site-packages.
    """

    def run(self):
        super().run()
        if not self.inplace:
            self.copy_extensions_to_source()


# -fassociative-math (with the two flags it requires) lets gcc vectorize float sums and dot
# products, like numba's `reassoc` fastmath flag (kernels/_jit.py). Not -ffast-math: it would
# assume no inf/NaN (breaking softmax's all -inf rows) and allow x / s -> x * (1 / s)
# (breaking quantize_rows' bit-exact agreement).
COMPILE_ARGS = [
    "-O3",
    "-march=native",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-fno-math-errno",
    # the 4-row matmul kernel needs more runtime alias checks than gcc's default 10 before
    # it will vectorize (measured: 4x slower prefill without this)
    "--param=vect-max-version-for-alias-checks=64",
    # 256-bit vectors: with 512-bit ones gcc runs int8 loops 64 columns at a time, leaving a
    # scalar tail at M = 240 (measured ~1.5x slower int8 decode matmuls)
    "-mprefer-vector-width=256",
]


def kernel_extension(name: str) -> Extension:
    """minitf.kernels.<name> from kernels/<name>.pyx. Both modules include the loops of
    kernels/_cython_loops.pxi and get the same flags, so that the fused path
    (_cython_fused) rounds exactly as the unfused kernels (_cython_kernels) do, which W8A8
    models need."""
    return Extension(
        f"minitf.kernels.{name}",
        [f"kernels/{name}.pyx"],
        include_dirs=[numpy.get_include(), "kernels"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
        depends=["kernels/_cython_loops.pxi", "kernels/int8_tile.h"],
    )


extensions = [kernel_extension("_cython_kernels"), kernel_extension("_cython_fused"),
              kernel_extension("_cython_train")]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}),
    cmdclass={"build_ext": build_ext_and_checkout},
)
