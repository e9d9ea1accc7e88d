"""Tokenize a text corpus once into a dataset folder that train and evaluate read window by
window (np.memmap), whatever its size.

    python -m minitf.prepare input.txt --out data/shakespeare          # char tokenizer
    python -m minitf.prepare books/ --out data/books --tokenizer bpe --vocab-size 4096
    cat a.txt b.txt | python -m minitf.prepare - --out data/ab --tokenizer runs/char
    python -m minitf.train --data data/shakespeare --out runs/char

The folder format, the split rule and the memory bounds are described in minitf.dataset.
"""

from __future__ import annotations

import sys

from .cli import Parser, bpe_vocab_size, fail, guarded, path_argument, positive_int, prog_name
from .dataset import DTYPES, prepare


def build_parser() -> Parser:
    p = Parser(
        prog=prog_name("minitf.prepare"),
        description="Tokenize a text file, a folder of text files or standard input into "
                    "train.bin / val.bin, a tokenizer and a dataset.json record.",
        epilog="example: python -m minitf.prepare input.txt --out data/shakespeare --tokenizer bpe",
    )
    p.add_argument("source", help="a UTF-8 text file, a folder of them, or - for standard input")
    p.add_argument("--out", required=True, type=path_argument, help="dataset folder to write (new, empty, or a dataset to replace)")
    p.add_argument("--tokenizer", default="char",
                   help="char or bpe: train one on the training split; else a tokenizer.json or a "
                        "folder holding one (a model, a dataset) to use as it is")
    p.add_argument("--vocab-size", type=bpe_vocab_size, default=1024, help="BPE vocabulary size (ignored for char)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each document's characters that goes to validation")
    p.add_argument("--separator", default="\n\n", help="text between documents within a split (default: two newlines)")
    p.add_argument("--glob", default="**/*.txt", help="which files of a folder to read (hidden ones are skipped)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="token id type; auto: uint16 when the vocabulary fits")
    p.add_argument("--bpe-max-chars", type=positive_int, default=5_000_000,
                   help="train BPE on at most this many characters (the training split's first)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@guarded
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        fail(parser, f"--val-fraction {args.val_fraction} must be in (0, 1)")
    try:
        record = prepare(args.source, args.out, args.tokenizer, vocab_size=args.vocab_size,
                         val_fraction=args.val_fraction, separator=args.separator, glob=args.glob,
                         dtype=args.dtype, bpe_max_chars=args.bpe_max_chars, progress=not args.quiet)
    except MemoryError:
        fail(parser, "out of memory: for BPE, lower --bpe-max-chars")
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted; {args.out} was left as it was", file=sys.stderr)
        return 130
    train, val = record["train"], record["val"]
    print(f"{args.out}: train {train['tokens']:,} tokens, val {val['tokens']:,} tokens "
          f"({record['dtype']}; {record['tokenizer']['kind']} tokenizer, {record['vocab_size']} "
          f"tokens; {len(record['sources'])} source file{'' if len(record['sources']) == 1 else 's'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
