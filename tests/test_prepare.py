"""python -m minitf.prepare and datasets: round trips, the split rule, exact training on a
prepared corpus, a corpus larger than the memory cap, and one clear line for bad input.

References are independent of the code under test: the expected split is computed here with
int(n * 0.9) per document, tokens are compared with a whole-text `encode`, and .bin files are
read with np.fromfile, not TokenFile.
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitf import evaluate, prepare as prepare_cli, train
from minitf.checkpoint import load_checkpoint
from minitf.dataset import DatasetError, load_data, load_dataset, prepare, same_tokenizer
from minitf.engine import DEFAULT_MODEL_DIR
from minitf.tokenizer import load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
SEP = "\n\n"
# multi-byte characters, \r\n, a tab, a non-breaking space: blocks of a few bytes cut them all
MIXED = "Wherefore art thou,\r\nRomeo? Café — naïve ☃ 𝄞 end.\n\tTo be,\u00a0or not to be:  that is\n" * 7


def read_bin(folder: Path, split: str) -> np.ndarray:
    record = json.loads((folder / "dataset.json").read_text())
    return np.fromfile(folder / f"{split}.bin", dtype="<" + {"uint16": "u2", "uint32": "u4"}[record["dtype"]])


def expected_splits(texts: list[str], sep: str = SEP) -> tuple[str, str]:
    """The documented rule, written out: each document's first int(0.9 n) characters train."""
    cuts = [int(len(t) * 0.9) for t in texts]
    train_parts = [t[:c] for t, c in zip(texts, cuts) if c > 0]
    val_parts = [t[c:] for t, c in zip(texts, cuts) if c < len(t)]
    return sep.join(train_parts), sep.join(val_parts)


def encode_parts(tok, text: str, sep: str = SEP) -> np.ndarray:
    """encode(part 1) + encode(sep) + encode(part 2) + ..., each part encoded whole."""
    pieces = []
    for i, part in enumerate(text.split(sep)):
        if i:
            pieces.append(tok.encode(sep))
        pieces.append(tok.encode(part))
    return np.concatenate(pieces)


def make_folder(root: Path) -> list[str]:
    """A folder of documents; returns their texts in the documented order (sorted paths)."""
    files = {
        "b/ch2.txt": MIXED[:300],
        "a.txt": "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 5,
        "b/ch10.txt": "All:\nSpeak, speak.\n" * 9,
        "c/empty.txt": "",
        "c/one.txt": "e",  # int(0.9) = 0: all validation
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))
    (root / ".hidden.txt").write_text("never read")
    (root / "notes.md").write_text("not *.txt")
    return [files[name] for name in sorted(files)]  # "a.txt" < "b/ch10.txt" < "b/ch2.txt" < ...


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_file_round_trip_equals_split_text(tmp_path, kind):
    src = tmp_path / "in.txt"
    src.write_bytes(MIXED.encode("utf-8"))
    record = prepare(src, tmp_path / "ds", kind, vocab_size=300, block_bytes=7, piece_chars=40)
    train_text, val_text = expected_splits([MIXED])
    tok = load_tokenizer(tmp_path / "ds")
    assert tok.decode(read_bin(tmp_path / "ds", "train")) == train_text
    assert tok.decode(read_bin(tmp_path / "ds", "val")) == val_text
    # the tokenizer is what `train` would train on the training split, and the pieces encode
    # exactly as the whole text does
    independent = train_tokenizer(kind, train_text, 300)
    assert same_tokenizer(tok, independent)
    np.testing.assert_array_equal(read_bin(tmp_path / "ds", "train"), independent.encode(train_text))
    np.testing.assert_array_equal(read_bin(tmp_path / "ds", "val"), independent.encode(val_text))
    assert record["train"]["chars"] == len(train_text) and record["val"]["chars"] == len(val_text)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_folder_round_trip_per_document_split(tmp_path, kind):
    (tmp_path / "books").mkdir()
    texts = make_folder(tmp_path / "books")
    record = prepare(tmp_path / "books", tmp_path / "ds", kind, vocab_size=280, block_bytes=11, piece_chars=64)
    assert [s["path"] for s in record["sources"]] == ["a.txt", "b/ch10.txt", "b/ch2.txt", "c/empty.txt", "c/one.txt"]
    train_text, val_text = expected_splits(texts)
    tok = load_tokenizer(tmp_path / "ds")
    assert tok.decode(read_bin(tmp_path / "ds", "train")) == train_text
    assert tok.decode(read_bin(tmp_path / "ds", "val")) == val_text
    assert same_tokenizer(tok, train_tokenizer(kind, train_text, 280))
    np.testing.assert_array_equal(read_bin(tmp_path / "ds", "train"), encode_parts(tok, train_text))
    np.testing.assert_array_equal(read_bin(tmp_path / "ds", "val"), encode_parts(tok, val_text))
    assert record["train"]["documents"] == 3 and record["val"]["documents"] == 4


def test_stdin_round_trip_through_the_cli(tmp_path):
    data = MIXED.encode("utf-8")
    proc = subprocess.run([sys.executable, "-m", "minitf.prepare", "-", "--out", str(tmp_path / "ds"), "--quiet"],
                          input=data, capture_output=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    train_text, val_text = expected_splits([MIXED])
    tok = load_tokenizer(tmp_path / "ds")
    assert tok.decode(read_bin(tmp_path / "ds", "train")) + tok.decode(read_bin(tmp_path / "ds", "val")) == MIXED
    assert tok.decode(read_bin(tmp_path / "ds", "val")) == val_text
    record = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert record["sources"] == [{"path": "-", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                  "chars": len(MIXED), "train_chars": len(train_text), "val_chars": len(val_text)}]
    assert sorted(os.listdir(tmp_path)) == ["ds"]  # the copy of stdin and the temporary folder are gone
    assert sorted(os.listdir(tmp_path / "ds")) == ["dataset.json", "tokenizer.json", "train.bin", "val.bin"]


def test_stdin_with_a_given_tokenizer(tmp_path):
    tok = train_tokenizer("bpe", MIXED, 300)
    tok.save(tmp_path / "tok.json")
    prepare("-", tmp_path / "ds", tmp_path / "tok.json", stdin=io.BytesIO(MIXED.encode()), block_bytes=5)
    train_text, val_text = expected_splits([MIXED])
    np.testing.assert_array_equal(read_bin(tmp_path / "ds", "train"), tok.encode(train_text))
    assert same_tokenizer(load_tokenizer(tmp_path / "ds"), tok)


def test_record_describes_sources_splits_and_files(tmp_path, corpus_path):
    record = prepare(corpus_path, tmp_path / "ds")
    data = corpus_path.read_bytes()
    ds = tmp_path / "ds"
    assert record == json.loads((ds / "dataset.json").read_text())
    assert record["sources"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["sources"][0]["bytes"] == len(data) and record["sources"][0]["train_chars"] == 1_003_854
    assert record["dtype"] == "uint16" and record["vocab_size"] == 65 and record["tokenizer"]["kind"] == "char"
    for split, tokens in (("train", 1_003_854), ("val", 111_540)):
        assert record[split]["tokens"] == tokens == (ds / f"{split}.bin").stat().st_size // 2
        assert record[split]["sha256"] == hashlib.sha256((ds / f"{split}.bin").read_bytes()).hexdigest()
    assert record["tokenizer"]["sha256"] == hashlib.sha256((ds / "tokenizer.json").read_bytes()).hexdigest()
    assert record["split"]["val_fraction"] == 0.1 and record["split"]["separator"] == SEP
    from minitf import __version__
    assert record["minitf_version"] == __version__


def distinct_chars(n: int) -> str:
    """n distinct characters from U+4E00 on, skipping the surrogates (not encodable)."""
    return "".join(chr(c) for c in range(0x4E00, 0x4E00 + n + 0x800) if not 0xD800 <= c < 0xE000)[:n]


def test_uint32_when_the_vocabulary_does_not_fit_uint16(tmp_path):
    chars = distinct_chars(70_000)
    text = chars + chars[:9000]  # every character occurs in the first 90%
    (tmp_path / "cjk.txt").write_text(text, encoding="utf-8")
    record = prepare(tmp_path / "cjk.txt", tmp_path / "ds")
    assert record["dtype"] == "uint32" and record["vocab_size"] == len(chars) > 65_536
    tok = load_tokenizer(tmp_path / "ds")
    assert tok.decode(read_bin(tmp_path / "ds", "train")) + tok.decode(read_bin(tmp_path / "ds", "val")) == text


# whitespace of every kind next to letters, digits, punctuation and contractions: where the
# pre-tokenizer's pattern could tell a cut from no cut
ALPHABET = list("ab Z9\n\n  \t\r.'s,-é☃") + ["\u00a0", "\u2028", "\x1c", "\x85", "'s", "'ll", " \n", "\n "]


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """BPE trained on text from ALPHABET, so that its merges join these very pieces (" \n",
    "  ", "a b", ...): a wrong cut then changes the ids, not only the pre-tokens."""
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(np.array(ALPHABET, dtype=object), size=100_000))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_tokenizer("bpe", text, 600).save(path)
    return path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(ALPHABET), min_size=2, max_size=120).map("".join),
       st.integers(1, 9), st.integers(1, 30))
def test_bpe_in_pieces_equals_bpe_of_the_whole(bpe_file, text, block_bytes, piece_chars):
    tok = load_tokenizer(bpe_file)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "in.txt").write_bytes(text.encode("utf-8"))
        prepare(Path(d) / "in.txt", Path(d) / "ds", bpe_file, block_bytes=block_bytes, piece_chars=piece_chars)
        train_text, val_text = expected_splits([text])
        np.testing.assert_array_equal(read_bin(Path(d) / "ds", "train"), tok.encode(train_text))
        np.testing.assert_array_equal(read_bin(Path(d) / "ds", "val"), tok.encode(val_text))



@pytest.mark.parametrize("piece_chars", [1, 7, 64])
def test_bpe_in_thousands_of_pieces_equals_bpe_of_the_whole(bpe_file, tmp_path, piece_chars):
    rng = np.random.default_rng(piece_chars)
    text = "".join(rng.choice(np.array(ALPHABET, dtype=object), size=20_000))
    (tmp_path / "in.txt").write_bytes(text.encode("utf-8"))
    prepare(tmp_path / "in.txt", tmp_path / "ds", bpe_file, block_bytes=13, piece_chars=piece_chars)
    tok = load_tokenizer(bpe_file)
    train_text, val_text = expected_splits([text])
    np.testing.assert_array_equal(read_bin(tmp_path / "ds", "train"), tok.encode(train_text))
    np.testing.assert_array_equal(read_bin(tmp_path / "ds", "val"), tok.encode(val_text))

# ---------------------------------------------------------------------------- training and evaluation

TINY = ["--preset", "tiny", "--batch-size", "4", "--eval-windows", "4", "--final-eval-windows", "8",
        "--quiet", "--no-plot", "--warmup", "2", "--lr", "3e-3", "--threads", "1"]


def run_train(data, out, *extra):
    args = train.build_parser().parse_args(["--data", str(data), "--out", str(out), *TINY, *extra])
    return train.run(args, log=lambda *a: None)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_prepared_corpus_trains_exactly_like_the_text_file(corpus_path, tmp_path, kind):
    prepare(corpus_path, tmp_path / "ds", kind)
    steps = ["--steps", "6", "--eval-interval", "3", "--tokenizer", kind]
    from_text = run_train(corpus_path, tmp_path / "text", *steps)
    from_dataset = run_train(tmp_path / "ds", tmp_path / "dataset", *steps)
    assert from_text == {**from_dataset, "wall_seconds": from_text["wall_seconds"]}
    a, b = load_checkpoint(tmp_path / "text"), load_checkpoint(tmp_path / "dataset")
    assert a.meta["history"] == b.meta["history"]  # every training and validation loss
    for name, p in a.params.items():
        np.testing.assert_array_equal(p, b.params[name], err_msg=name)
    assert same_tokenizer(a.tokenizer, b.tokenizer)


def test_resume_refuses_a_dataset_with_another_tokenizer(corpus_path, tmp_path, capsys):
    prepare(corpus_path, tmp_path / "char")
    prepare(corpus_path, tmp_path / "bpe", "bpe", vocab_size=300)
    run_train(tmp_path / "char", tmp_path / "run", "--steps", "2", "--eval-interval", "2")
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tmp_path / "bpe"), "--out", str(tmp_path / "run"), *TINY, "--steps", "4", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "another tokenizer" in err[0]
    run_train(tmp_path / "char", tmp_path / "run", "--steps", "4", "--eval-interval", "2", "--resume")  # its own
    assert load_checkpoint(tmp_path / "run").optimizer_state["step"] == 4


def test_evaluate_on_a_dataset_equals_the_text_file(corpus_path, tmp_path, capsys):
    prepare(corpus_path, tmp_path / "ds", DEFAULT_MODEL_DIR)  # the shipped model's tokenizer
    results = []
    for data in (corpus_path, tmp_path / "ds"):
        assert evaluate.main(["--data", str(data), "--max-windows", "20", "--backend", "numpy"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and results[0]["windows"] == 20


def test_evaluate_refuses_a_dataset_with_another_tokenizer(corpus_path, tmp_path, capsys):
    prepare(corpus_path, tmp_path / "bpe", "bpe", vocab_size=300)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--data", str(tmp_path / "bpe"), "--backend", "numpy"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "another tokenizer" in err[0] and str(tmp_path / "bpe") in err[0]


MEMORY_CAP = 1 << 30  # bytes of address space for the whole training process
CAPPED_TRAINING = textwrap.dedent("""
    import json, resource, sys
    cap = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import numpy as np
    from minitf import train
    try:  # the premise: this file cannot even be mapped whole under the cap
        np.memmap(sys.argv[1] + "/train.bin", dtype=np.uint16, mode="r")
        sys.exit("mapped a file larger than the address-space cap")
    except (OSError, MemoryError):
        pass
    args = train.build_parser().parse_args(["--data", sys.argv[1], "--out", sys.argv[2], "--preset", "tiny",
        "--steps", "3", "--eval-interval", "3", "--batch-size", "8", "--eval-windows", "4",
        "--final-eval-windows", "4", "--quiet", "--no-plot", "--threads", "1"])
    result = train.run(args, log=lambda *a: None)
    # peak resident set of this process since exec (ru_maxrss would carry over the peak of
    # the pytest process that forked it)
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"loss": result["val"]["loss"], "maxrss": hwm_kb}))
""")


def test_memmap_corpus_larger_than_the_memory_cap_trains(tmp_path):
    (tmp_path / "in.txt").write_text("a rose by any other name\nwould smell as sweet\n" * 500)
    prepare(tmp_path / "in.txt", tmp_path / "ds")
    # Grow train.bin to twice the cap: a sparse hole (token 0 everywhere, no disk used) and the
    # prepared tokens again at the very end, so windows are read from all over the file.
    ds = tmp_path / "ds"
    tokens = np.fromfile(ds / "train.bin", dtype="<u2")
    size = 2 * MEMORY_CAP
    with open(ds / "train.bin", "r+b") as f:
        f.truncate(size - tokens.nbytes)
        f.seek(size - tokens.nbytes)
        f.write(tokens.tobytes())
    record = json.loads((ds / "dataset.json").read_text())
    record["train"]["tokens"] = size // 2  # (its sha256 now describes the small file; unused here)
    (ds / "dataset.json").write_text(json.dumps(record))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CAPPED_TRAINING, str(ds), str(tmp_path / "run"), str(MEMORY_CAP)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert np.isfinite(result["loss"]) and result["maxrss"] * 1024 < MEMORY_CAP
    assert load_checkpoint(tmp_path / "run").optimizer_state["step"] == 3


def test_load_data_text_file_is_todays_path(corpus_path):
    text = corpus_path.read_text(encoding="utf-8")
    train_tokens, val_tokens, tok = load_data(corpus_path)
    cut = int(len(text) * 0.9)
    assert tok.decode(train_tokens) == text[:cut] and tok.decode(val_tokens) == text[cut:]
    assert train_tokens.dtype == np.int32
    none, val_only, _ = load_data(corpus_path, tok, with_train=False)
    assert none is None and np.array_equal(val_only, val_tokens)


# ---------------------------------------------------------------------------- atomic output


def test_replacing_a_dataset_and_a_failed_run_leave_a_whole_one(tmp_path):
    (tmp_path / "good.txt").write_text("hello world, hello there\n" * 20)
    (tmp_path / "other.txt").write_text("something else entirely\n" * 20)
    (tmp_path / "bad.txt").write_bytes(b"hello \xff world\n" * 20)
    prepare(tmp_path / "good.txt", tmp_path / "ds")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    with pytest.raises(OSError, match="not UTF-8"):
        prepare(tmp_path / "bad.txt", tmp_path / "ds")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "ds", "good.txt", "other.txt"]
    prepare(tmp_path / "other.txt", tmp_path / "ds")  # an existing dataset is replaced
    text = (tmp_path / "other.txt").read_text()
    assert load_tokenizer(tmp_path / "ds").decode(read_bin(tmp_path / "ds", "val")) == text[int(len(text) * 0.9):]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "ds", "good.txt", "other.txt"]


def test_an_interrupted_replacement_is_recovered_not_lost(tmp_path):
    (tmp_path / "in.txt").write_text("to be or not to be\n" * 30)
    prepare(tmp_path / "in.txt", tmp_path / "ds")
    os.rename(tmp_path / "ds", tmp_path / ".ds.minitf-old")  # as if killed between the two renames
    with pytest.warns(UserWarning, match="interrupted"):
        train_tokens, _, tok = load_data(tmp_path / "ds")
    assert tok.decode(train_tokens[:]).startswith("to be or not")
    prepare(tmp_path / "in.txt", tmp_path / "ds")  # completes the swap
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in.txt"]


def test_a_dead_run_s_temporary_folder_is_removed(tmp_path):
    (tmp_path / "in.txt").write_text("abc def\n" * 30)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".ds.minitf-prepare-{int(dead.stdout)}"
    leftover.mkdir()
    (leftover / "train.bin").write_bytes(b"\0" * 10)
    prepare(tmp_path / "in.txt", tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "in.txt"]


def test_damaged_datasets_are_one_line_errors(tmp_path):
    (tmp_path / "in.txt").write_text("abc def\n" * 30)
    prepare(tmp_path / "in.txt", tmp_path / "ds")
    ds = tmp_path / "ds"
    with open(ds / "train.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 1)  # half an id
    with pytest.raises(DatasetError, match=r"train\.bin: .* not a whole number"):
        load_dataset(ds)
    prepare(tmp_path / "in.txt", ds)
    (ds / "tokenizer.json").write_text((ds / "tokenizer.json").read_text().replace('"a"', '"A"'))
    with pytest.raises(DatasetError, match=r"tokenizer\.json: does not match the SHA-256"):
        load_dataset(ds)
    prepare(tmp_path / "in.txt", ds)
    np.full(4, 60000, dtype="<u2").tofile(ds / "val.bin")
    record = json.loads((ds / "dataset.json").read_text())
    record["val"]["tokens"] = 4
    (ds / "dataset.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"val\.bin: token id 60000 at position 0 is not below"):
        load_dataset(ds).val[0:4]
    with pytest.raises(DatasetError, match="not a minitf dataset"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("split", ["train", "val", "tokenizer"])
@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/train.bin", "..", "", 5])
def test_a_record_naming_a_file_outside_the_folder_is_refused(tmp_path, split, name):
    (tmp_path / "in.txt").write_text("abc def\n" * 30)
    prepare(tmp_path / "in.txt", tmp_path / "ds")
    record = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    record[split]["file"] = name
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(record))
    with pytest.raises(DatasetError, match=f"file {name!r} must be a plain file name inside"):
        load_dataset(tmp_path / "ds")


def test_a_tokenizer_flag_that_contradicts_the_dataset_is_refused(corpus_path, tmp_path, capsys):
    prepare(corpus_path, tmp_path / "bpe", "bpe", vocab_size=300)
    base = ["--data", str(tmp_path / "bpe"), "--out", str(tmp_path / "run"), *TINY, "--steps", "1"]
    for flags, said in ((["--tokenizer", "char"], "--tokenizer char contradicts"),
                        (["--vocab-size", "512"], "--vocab-size 512 contradicts")):
        with pytest.raises(SystemExit) as e:
            train.main([*base, *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert said in err[0] and "its own bpe tokenizer of" in err[0], err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- bad input: one line, exit 2


def cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        prepare_cli.main([*argv, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("python -m minitf.prepare: error: ")
    return err[0]


def test_not_utf8_names_the_file_and_byte(tmp_path, capsys):
    data = bytearray(b"plain ascii text\n" * 80_000)  # 1.36 MB: past the first 1 MiB block
    data[1_300_001] = 0xFF
    (tmp_path / "big.txt").write_bytes(bytes(data))
    assert "big.txt: byte 1300001: not UTF-8 (invalid start byte)" in cli_error(
        capsys, str(tmp_path / "big.txt"), "--out", str(tmp_path / "ds"))
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("fine\n")
    (tmp_path / "books" / "b.txt").write_bytes("caf\u00e9".encode("utf-8")[:-1])  # cut inside é
    assert "error: b.txt: byte 3: not UTF-8 (unexpected end of data)" in cli_error(
        capsys, str(tmp_path / "books"), "--out", str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()
    # a lead byte at the end of one block, no continuation at the start of the next
    (tmp_path / "cut.txt").write_bytes("é€ab".encode("utf-8") + b"\xc3Xyz")
    for block_bytes in (1, 4, 7, 100):
        with pytest.raises(OSError, match=r"cut\.txt: byte 7: not UTF-8 \(invalid continuation byte\)"):
            prepare(tmp_path / "cut.txt", tmp_path / "ds", block_bytes=block_bytes)


def test_a_character_the_tokenizer_cannot_encode(tmp_path, capsys):
    train_tokenizer("char", "abc \n").save(tmp_path / "tok.json")
    (tmp_path / "in.txt").write_text("abc cab\n" * 300 + "ab ça\n", encoding="utf-8")
    line = cli_error(capsys, str(tmp_path / "in.txt"), "--out", str(tmp_path / "ds"), "--tokenizer", str(tmp_path / "tok.json"))
    assert f"in.txt: byte {8 * 300 + 3}: character 'ç' (U+00E7) cannot be encoded" in line
    # the same byte when the text arrives in many blocks and is encoded in many pieces; in
    # the training part, after a multi-byte character
    (tmp_path / "in2.txt").write_text("abc cab\n" * 100 + "ç" + "abc cab\n" * 150, encoding="utf-8")
    train_tokenizer("char", "abcç \n").save(tmp_path / "tok2.json")
    (tmp_path / "in3.txt").write_text("ç" + "abc cab\n" * 100 + "€" + "abc cab\n" * 100, encoding="utf-8")
    for block_bytes, piece_chars in ((3, 5), (64, 100), (1 << 20, 1 << 20)):
        with pytest.raises(DatasetError, match=r"in\.txt: byte 2403: character 'ç'"):
            prepare(tmp_path / "in.txt", tmp_path / "ds", tmp_path / "tok.json", block_bytes=block_bytes,
                    piece_chars=piece_chars)
        with pytest.raises(DatasetError, match=r"in2\.txt: byte 800: character 'ç'"):
            prepare(tmp_path / "in2.txt", tmp_path / "ds", tmp_path / "tok.json", block_bytes=block_bytes,
                    piece_chars=piece_chars)
        with pytest.raises(DatasetError, match=r"in3\.txt: byte 802: character '€'"):
            prepare(tmp_path / "in3.txt", tmp_path / "ds", tmp_path / "tok2.json", block_bytes=block_bytes,
                    piece_chars=piece_chars)
    # a char vocabulary learned from the training split does not know a character only in val
    (tmp_path / "val_only.txt").write_text("abc cab\n" * 300 + "ab €a\n", encoding="utf-8")
    line = cli_error(capsys, str(tmp_path / "val_only.txt"), "--out", str(tmp_path / "ds"))
    assert f"val_only.txt: byte {8 * 300 + 3}: character '€' (U+20AC)" in line and "training split" in line


def test_empty_and_too_short_corpora(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "the corpus is empty" in cli_error(capsys, str(tmp_path / "empty.txt"), "--out", str(tmp_path / "ds"))
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_bytes(b"")
    assert "empty (0 characters in 1 file)" in cli_error(capsys, str(tmp_path / "books"), "--out", str(tmp_path / "ds"))
    (tmp_path / "one.txt").write_bytes(b"x")
    assert "1 characters are too few to split" in cli_error(capsys, str(tmp_path / "one.txt"), "--out", str(tmp_path / "ds"))
    (tmp_path / "none").mkdir()
    assert "no files match '**/*.txt'" in cli_error(capsys, str(tmp_path / "none"), "--out", str(tmp_path / "ds"))


def test_empty_stdin(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minitf.prepare", "-", "--out", str(tmp_path / "ds"), "--quiet"],
                          input="", capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "python -m minitf.prepare: error: standard input: the corpus is empty (0 characters in 1 file)")
    assert os.listdir(tmp_path) == []


def test_a_vocabulary_too_large_for_the_dtype(tmp_path, capsys):
    chars = distinct_chars(66_000)
    (tmp_path / "cjk.txt").write_text(chars + chars[:7400], encoding="utf-8")
    line = cli_error(capsys, str(tmp_path / "cjk.txt"), "--out", str(tmp_path / "ds"), "--dtype", "uint16")
    assert "the tokenizer has 66000 tokens, too many for uint16 (ids up to 65535)" in line


def test_bad_paths_and_options(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("hello world\n" * 10)
    assert f"{tmp_path / 'nope.txt'}: no such file or folder" in cli_error(
        capsys, str(tmp_path / "nope.txt"), "--out", str(tmp_path / "ds"))
    (tmp_path / "file").write_text("not a folder")
    assert "output" in cli_error(capsys, str(tmp_path / "in.txt"), "--out", str(tmp_path / "file")) and \
        (tmp_path / "file").read_text() == "not a folder"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert "is not a minitf dataset" in cli_error(capsys, str(tmp_path / "in.txt"), "--out", str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert "tokenizer file not found" in cli_error(
        capsys, str(tmp_path / "in.txt"), "--out", str(tmp_path / "ds"), "--tokenizer", str(tmp_path / "no-tok"))
    assert "--vocab-size: 100 must be >= 256" in cli_error(
        capsys, str(tmp_path / "in.txt"), "--out", str(tmp_path / "ds"), "--tokenizer", "bpe", "--vocab-size", "100")
    # beyond what the BPE trainer can allocate (it would abort the process): refused by name
    assert "--vocab-size: 99999999999 must be in [256, 16777216]" in cli_error(
        capsys, str(tmp_path / "in.txt"), "--out", str(tmp_path / "ds"), "--tokenizer", "bpe",
        "--vocab-size", "99999999999")
    assert "--glob '/etc/*': patterns are relative to the folder" in cli_error(
        capsys, str(tmp_path / "mine"), "--out", str(tmp_path / "ds"), "--glob", "/etc/*")
    assert "--val-fraction 1.5 must be in (0, 1)" in cli_error(
        capsys, str(tmp_path / "in.txt"), "--out", str(tmp_path / "ds"), "--val-fraction", "1.5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.txt", "mine"]


def test_an_empty_output_folder_is_used(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("hello world\n" * 10)
    (tmp_path / "ds").mkdir()
    assert prepare_cli.main([str(tmp_path / "in.txt"), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    assert "train 108 tokens, val 12 tokens (uint16; char tokenizer, 9 tokens" in capsys.readouterr().out


def test_the_summary_says_1_source_file(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("abc def\n" * 30)
    assert prepare_cli.main([str(tmp_path / "in.txt"), "--out", str(tmp_path / "ds"), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("tokens; 1 source file)")
