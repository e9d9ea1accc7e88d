"""Speed and peak memory of `python -m minitf.prepare` on a synthetic corpus.

    python bench/prepare_speed.py                          # 1 GiB, char tokenizer, 3 runs
    python bench/prepare_speed.py --size-mb 64 --tokenizer bpe --repeats 1

The corpus is generated from a fixed seed: words of 1-10 letters drawn from a Zipf-like
law, about one in a hundred with a non-ASCII letter, punctuation, and a newline every ~12
words; an 8 MiB block of it is written again and again up to --size-mb (MiB). Each run is a
fresh `python -m minitf.prepare CORPUS --out DIR --quiet` process; its wall time and its peak
resident set size are measured by GNU time (`/usr/bin/time -f "%e %M"`, the figures `-v`
reports as "Elapsed" and "Maximum resident set size"), and the medians reported with the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BLOCK = 8 << 20
TIME = "/usr/bin/time"  # GNU time: "%M" is the maximum resident set size in KiB


def synthetic_block(seed: int = 0) -> bytes:
    """About 8 MiB of word-like UTF-8 text, the same for a given seed."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    accented = list("éèàçöüñåø")
    words = []
    for _ in range(20_000):
        w = "".join(rng.choice(letters, size=int(rng.integers(1, 11))))
        if rng.random() < 0.01:
            w += accented[int(rng.integers(len(accented)))]
        if rng.random() < 0.1:
            w = w.capitalize()
        words.append(w)
    ranks = np.minimum(rng.zipf(1.3, size=2_000_000) - 1, len(words) - 1)
    ends = rng.choice(np.array([" ", " ", " ", " ", " ", " ", " ", " ", " ", ", ", ". ", "\n"]),
                      size=len(ranks))
    text = "".join(words[r] + e for r, e in zip(ranks.tolist(), ends.tolist()))
    data = text.encode("utf-8")[:BLOCK]
    return data[: len(data.decode("utf-8", errors="ignore").encode("utf-8"))]  # whole characters


def write_corpus(path: Path, size_mb: int) -> int:
    block = synthetic_block()
    total = size_mb << 20
    with open(path, "wb") as f:
        while f.tell() + len(block) <= total:
            f.write(block)
        f.write(block[: total - f.tell()].decode("utf-8", errors="ignore").encode("utf-8"))
    return path.stat().st_size


def run_once(corpus: Path, out: Path, tokenizer: str) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one prepare process, measured by GNU time.

    Not os.wait4 on our own child: Linux carries the parent's peak RSS over `exec`, so the
    child would be charged for this script's generated text.
    """
    cmd = [TIME, "-f", "%e %M", sys.executable, "-m", "minitf.prepare", str(corpus), "--out",
           str(out), "--quiet", "--tokenizer", tokenizer]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    wall, max_rss_kb = proc.stderr.split()[-2:]
    return float(wall), int(max_rss_kb) * 1024


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags]
    return f"{name} ({os.cpu_count()} cores; {', '.join(simd) or 'no AVX2'})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size-mb", type=int, default=1024, help="corpus size in MiB")
    p.add_argument("--tokenizer", default="char", help="char, bpe, or a tokenizer path")
    p.add_argument("--repeats", type=int, default=3, help="runs to take the median of")
    p.add_argument("--workdir", default=None, help="where to put the corpus and dataset (default: a temporary folder)")
    args = p.parse_args(argv)
    if not os.access(TIME, os.X_OK):
        p.error(f"{TIME} (GNU time) is needed to measure the peak resident memory")
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        corpus = Path(d) / "corpus.txt"
        size = write_corpus(corpus, args.size_mb)
        print(f"corpus: {size:,} bytes; CPU: {cpu_name()}; load average before: "
              f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        walls, peaks = [], []
        for i in range(args.repeats):
            wall, peak = run_once(corpus, Path(d) / "dataset", args.tokenizer)
            walls.append(wall)
            peaks.append(peak)
            print(f"run {i + 1}: {wall:.1f} s, {size / wall / 1e6:.1f} MB/s, peak RSS {peak / 1e6:.0f} MB")
        wall, peak = statistics.median(walls), statistics.median(peaks)
        print(f"median of {args.repeats}: {wall:.1f} s, {size / wall / 1e6:.1f} MB/s, "
              f"peak RSS {peak / 1e6:.0f} MB (max {max(peaks) / 1e6:.0f} MB); "
              f"tokenizer {args.tokenizer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
