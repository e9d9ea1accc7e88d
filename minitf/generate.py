"""Generate text: prefill the prompt, then sample token by token with a KV cache, streaming.

    python -m minitf.generate                                   # the shipped model
    python -m minitf.generate --prompt "ROMEO:" --max-new-tokens 200 --seed 1
    python -m minitf.generate --backend numba --temperature 0   # greedy
    python -m minitf.generate --model runs/char --top-k 40 --top-p 0.95
    python -m minitf.generate --num-samples 8 --seed 1 --stop "\\n\\n"
    echo "JULIET:" | python -m minitf.generate --prompt-file - --stats

Past the context, --context-mode shift (default) keeps the last --keep tokens and
re-prefills them once; exact re-prefills the last block_size tokens for every token (see
minitf.engine and docs/generation.md). --num-samples N decodes N samples together, sample i
drawing with seed --seed + i, so each is what `--seed <that seed>` alone gives.
"""

from __future__ import annotations

import re
import secrets
import sys
import time
from pathlib import Path

from .cli import (Parser, add_backend_argument, fail, guarded, nonneg_int, path_argument,
                  positive_int, prog_name, ruled)
from .data import read_stream_bytes, read_text_bytes
from .engine import CONTEXT_MODES, GenerationStats, load_engine
from .kernels import describe
from .sampling import TEMPERATURE, TOP_K, TOP_P, Sampler, validate_sampling
from .threads import set_threads
from .tokenizer import TokenizerError, check_unicode

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def unescape(text: str) -> str:
    """Backslash escapes of a command-line string: \\n, \\t, \\r, \\\\, \\", \\'; any other
    backslash is kept as it is."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), text)


def build_parser() -> Parser:
    p = Parser(
        prog=prog_name("minitf.generate"),
        description="Sample text from a minitf model (default: the shipped TinyShakespeare model).",
        epilog='examples: python -m minitf.generate --prompt "ROMEO:" --max-new-tokens 200 --seed 1\n'
               '          python -m minitf.generate --num-samples 8 --seed 1 --stop "\\n\\n"',
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, help='text to continue (default: empty, which starts from a newline)')
    source.add_argument("--prompt-file", default=None, metavar="PATH", help="read the prompt from a UTF-8 file, or '-' for standard input")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=200, help="tokens to generate per sample (may exceed the context, see --context-mode)")
    p.add_argument("--temperature", type=ruled(float, TEMPERATURE), default=1.0, help="softmax temperature; 0 means greedy")
    p.add_argument("--top-k", type=ruled(int, TOP_K), default=0, help="keep the k most likely tokens (0: off; above the vocabulary: off)")
    p.add_argument("--top-p", type=ruled(float, TOP_P), default=0.9, help="nucleus sampling: keep the smallest set reaching this probability, in (0, 1]")
    p.add_argument("--seed", type=nonneg_int, default=None, help="random seed; sample i of --num-samples uses seed + i (default: fresh randomness, the seed is printed to stderr)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="samples of the prompt, decoded together")
    p.add_argument("--stop", action="append", default=[], metavar="STRING", help="end a sample before STRING (repeatable; \\n \\t \\r \\\\ are understood)")
    p.add_argument("--context-mode", choices=CONTEXT_MODES, default="shift", help="past the context: shift keeps the last --keep tokens and re-prefills them once; exact makes every token see the last block_size tokens (a re-prefill per token)")
    p.add_argument("--keep", type=positive_int, default=None, help="tokens kept by --context-mode shift when the context is full (default: half the context)")
    p.add_argument("--model", default=None, type=path_argument, help="model directory (default: the shipped model)")
    p.add_argument("--viz", default=None, type=path_argument, metavar="DIR", help="also write attn_prefill.png and memory_log.png/.csv to DIR (one sample)")
    p.add_argument("--stats", action="store_true", help="print prefill, in-context decode and re-prefill times and rates to stderr")
    add_backend_argument(p)
    return p


def read_prompt(args) -> str:
    """The prompt text: --prompt, --prompt-file PATH or '-' (stdin), else empty."""
    if args.prompt_file is None:
        return args.prompt or ""
    name = "standard input" if args.prompt_file == "-" else args.prompt_file
    if args.prompt_file == "-" and sys.stdin is None:  # started with stdin closed (<&-)
        raise OSError("--prompt-file -: standard input is closed; give the prompt with a pipe, "
                      "--prompt or --prompt-file PATH")
    try:  # a file is refused by name if it is not a regular one, or too large to read
        data = (read_stream_bytes(sys.stdin.buffer, "--prompt-file - (standard input)")
                if args.prompt_file == "-" else read_text_bytes(args.prompt_file, "--prompt-file"))
    except FileNotFoundError:
        raise OSError(f"--prompt-file {name}: cannot read it (no such file)") from None
    try:
        # a byte-order mark is not part of the prompt (as Python's utf-8-sig reads it)
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {name}: not UTF-8 text ({e.reason} at byte {e.start})") from e


class StopText:
    """The text of one sample as it streams, cut before the first of `stops`.

    `push(token)` returns the text that can be shown now: the tail that could still begin
    a stop string is held back until the next tokens decide."""

    def __init__(self, stream, stops: list[str]):
        self.stream, self.stops = stream, stops
        self.pending, self.stopped = "", False

    def _cut(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                    if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.stream.push(token)
        return self._cut(final=False)

    def finish(self) -> str:
        """The rest of the text once no token comes any more."""
        if self.stopped:
            return ""
        self.pending += self.stream.flush()
        return self._cut(final=True)


def stats_lines(stats: GenerationStats, total_s: float, backend: str, path: str, mode: str,
                keep: int | None, threads: int) -> list[str]:
    """The --stats report: prefill, in-context decode and re-prefill apart, then overall,
    then which build and int8 tile the backend ran (`minitf.kernels.describe`)."""
    per = lambda s, n: f"{s / n * 1e3:.3f} ms/token, {n / s:,.0f} tokens/s"
    context = f"context {mode}" + (f", keep {keep}" if mode == "shift" else "")
    lines = [f"stats: backend {backend}, {path} path, {threads} thread{'s' if threads > 1 else ''}, "
             f"{stats.rows} sample(s), {context} "
             "(after a warm-up pass that loads the compiled kernels)"]
    if not stats.new_tokens:
        return lines + ["  no tokens generated"]
    lines.append(f"  prefill      {stats.prefill_tokens:>6} tokens  {stats.prefill_s * 1e3:.3f} ms, "
                 f"{stats.prefill_tokens / stats.prefill_s:,.0f} tokens/s (the prompt{'s' if stats.rows > 1 else ''})")
    if stats.decode_tokens:
        steps = f", {stats.decode_s / stats.decode_steps * 1e3:.3f} ms per step of {stats.decode_tokens / stats.decode_steps:.1f} rows" if stats.rows > 1 else ""
        lines.append(f"  decode       {stats.decode_tokens:>6} tokens  {per(stats.decode_s, stats.decode_tokens)} "
                     f"(in the context, KV cache{steps})")
    else:
        lines.append("  decode            0 tokens  (every token came from a prefill's logits)")
    if stats.reprefills:
        lines.append(f"  re-prefill   {stats.reprefills:>6} x {stats.reprefill_tokens / stats.reprefills:.0f} tokens  "
                     f"{stats.reprefill_s / stats.reprefills * 1e3:.3f} ms each, "
                     f"{stats.reprefill_s / stats.new_tokens * 1e3:.3f} ms per new token (past the context)")
    forward_s = stats.prefill_s + stats.decode_s + stats.reprefill_s
    model = f"  model        {stats.new_tokens:>6} tokens  {per(forward_s, stats.new_tokens)} (prefill, decode and re-prefill)"
    if stats.decode_tokens:
        model += f", {forward_s / stats.new_tokens / (stats.decode_s / stats.decode_tokens):.2f}x the in-context decode"
    lines += [model, f"  sampling     {stats.new_tokens:>6} tokens  {stats.sample_s / stats.new_tokens * 1e3:.3f} ms/token"]
    return lines + [f"  all          {stats.new_tokens:>6} tokens  {per(total_s, stats.new_tokens)} (the whole run: the model, sampling and text)",
                    f"  kernels      {describe(backend)}"]


@guarded
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.keep is not None and args.context_mode != "shift":
        fail(parser, f"--keep {args.keep} applies to --context-mode shift only")
    if args.viz and args.num_samples > 1:
        fail(parser, f"--viz records one sample; got --num-samples {args.num_samples}")
    stops = [unescape(s) for s in args.stop]
    if "" in stops:
        fail(parser, "--stop '' is empty: give the string the text should stop before")
    for stop in stops:  # bytes that are not UTF-8 could never match the text: refused as prompts are
        try:
            check_unicode(stop)
        except TokenizerError as e:
            fail(parser, f"--stop: {e}")
    try:
        threads = args.threads if args.threads is not None else 1
        set_threads(threads)
        engine, tokenizer, ckpt = load_engine(args.model, args.backend)
        validate_sampling(args.temperature, args.top_k or None, args.top_p, tokenizer.vocab_size)
        text = read_prompt(args)
        prompt_ids = [int(t) for t in tokenizer.encode(text if text else "\n")]
        if not prompt_ids:  # e.g. a BPE tokenizer given only characters it merges away
            prompt_ids = [int(t) for t in tokenizer.encode("\n")]
        seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
        engine.check_rows(args.num_samples, "--num-samples")  # before a sampler is made
        if args.keep is not None:
            engine.check_keep(args.keep, "--keep")
        samplers = [Sampler(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                            seed=seed + i) for i in range(args.num_samples)]
        rows = [StopText(tokenizer.decode_stream(), stops) for _ in samplers]
    except (ValueError, OSError) as e:
        fail(parser, str(e))
    B = engine.config.block_size
    if args.stats:  # load the compiled kernels first, so that the figures are the steps'
        engine.prefill(prompt_ids[:1], last_only=True)
        engine.decode(prompt_ids[0])
    recorder = None
    if args.viz:
        # imported only for --viz: a plain run never loads tracemalloc or the plotting code
        from .viz import Recorder

        try:
            Path(args.viz).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(parser, f"--viz {args.viz!r}: cannot create the directory ({e.strerror or e})")
        # one untraced prefill and decode step first, so that loading compiled kernels
        # (numba's cache, and what its first call keeps) is not counted as activations in
        # the memory log; the generation's own prefill starts the cache again
        engine.prefill(prompt_ids[-B:])
        engine.decode(prompt_ids[-1])
        recorder = Recorder(engine, tokenizer, prompt_ids[-B:], args.viz, model_name=str(ckpt.path.name))
    try:  # the generation takes over the caches the warm-up used
        stats = GenerationStats()
        steps = engine.generate_batch([prompt_ids] * args.num_samples, args.max_new_tokens, samplers,
                                      context_mode=args.context_mode, keep=args.keep,
                                      stop=lambda r, token: rows[r].stopped, stats=stats)
    except (ValueError, OSError) as e:
        fail(parser, str(e))
    if args.seed is None and args.temperature > 0:
        print(f"seed {seed} (none given; --seed {seed} repeats this run)", file=sys.stderr)
    if len(prompt_ids) > B:
        print(f"note: the prompt has {len(prompt_ids)} tokens; the model sees its last {B} (the context)",
              file=sys.stderr)

    out = sys.stdout
    n = args.num_samples
    texts = [[] for _ in range(n)]  # the text of samples 1..n-1, shown once they end
    counts = [0] * n
    shown = [0, text]  # samples written out in full; the text written of sample 0

    def header(r: int) -> str:
        if n == 1:
            return ""
        seeded = f", seed {seed + r}" if args.temperature > 0 else ""
        return f"--- sample {r + 1} of {n}{seeded} ---\n"

    def write_finished(finished: list[bool]) -> None:
        """Write out every finished sample after those already shown, in order, each
        ending with a newline (sample 0 was streamed: only its end is left)."""
        while shown[0] < n and finished[shown[0]]:
            r = shown[0]
            if r == 0:
                body = rows[0].finish()
                last = (shown[1] + body)[-1:]
            else:
                body = header(r) + text + "".join(texts[r]) + rows[r].finish()
                last = body[-1:]
            out.write(body + ("" if last == "\n" else "\n"))
            out.flush()
            shown[0] += 1

    t = time.perf_counter()
    try:
        out.write(header(0) + text)
        out.flush()
        for step in steps:
            for r, token in enumerate(step):
                if token is None:
                    continue
                counts[r] += 1
                piece = rows[r].push(token)
                if r == 0:  # streamed as it comes
                    out.write(piece)
                    out.flush()
                    shown[1] = (shown[1] + piece)[-1:]
                else:
                    texts[r].append(piece)
            write_finished([rows[r].stopped or counts[r] == args.max_new_tokens for r in range(n)])
    except KeyboardInterrupt:  # Ctrl-C: the text so far ends its line; the status says it
        if shown[0] == 0 and shown[1] != "\n":  # sample 0 streamed, and not at a line's end
            out.write("\n")
        out.flush()
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except ValueError as e:  # e.g. logits that overflow to NaN in a damaged model
        out.write("\n")
        fail(parser, f"generation stopped: {e}")
    write_finished([True] * n)
    total = time.perf_counter() - t
    out.flush()
    if recorder is not None:
        for path in recorder.finish():
            print(f"wrote {path}", file=sys.stderr)
    if args.stats:
        keep = args.keep if args.keep is not None else max(1, B // 2)
        for line in stats_lines(stats, total, engine.backend, engine.path.NAME, args.context_mode,
                                keep, threads):
            print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
