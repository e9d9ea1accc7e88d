"""The generate command line (minitf/generate.py): --stop, --prompt-file and stdin,
--num-samples, --context-mode / --keep, the seed on stderr, and --stats that report prefill,
in-context decode and re-prefill apart, on their own lines on stderr."""

import io
import os
import re
import sys
import threading

import pytest

from minitf import generate
from minitf.generate import StopText, unescape
from minitf.tokenizer import CharTokenizer


def run(capsys, *args):
    """(exit status, stdout, stderr) of `python -m minitf.generate *args`, in this process."""
    try:
        status = generate.main(list(args))
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_unescape_understands_the_usual_escapes():
    assert unescape(r"\n\n") == "\n\n"
    assert unescape(r"a\tb\\n\r") == "a\tb\\n\r"
    assert unescape(r"\q\"") == '\\q"'  # unknown escapes stay as they are


def test_stop_text_cuts_before_the_first_stop_string_across_tokens():
    tok = CharTokenizer.train("abc\n XYZ")
    ids = [int(t) for t in tok.encode("ab\nc\n\nXYZ")]
    text = StopText(tok.decode_stream(), ["\n\n", "YZ"])
    shown = "".join(text.push(t) for t in ids)
    assert shown == "ab\nc" and text.stopped
    assert text.finish() == ""
    # no stop string: everything, the held-back tail included, once the stream ends
    text = StopText(tok.decode_stream(), ["\n\n"])
    shown = "".join(text.push(t) for t in tok.encode("ab\nc\n"))
    assert shown == "ab\nc" and text.finish() == "\n" and not text.stopped
    text = StopText(tok.decode_stream(), ["YZ"])
    assert "".join(text.push(t) for t in tok.encode("XY")) == "X" and text.finish() == "Y"


def test_num_samples_are_separated_repeatable_and_each_its_seed_alone(capsys):
    args = ["--backend", "cython", "--num-samples", "3", "--seed", "1", "--stop", r"\n\n",
            "--max-new-tokens", "150", "--prompt", "ROMEO:"]
    status, out, err = run(capsys, *args)
    assert status == 0, err
    blocks = re.split(r"^--- sample (\d) of 3, seed (\d) ---\n", out, flags=re.M)
    assert blocks[0] == "" and blocks[1::3] == ["1", "2", "3"] and blocks[2::3] == ["1", "2", "3"]
    samples = blocks[3::3]
    assert all(s.startswith("ROMEO:") and "\n\n" not in s and s.endswith("\n") for s in samples)
    assert run(capsys, *args)[1] == out  # the same command, the same samples
    for i, sample in enumerate(samples):  # sample i is what --seed 1 + i gives alone
        single = run(capsys, "--backend", "cython", "--seed", str(1 + i), "--stop", r"\n\n",
                     "--max-new-tokens", "150", "--prompt", "ROMEO:")[1]
        assert single == sample, f"sample {i + 1}"


def test_prompt_from_a_file_and_from_stdin(capsys, tmp_path, monkeypatch):
    path = tmp_path / "prompt.txt"
    path.write_text("JULIET:\n", encoding="utf-8")
    common = ["--backend", "numpy", "--seed", "5", "--max-new-tokens", "20"]
    status, from_file, err = run(capsys, "--prompt-file", str(path), *common)
    assert status == 0 and from_file.startswith("JULIET:\n"), err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"JULIET:\n")))
    assert run(capsys, "--prompt-file", "-", *common)[1] == from_file
    assert run(capsys, "--prompt", "JULIET:\n", *common)[1] == from_file
    path.write_bytes(b"JULIET:\xff\n")
    status, _, err = run(capsys, "--prompt-file", str(path), *common)
    assert status == 2 and "not UTF-8 text" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_prompt_file_that_is_a_pipe_is_read_as_a_stream(capsys, tmp_path):
    """`--prompt-file <(command)` names a pipe: it is read as standard input is (bounded),
    not refused as a device."""
    fifo = tmp_path / "prompt.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(b"JULIET:\n",))
    writer.start()
    common = ["--backend", "numpy", "--seed", "5", "--max-new-tokens", "20"]
    try:
        status, from_pipe, err = run(capsys, "--prompt-file", str(fifo), *common)
    finally:
        writer.join(timeout=10)
    assert status == 0, err
    assert from_pipe == run(capsys, "--prompt", "JULIET:\n", *common)[1]


def test_standard_input_larger_than_memory_is_refused_while_it_streams(capsys, monkeypatch):
    """An endless stdin (`yes | python -m minitf.generate --prompt-file -`) stops with one
    line once what has arrived exceeds the memory, not when the machine is full."""
    import minitf.config as config_module

    class Endless(io.RawIOBase):
        chunks = 0

        def readable(self):
            return True

        def readinto(self, b):
            Endless.chunks += 1
            b[:] = b"y\n" * (len(b) // 2) + b"y" * (len(b) % 2)
            return len(b)

    monkeypatch.setattr(config_module, "memory_limit", lambda: 50 * 2**20)  # 50 MiB
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(Endless())))
    status, out, err = run(capsys, "--prompt-file", "-", "--backend", "numpy")
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "--prompt-file - (standard input) (at least" in err and "memory" in err, err
    assert Endless.chunks < 1000  # it stopped reading


def test_the_seed_is_printed_when_none_was_given(capsys):
    status, out, err = run(capsys, "--backend", "numpy", "--max-new-tokens", "30", "--prompt", "A")
    assert status == 0, err
    seed = int(re.search(r"seed (\d+) \(none given; --seed \1 repeats this run\)", err).group(1))
    assert run(capsys, "--backend", "numpy", "--max-new-tokens", "30", "--prompt", "A", "--seed",
               str(seed))[1] == out
    assert "seed" not in run(capsys, "--backend", "numpy", "--max-new-tokens", "3", "--temperature", "0")[2]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="--threads 2 needs two cores")
def test_stats_name_the_thread_count(capsys):
    status, out, err = run(capsys, "--backend", "numba", "--seed", "1", "--max-new-tokens", "5",
                           "--threads", "2", "--stats")
    assert status == 0, err
    assert err.splitlines()[0].startswith("stats: backend numba, fused path, 2 threads, 1 sample(s)")


@pytest.mark.parametrize("mode", ["shift", "exact"])
def test_stats_report_prefill_decode_and_re_prefill_apart(capsys, mode):
    status, out, err = run(capsys, "--backend", "cython", "--seed", "1", "--max-new-tokens", "300",
                           "--prompt", "ROMEO:", "--stats", "--context-mode", mode)
    assert status == 0, err
    assert out.endswith("\n")  # nothing of the report is glued to the text
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"stats: backend cython, fused path, 1 thread, 1 sample(s), context {mode}")
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["prefill", "decode", "re-prefill", "model", "sampling", "all", "kernels"]
    decodes = int(re.search(r"decode +(\d+) tokens +[\d.]+ ms/token, [\d,]+ tokens/s", err).group(1))
    re_prefills, size = map(int, re.search(r"re-prefill +(\d+) x (\d+) tokens", err).groups())
    # 299 forwarded tokens ("ROMEO:" is 6): 122 fill the context, then shift re-prefills 64
    # once every 64 tokens, exact the last 128 for every token
    assert (decodes, re_prefills, size) == ((296, 3, 64) if mode == "shift" else (122, 177, 128))


def test_stats_of_one_token_say_no_decode_ran(capsys):
    status, _, err = run(capsys, "--backend", "numpy", "--seed", "1", "--max-new-tokens", "1",
                         "--prompt", "ROMEO:", "--stats")
    assert status == 0, err
    assert "decode            0 tokens  (every token came from a prefill's logits)" in err
    names = [line.split()[0] for line in err.strip().splitlines()[1:]]
    assert names == ["prefill", "decode", "model", "sampling", "all", "kernels"]  # no re-prefill ran
    assert "0.000 ms/token over 0 tokens" not in err


@pytest.mark.parametrize("args, message", [
    (["--keep", "5", "--context-mode", "exact"], "--keep 5 applies to --context-mode shift only"),
    (["--keep", "500"], "--keep=500 must be an integer in [1, 128]"),
    (["--keep", "0"], "0 must be >= 1"),
    (["--context-mode", "crop"], "invalid choice: 'crop'"),
    (["--num-samples", "0"], "0 must be >= 1"),
    (["--num-samples", "2", "--viz", "out"], "--viz records one sample; got --num-samples 2"),
    (["--stop", ""], "--stop '' is empty"),
    (["--prompt", "a", "--prompt-file", "b"], "not allowed with argument --prompt"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file /nonexistent/prompt.txt: cannot read it"),
    (["--seed", "-5"], "argument --seed: -5 must be >= 0"),
    # the sampling settings' and the thread count's rules, named by the flag, not the
    # Python parameter (top_p=, temperature=, threads=)
    (["--top-p", "1.5"], "argument --top-p: 1.5 is not allowed: it must be a number in (0, 1]"),
    (["--top-p", "0"], "argument --top-p: 0 is not allowed"),
    (["--top-p", "nan"], "argument --top-p: nan is not allowed"),
    (["--temperature", "-1"], "argument --temperature: -1 is not allowed: it must be a finite number >= 0"),
    (["--temperature", "inf"], "argument --temperature: inf is not allowed"),
    (["--temperature", "hot"], "argument --temperature: 'hot' is not allowed: it must be a finite number >= 0"),
    (["--top-k", "-1"], "argument --top-k: -1 is not allowed: it must be 0 (no top-k filtering) or a positive integer"),
    (["--threads", "0"], "argument --threads: 0 is not allowed: it must be an integer in [1, "),
    (["--threads", str((os.cpu_count() or 1) + 1)], "this machine's cores"),
])
def test_bad_flags_one_line_exit_2(capsys, args, message):
    status, _, err = run(capsys, "--backend", "numpy", *args)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], err
    assert not re.search(r"(?<![-\w])(top_p|top_k|temperature|threads|keep)=", err), err


def test_ctrl_c_ends_the_line_says_interrupted_and_exits_130(capsys, monkeypatch):
    real, calls = StopText.push, {"n": 0}

    def push(self, token):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, token)

    monkeypatch.setattr(StopText, "push", push)
    status, out, err = run(capsys, "--backend", "numpy", "--seed", "1", "--prompt", "JULIET",
                           "--max-new-tokens", "50")
    assert status == 130, err
    assert out.startswith("JULIET") and out.endswith("\n"), out  # the text so far, its line ended
    lines = err.strip().splitlines()
    assert lines[-1] == "python -m minitf.generate: interrupted", err


def test_a_prompt_file_with_a_byte_order_mark(capsys, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"\xef\xbb\xbfJULIET:\n")
    status, out, err = run(capsys, "--prompt-file", str(path), "--backend", "numpy", "--seed", "5",
                           "--max-new-tokens", "5")
    assert status == 0 and out.startswith("JULIET:\n"), (out, err)


def test_usage_names_the_command_as_typed(tmp_path):
    """The console script's usage and errors say minitf-generate; python -m says its own."""
    import shutil
    import subprocess

    script = shutil.which("minitf-generate", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the minitf-generate console script is not installed beside this Python")
    for command, prog in ([[script], "minitf-generate"],
                          [[sys.executable, "-m", "minitf.generate"], "python -m minitf.generate"]):
        r = subprocess.run([*command, "--top-p", "2"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr == (
            f"{prog}: error: argument --top-p: 2 is not allowed: it must be a number in (0, 1] "
            "(1 means no nucleus filtering)\n"), r.stderr
        r = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {prog} "), r.stdout
