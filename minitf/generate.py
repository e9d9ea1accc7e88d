"""Generate text: prefill the prompt, then sample token by token with a KV cache, streaming.

    python -m minitf.generate                                   # the shipped model
    python -m minitf.generate --prompt "ROMEO:" --max-new-tokens 200 --seed 1
    python -m minitf.generate --backend numba --temperature 0   # greedy
    python -m minitf.generate --model runs/char --top-k 40 --top-p 0.95
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .cli import Parser, add_backend_argument, fail, guarded, nonneg_int
from .engine import load_engine
from .kernels import describe
from .sampling import Sampler, validate_sampling
from .threads import set_threads


def build_parser() -> Parser:
    p = Parser(
        prog="python -m minitf.generate",
        description="Sample text from a minitf model (default: the shipped TinyShakespeare model).",
        epilog='example: python -m minitf.generate --prompt "ROMEO:" --max-new-tokens 200 --seed 1',
    )
    p.add_argument("--prompt", default="", help='text to continue (default: empty, which starts from a newline)')
    p.add_argument("--max-new-tokens", type=nonneg_int, default=200, help="tokens to generate (may exceed the context: the window slides)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 means greedy")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="keep the k most likely tokens (0: off; above the vocabulary: off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: keep the smallest set reaching this probability, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh randomness each run)")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--viz", default=None, metavar="DIR", help="also write attn_prefill.png and memory_log.png/.csv to DIR")
    p.add_argument("--stats", action="store_true", help="print prefill ms and decode ms/token to stderr")
    add_backend_argument(p)
    return p


@guarded
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        set_threads(args.threads if args.threads is not None else 1)
        engine, tokenizer, ckpt = load_engine(args.model, args.backend)
        validate_sampling(args.temperature, args.top_k or None, args.top_p, tokenizer.vocab_size)
        prompt = args.prompt if args.prompt else "\n"
        prompt_ids = [int(t) for t in tokenizer.encode(prompt)]
        sampler = Sampler(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                          seed=args.seed)
    except (ValueError, OSError) as e:
        fail(parser, str(e))
    if not prompt_ids:  # e.g. a BPE tokenizer given only characters it merges away
        prompt_ids = [int(t) for t in tokenizer.encode("\n")]
    B = engine.config.block_size
    if len(prompt_ids) > B:
        print(f"note: the prompt has {len(prompt_ids)} tokens; the model sees its last {B} (the context)",
              file=sys.stderr)

    recorder = None
    if args.viz:
        # imported only for --viz: a plain run never loads tracemalloc or the plotting code
        from .viz import Recorder

        try:
            Path(args.viz).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            fail(parser, f"--viz {args.viz!r}: cannot create the directory ({e.strerror or e})")
        # one untraced pass first, so that loading compiled kernels (numba's cache) is not
        # counted as activations in the memory log
        engine.prefill(prompt_ids[-B:])
        recorder = Recorder(engine, tokenizer, prompt_ids[-B:], args.viz, model_name=str(ckpt.path.name))

    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    stream = tokenizer.decode_stream()
    times = []
    t = time.perf_counter()
    try:
        for token in engine.generate(prompt_ids, args.max_new_tokens, sampler):
            now = time.perf_counter()
            times.append(now - t)
            t = now
            out.write(stream.push(token))
            out.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except ValueError as e:  # e.g. logits that overflow to NaN in a damaged model
        out.write("\n")
        fail(parser, f"generation stopped: {e}")
    out.write(stream.flush() + "\n")
    out.flush()
    if recorder is not None:
        for path in recorder.finish():
            print(f"wrote {path}", file=sys.stderr)
    if args.stats and times:
        decode = sorted(times[1:]) or [0.0]
        print(f"backend {engine.backend}: prefill {len(prompt_ids[-B:])} tokens + first sample "
              f"{times[0] * 1e3:.2f} ms (the first call also loads compiled kernels); decode median {decode[len(decode) // 2] * 1e3:.3f} ms/token "
              f"over {len(times) - 1} tokens", file=sys.stderr)
        print(f"kernels: {describe(engine.backend)}; the {engine.path.NAME} path", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
