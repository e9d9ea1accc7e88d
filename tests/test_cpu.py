"""What runs on this CPU and how it starts: the registry's report (python -m minitf.kernels),
MINITF_ISA forcing and its errors, a Cython build that is missing saying why, threads
(--threads limits BLAS and starts no other pool), the one-line notice of a cold numba start,
and the console scripts. Each check runs in a fresh interpreter, outside the checkout, where
the import-time choices are made."""

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import minitf.kernels as kernels
from minitf.kernels import BackendError, build_info
from tolerances import TOL

OUTSIDE = tempfile.gettempdir()  # subprocesses import the installed minitf, not the checkout's


def run(args, **env) -> subprocess.CompletedProcess:
    """Run `python args...` in a fresh interpreter, MINITF_ISA unset unless given."""
    full = {k: v for k, v in os.environ.items() if k != "MINITF_ISA"}
    full.update(env)
    return subprocess.run([sys.executable, *args], env=full, cwd=OUTSIDE, capture_output=True,
                          text=True, timeout=300)


def cython_built() -> bool:
    return bool(build_info().get("builds"))


def test_the_registry_says_what_runs_and_why():
    done = run(["-m", "minitf.kernels"])
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert set(lines) == {"numpy", "numba", "cython", "auto"}
    assert "int8 tile " in lines["numba"] and "the fastest that runs here" in lines["numba"]
    if cython_built():
        assert lines["cython"].startswith("build ") and "int8 tile " in lines["cython"]


def test_minitf_isa_portable_runs_the_baseline_build_and_tiles():
    done = run(["-m", "minitf.kernels"], MINITF_ISA="portable")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    assert "int8 tile portable (forced by MINITF_ISA=portable)" in lines["numba"]
    if cython_built():
        baseline = next(iter(build_info()["builds"]))
        assert lines["cython"].startswith(f"build {baseline} (MINITF_ISA=portable runs the baseline")
        assert "int8 tile portable (forced by MINITF_ISA=portable)" in lines["cython"]


def test_an_unknown_minitf_isa_is_one_clear_line():
    done = run(["-m", "minitf.kernels"], MINITF_ISA="sse9")
    assert done.returncode == 2
    assert done.stderr.strip() == ("python -m minitf.kernels: error: unknown MINITF_ISA='sse9'; "
                                   "allowed: portable, avx2, avx512vnni or auto (the fastest "
                                   "this CPU runs)")
    done = run(["-c", "from minitf.kernels import get_backend; get_backend('numba')"],
               MINITF_ISA="sse9")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(
        "minitf.kernels.BackendError: kernel backend 'numba' cannot load: unknown MINITF_ISA='sse9'")


def test_an_unknown_minitf_isa_is_an_error_for_auto_too():
    """Not a warning and a quiet fall back to numpy: the default backend refuses it too."""
    done = run(["-m", "minitf.generate", "--max-new-tokens", "2", "--seed", "1"], MINITF_ISA="bogus")
    assert done.returncode == 2 and done.stdout == "", done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("python -m minitf.generate: error: backend 'auto': unknown "
                           "MINITF_ISA='bogus'; allowed: portable, avx2"), line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_the_kernels_report_is_a_command_like_the_others():
    """Unknown arguments are refused; a full or vanished standard output is one line (or
    quiet for `| head`), never a traceback."""
    done = run(["-m", "minitf.kernels", "--bogus"])
    assert done.returncode == 2 and "unrecognized arguments: --bogus" in done.stderr
    assert run(["-m", "minitf.kernels", "--help"]).returncode == 0
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "minitf.kernels"], stdout=full, cwd=OUTSIDE,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("python -m minitf.kernels: error: cannot write standard output"), line
    head = subprocess.run(f"{sys.executable} -m minitf.kernels | head -c 10", shell=True,
                          cwd=OUTSIDE, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in head.stderr and head.stderr == "", head.stderr


def test_a_cython_backend_that_was_not_built_says_why(monkeypatch, tmp_path):
    """What setup.py records when no C compiler works is what get_backend reports."""
    record = tmp_path / "_build.json"
    record.write_text(json.dumps({"cython": "not built at install: the C compiler '/bin/false' "
                                  "cannot compile a file that includes Python.h", "builds": {}}))
    monkeypatch.setattr(kernels, "BUILD_INFO", record)
    monkeypatch.setattr(kernels, "_instances", {})
    real_import = kernels._import

    def unbuilt(module):
        if module in ("cython_kernels", "cython_train"):
            raise ModuleNotFoundError("No module named 'minitf.kernels._cython_fused'")
        return real_import(module)

    monkeypatch.setattr(kernels, "_import", unbuilt)
    with pytest.raises(BackendError) as err:
        kernels.get_backend("cython")
    message = str(err.value)
    assert message.startswith("kernel backend 'cython' cannot load: the Cython extension was not "
                              "built at install: the C compiler '/bin/false' cannot compile")
    assert "install a C compiler" in message and "pip install ." in message
    assert kernels.available_backends()["cython"].startswith("the Cython extension was not built")


THREADS = """
import os
import torch
torch.set_num_threads(2)
from threadpoolctl import threadpool_info
from minitf import generate
before = len(os.listdir("/proc/self/task"))
generate.main(["--backend", "numba", "--max-new-tokens", "3", "--seed", "1", "--threads", "1"])
blas = sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
print("RESULT", blas, torch.get_num_threads(), len(os.listdir("/proc/self/task")) - before)
"""


def test_threads_limit_blas_and_start_no_other_pool():
    """--threads 1: numpy's BLAS runs 1 thread; PyTorch's count (2, set first) is left as it
    is; the generation starts no thread (numba's parallel kernels run only on more than one
    thread, kernels/_threads.py; the process's threads are counted in /proc)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores to tell 1 thread from the default")
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("counts the process's threads in /proc (Linux)")
    done = run(["-c", THREADS])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "RESULT [1] 2 0"


COLD = ("import numpy as np\n"
        "from minitf.kernels import get_backend\n"
        "get_backend('numba').gelu(np.ones(5, np.float32))\n")


def test_a_cold_numba_start_says_so_once(tmp_path):
    cache = str(tmp_path / "numba-cache")
    cold = run(["-c", COLD], NUMBA_CACHE_DIR=cache)
    assert cold.returncode == 0, cold.stderr
    assert cold.stderr.splitlines() == ["compiling kernels, first run only"]
    warm = run(["-c", COLD], NUMBA_CACHE_DIR=cache)
    assert warm.returncode == 0 and warm.stderr == ""


@pytest.mark.parametrize("command", ["train", "generate", "evaluate", "quantize", "prepare", "convert"])
def test_console_scripts(command):
    script = shutil.which(f"minitf-{command}", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("minitf is not installed in this interpreter's environment")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, cwd=OUTSIDE)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr


def test_the_fused_and_unfused_w8a8_paths_agree_with_every_forced_variant():
    """Each int8 variant this CPU runs, forced at import in both backends: a W8A8 model's
    fused decode equals the unfused path bit for bit (the int8 sums are exact)."""
    code = ("import numpy as np\n"
            "from minitf.config import GPTConfig\n"
            "from minitf.engine import Engine\n"
            "from minitf.model import init_params\n"
            "from minitf.quantization import quantize_model\n"
            "cfg = GPTConfig(vocab_size=37, block_size=12, n_layer=2, n_head=2, d_model=26)\n"
            "q = quantize_model(init_params(cfg, seed=3), cfg, scope='all')[0]\n"
            "for b in ('numba', 'cython'):\n"
            "    f, u = (Engine(cfg, q, b, int8_mode='w8a8', fused=x) for x in (True, False))\n"
            "    ids = [1, 5, 7, 2]\n"
            "    assert (f.prefill(ids) == u.prefill(ids)).all(), b\n"
            "    for t in (3, 4, 9):\n"
            "        assert (f.decode(t) == u.decode(t)).all(), b\n"
            "print('ok')\n")
    status = kernels._import("numba_int8_tile").INT8_STATUS
    for variant in [v for v, why in status.items() if why is None]:
        done = run(["-c", code], MINITF_ISA=variant)
        assert done.returncode == 0 and done.stdout.strip() == "ok", (variant, done.stderr[-3000:])


def test_float_results_do_not_depend_on_being_compiled_for_a_newer_cpu():
    """The x86-64 and x86-64-v3 pairs compute the same op within the kernel tolerance
    (v3 may contract a * b + c into one FMA)."""
    if len(build_info().get("builds", {})) < 2:
        pytest.skip("one Cython build installed")
    builds = [importlib.import_module(f"minitf.kernels.{m}") for b in build_info()["builds"].values()
              for m in b["modules"] if m.startswith("_cython_kernels")]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 240)).astype(np.float32)
    w = rng.standard_normal((240, 130)).astype(np.float32)
    y = [np.zeros((5, 130), np.float32) for _ in builds]
    for out, module in zip(y, builds):
        module.matmul_f32(out, x, w, None)
    bound = np.abs(x) @ np.abs(w)  # each build within TOL of the exact sum, so 2 TOL apart
    assert (np.abs(y[0] - y[1]) <= 2 * TOL[("kernel_dot", np.float32)] * bound).all()
