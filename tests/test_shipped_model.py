"""The pretrained model inside the package: it loads, every backend agrees on it, and the
generate command prints the same text for the same seed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minitf.checkpoint import load_checkpoint
from minitf.engine import DEFAULT_MODEL_DIR, Engine
from tolerances import TOL

BACKENDS = ["numpy", "numba", "cython"]


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def prompt_128(shipped, corpus_path):
    text = corpus_path.read_text()
    ids = shipped.tokenizer.encode(text[-3000:])  # from the validation split
    return ids[: shipped.config.block_size]


def test_shipped_model_is_the_default_size_and_records_how_it_was_made(shipped):
    cfg = shipped.config
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.block_size) == (2, 240, 4, 128)
    meta = shipped.meta
    assert meta["command"].startswith("python -m minitf.train")
    assert meta["val"]["bits_per_char"] <= 2.30
    assert shipped.optimizer_state is None  # weights only: the package stays small


def test_logits_over_a_full_context_agree_across_backends(shipped, prompt_128):
    assert len(prompt_128) == shipped.config.block_size  # the exact context boundary
    ref = Engine(shipped.config, shipped.params, "numpy").prefill(prompt_128)
    for backend in BACKENDS[1:]:
        got = Engine(shipped.config, shipped.params, backend).prefill(prompt_128)
        # float32 logits of magnitude ~10: compare relative to the largest logit (the kernels
        # sum in different orders, a few ulp apart)
        err = np.abs(got - ref).max() / max(1.0, np.abs(ref).max())
        assert err <= TOL[("backend_logits", np.float32)], f"{backend}: max |logit diff| / max |logit| {err:.2e}"


def test_greedy_200_tokens_identical_across_backends(shipped):
    prompt = shipped.tokenizer.encode("ROMEO:")
    texts = {}
    for backend in BACKENDS:
        engine = Engine(shipped.config, shipped.params, backend)
        texts[backend] = list(engine.generate(prompt, 200, lambda logits: int(np.argmax(logits))))
    assert texts["numba"] == texts["numpy"] and texts["cython"] == texts["numpy"]


def run_generate(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="error::RuntimeWarning")
    return subprocess.run([sys.executable, "-m", "minitf.generate", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_generate_cli_same_seed_same_text(tmp_path):
    args = ["--prompt", "ROMEO:", "--max-new-tokens", "200", "--seed", "1"]
    first = run_generate(*args, cwd=tmp_path)  # outside the checkout: the installed package
    second = run_generate(*args, "--backend", "numpy", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("ROMEO:") and len(first.stdout) > 200
    assert first.stdout == second.stdout  # same seed, any backend: same text
    other = run_generate("--prompt", "ROMEO:", "--max-new-tokens", "200", "--seed", "2", cwd=tmp_path)
    assert other.stdout != first.stdout


@pytest.mark.parametrize("args,message", [
    (["--prompt", "ROMEO€"], "'€' (U+20AC)"),
    (["--top-p", "0"], "argument --top-p: 0 is not allowed"),
    (["--temperature", "-1"], "argument --temperature: -1 is not allowed"),
    (["--backend", "tpu"], "unknown kernel backend 'tpu'"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--max-new-tokens", "-5"], "-5 must be >= 0"),
])
def test_generate_cli_bad_input_one_line_exit_2(tmp_path, args, message):
    proc = run_generate(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_generate_cli_empty_prompt_and_long_generation(tmp_path):
    """An empty prompt starts from a newline; 300 tokens run past the 128-token context."""
    proc = run_generate("--prompt", "", "--max-new-tokens", "300", "--seed", "3", "--temperature", "0.8",
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) >= 300
