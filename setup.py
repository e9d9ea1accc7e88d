"""Build of the Cython kernels; all metadata lives in pyproject.toml. docs/setup.md explains
the choices; in short:

- Portable by default. On x86-64 each kernel module is built twice, for the x86-64 baseline
  (`_cython_kernels`, `_cython_fused`: any x86-64 CPU) and for x86-64-v3 (the same modules
  with the suffix `_v3`: AVX2, FMA), and minitf.kernels imports the pair this CPU runs
  (kernels/_isa.py). The int8 tiles carry their own per-function target attributes
  (kernels/int8_tile.h), so every build has the AVX2 and AVX-512 VNNI tiles and picks one
  at run time. Other architectures (aarch64) get one build for the compiler's baseline.
- MINITF_NATIVE=1 builds one pair with -march=native instead: fastest on the machine that
  built it, an illegal instruction on an older one.
- Flags are chosen per compiler and target: each optional flag is tried on the compiler
  first, and only those it accepts are passed (gcc for aarch64 has no -mprefer-vector-width,
  clang has no --param of gcc's).
- No working C compiler (or no Python headers): the extensions are skipped with a warning,
  and the numpy and numba backends still install; `get_backend("cython")` then says why it
  is missing (the reason is kept in minitf/kernels/_build.json). MINITF_REQUIRE_CYTHON=1
  (set by CI) makes that an error. A compiler that works but fails on minitf's sources
  always fails the install.
- OpenMP (-fopenmp) where the compiler compiles and links it: the fused decode step and the
  W8A8 prefill split GPT-2-sized matmuls over `--threads` threads with Cython's `prange`.
  Without it (clang without libomp, for one) the same loops run serially.
- Nothing is written into the source tree: the generated C files and objects go to the
  build directory, and the wheel carries no C file.
"""

import json
import os
import platform
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools._distutils.ccompiler import new_compiler
from setuptools._distutils.sysconfig import customize_compiler
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError

MODULES = ("_cython_kernels", "_cython_fused", "_cython_train")  # per build, always together
DEPENDS = ["kernels/_cython_loops.pxi", "kernels/int8_tile.h"]  # what the modules include

# -fassociative-math (with the two flags it requires) lets the compiler vectorize float sums
# and dot products, like numba's `reassoc` fastmath flag (kernels/_jit.py). Not -ffast-math:
# it would assume no inf/NaN (breaking softmax's all -inf rows) and allow x / s -> x * (1 / s)
# (breaking quantize_rows' bit-exact agreement). -ffp-contract=off: no fused multiply-adds
# (x86-64-v3 has them). gcc contracts a * b + c wherever it meets one after inlining, so the
# same loop inlined in the kernel and the fused module rounded differently there, and the
# fused W8A8 path, which must round as the unfused one bit for bit, did not (measured).
BASE_ARGS = ["-O3", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
             "-fno-math-errno", "-ffp-contract=off"]
OPENMP = "-fopenmp"  # if the compiler links it (Compiler.openmp)
OPTIONAL_ARGS = [
    # gcc: the 4-row matmul kernel needs more runtime alias checks than the default 10
    # before it will vectorize (measured: 4x slower prefill without this)
    "--param=vect-max-version-for-alias-checks=64",
    # x86: 256-bit vectors. With 512-bit ones a native AVX-512 build runs int8 loops 64
    # columns at a time, leaving a scalar tail at M = 240 (measured ~1.5x slower int8
    # decode matmuls); the baseline and v3 builds have no wider vectors anyway
    "-mprefer-vector-width=256",
]
# build name -> (module-name suffix, target flags), on x86-64
X86_BUILDS = {"x86-64": ("", ["-march=x86-64", "-mtune=generic"]),
              "x86-64-v3": ("_v3", ["-march=x86-64-v3", "-mtune=generic"])}


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "no", "false")


class Compiler:
    """The C compiler build_ext will use ($CC, else Python's), probed before the build."""

    def __init__(self):
        self.cc = new_compiler()
        customize_compiler(self.cc)
        self.name = os.environ.get("CC") or self.cc.compiler_so[0]

    def compiles(self, code: str, args: list[str] = ()) -> bool:
        """The compiler compiles `code` (with Python's headers) and `args`, warnings as
        errors (clang only warns about some flags it ignores)."""
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "probe.c"
            src.write_text(code)
            try:
                self.cc.compile([str(src)], output_dir=tmp, extra_postargs=[*args, "-Werror"],
                                include_dirs=[sysconfig.get_paths()["include"]])
            except Exception:  # a probe: any failure means no (distutils' own error classes
                return False   # differ between setuptools versions)
        return True

    def openmp(self) -> bool:
        """The compiler compiles and links an OpenMP program with -fopenmp."""
        code = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "omp.c"
            src.write_text(code)
            try:
                objects = self.cc.compile([str(src)], output_dir=tmp,
                                          extra_postargs=["-fopenmp", "-Werror"])
                self.cc.link_executable(objects, "omp", output_dir=tmp,
                                        extra_postargs=["-fopenmp"])
            except Exception:  # a probe, as in `compiles`
                return False
        return True

    def target(self) -> str:
        """The architecture the compiler targets (not the machine's: CC may cross-compile)."""
        for macro, name in (("__x86_64__", "x86-64"), ("__aarch64__", "aarch64")):
            if self.compiles(f"#ifndef {macro}\n#error\n#endif\n"):
                return name
        return platform.machine().lower() or "unknown"

    def builds(self) -> dict[str, tuple[str, list[str]]]:
        """{build name: (module-name suffix, compile flags)} for this compiler and target."""
        common = BASE_ARGS + [a for a in OPTIONAL_ARGS if self.compiles("int x;\n", BASE_ARGS + [a])]
        if self.openmp():
            common.append(OPENMP)
        else:
            print(f"minitf: {self.name} does not compile and link OpenMP (-fopenmp): the "
                  "Cython kernels' large matmuls run on one thread", file=sys.stderr)
        if env_flag("MINITF_NATIVE"):
            return {"native": ("", common + ["-march=native"])}
        target = self.target()
        if target != "x86-64":
            return {target: ("", common)}  # aarch64 and others: the compiler's baseline
        builds = {}
        for name, (suffix, flags) in X86_BUILDS.items():
            if self.compiles("int x;\n", flags):
                builds[name] = (suffix, common + flags)
            else:
                print(f"minitf: {self.name} does not know {' '.join(flags)}: no {name} build",
                      file=sys.stderr)
        if "x86-64" not in builds:
            raise CompileError(f"{self.name} rejects -march=x86-64")
        return builds


def kernel_extensions(builds) -> list[Extension]:
    """Both modules of every build; `build` names the build (its cythonize directory)."""
    extensions = []
    for build, (suffix, args) in builds.items():
        for module in MODULES:
            ext = Extension(f"minitf.kernels.{module}{suffix}", [f"kernels/{module}.pyx"],
                            include_dirs=[numpy.get_include(), "kernels"],
                            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                                           ("MINITF_BUILD", f'"{build}"')],
                            extra_compile_args=args, depends=DEPENDS,
                            extra_link_args=[OPENMP] if OPENMP in args else [])
            ext.build = build
            extensions.append(ext)
    return extensions


class BuildKernels(build_ext):
    """Cythonize each build into a directory of its own under the build directory (one .pyx,
    two module names), compile, and record what was built in minitf/kernels/_build.json."""

    def finalize_options(self):
        super().finalize_options()
        if INFO["cython"]:  # not built: only the record is written
            self.extensions = []

    def build_extension(self, ext):
        if ext.sources[0].endswith(".pyx"):
            ext.sources = cythonize([ext], build_dir=os.path.join(self.build_temp, ext.build),
                                    compiler_directives={"language_level": "3"},
                                    quiet=True)[0].sources
        super().build_extension(ext)

    def run(self):
        super().run()
        out = self._info_path()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(INFO, indent=1) + "\n")

    def _info_path(self) -> Path:
        return (Path("kernels") if self.inplace else Path(self.build_lib) / "minitf" / "kernels") / "_build.json"

    def get_outputs(self):
        return super().get_outputs() + [str(self._info_path())]


try:
    compiler = Compiler()
    if not compiler.compiles("#include <Python.h>\nint main(void) { return 0; }\n"):
        raise CompileError(f"the C compiler {compiler.name!r} cannot compile a file that "
                           "includes Python.h (no compiler, or no Python headers)")
    BUILDS = compiler.builds()
    INFO = {"cython": None, "compiler": compiler.name,
            "builds": {b: {"modules": [m + s for m in MODULES], "flags": " ".join(a)}
                       for b, (s, a) in BUILDS.items()}}
except (CCompilerError, OSError) as exc:
    if env_flag("MINITF_REQUIRE_CYTHON"):
        sys.exit(f"minitf: MINITF_REQUIRE_CYTHON is set and the Cython kernels cannot be "
                 f"built: {exc}")
    print(f"minitf: WARNING: the Cython kernel backend is not built: {exc}. The numpy and "
          "numba backends install without it; to get it, install a C compiler and the "
          "Python headers (e.g. `apt-get install gcc python3-dev`) and reinstall with "
          "`pip install .`", file=sys.stderr)
    BUILDS, INFO = {}, {"cython": f"not built at install: {exc}", "builds": {}}

# Without a compiler, one placeholder keeps build_ext running, to write the record. The
# build directory and the egg-info are temporary (unless given on the command line), so a
# build leaves nothing in the source tree.
scratch = tempfile.mkdtemp(prefix="minitf-build-")
setup(ext_modules=kernel_extensions(BUILDS) or [Extension("minitf.kernels._none", [])],
      cmdclass={"build_ext": BuildKernels},
      options={"build": {"build_base": os.path.join(scratch, "build")},
               "egg_info": {"egg_base": scratch}})
