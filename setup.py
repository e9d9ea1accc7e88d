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


extensions = [
    Extension(
        "minitf.kernels._cython_kernels",
        ["kernels/_cython_kernels.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        # -fassociative-math (with the two flags it requires) lets gcc vectorize float sums
        # and dot products, like numba's `reassoc` fastmath flag (kernels/_jit.py). Not
        # -ffast-math: it would assume no inf/NaN (breaking softmax's all -inf rows) and
        # allow x / s -> x * (1 / s) (breaking quantize_rows' bit-exact agreement).
        extra_compile_args=[
            "-O3",
            "-march=native",
            "-fassociative-math",
            "-fno-signed-zeros",
            "-fno-trapping-math",
            "-fno-math-errno",
        ],
    )
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}),
    cmdclass={"build_ext": build_ext_and_checkout},
)
