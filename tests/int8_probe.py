"""Build tests/_int8_tile_probe.pyx (the variants of kernels/int8_tile.h, callable from
Python) into a directory of its own and import it: the tests and bench/int8_tiles.py use it
until the fused Cython module includes the header. setup.py does not build it.

    python tests/int8_probe.py [BUILD_DIR]     # build once by hand (the tests build it too)

It is compiled for the x86-64 (or aarch64) baseline by default, `-O3 -march=x86-64`: the
point of the header is that every variant compiles and runs from a portable build.
"""

from __future__ import annotations

import hashlib
import importlib.util
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent / "kernels"
PORTABLE_ARGS = ["-O3"] + (["-march=x86-64"] if platform.machine() in ("x86_64", "AMD64") else [])


def build_extension(build_dir: Path, source: Path, name: str, extra_compile_args: list[str]):
    """Compile the Cython file `source` as module `name` in build_dir (reused while the
    source, the header and the flags are unchanged) and import it. kernels/ is on both
    the C and the Cython include path."""
    import numpy
    from Cython.Build import cythonize
    from setuptools import Extension
    from setuptools.dist import Distribution

    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    pyx = build_dir / f"{name}.pyx"
    text = source.read_text()
    if not pyx.is_file() or pyx.read_text() != text:
        pyx.write_text(text)
    ext = Extension(name, [str(pyx)], include_dirs=[str(KERNELS), numpy.get_include()],
                    depends=[str(KERNELS / "int8_tile.h"), str(KERNELS / "int8_tile.pxi")], extra_compile_args=extra_compile_args,
                    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
    dist = Distribution({"ext_modules": cythonize([ext], quiet=True, build_dir=str(build_dir), include_path=[str(KERNELS)],
                                                  compiler_directives={"language_level": "3"})})
    cmd = dist.get_command_obj("build_ext")
    flags = hashlib.sha1(" ".join(extra_compile_args).encode()).hexdigest()[:12]
    cmd.build_lib = cmd.build_temp = str(build_dir / f"out-{flags}")
    cmd.ensure_finalized()
    cmd.run()
    path = Path(cmd.get_ext_fullpath(name))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_probe(build_dir: Path, extra_compile_args: list[str] | None = None):
    """The probe extension built in build_dir (portable flags unless told), imported."""
    return build_extension(build_dir, HERE / "_int8_tile_probe.pyx", "_int8_tile_probe",
                           PORTABLE_ARGS if extra_compile_args is None else extra_compile_args)


if __name__ == "__main__":
    probe = build_probe(Path(sys.argv[1] if len(sys.argv) > 1 else "build/int8_probe"))
    print(f"{probe.__file__}: runs {probe.INT8_ISA}; variants {probe.INT8_STATUS}")
