"""What every minitf command line shares: one-line errors and exit statuses, the --backend
and --threads flags.

Every command's `main` runs under `guarded`, so whatever goes wrong ends in one line on
standard error and a defined exit status, never a traceback:

    0    done; also when the reader of standard output went away (`| head`)
    2    bad input or a failed write: a bad flag or value, a missing, damaged or locked
         checkpoint, a size beyond the limits, a full disk, a closed or full standard
         output, text its encoding cannot hold, a path in a symlink loop
    130  interrupted (SIGINT, Ctrl-C)
    1    an internal error (a bug): the line says so, and MINITF_DEBUG=1 shows the
         traceback; also a training run that diverged (a NaN or inf loss: train says so
         on one line and keeps the last good checkpoint)

Warnings (e.g. the recovery of an interrupted save) are one line too. Free-text arguments
(--prompt, --stop, --separator) that arrive as bytes that are not the locale's encoding but
are UTF-8 (a UTF-8 terminal under LC_ALL=C with PYTHONUTF8=0) are read as UTF-8; paths are
left as the system gave them.
"""

from __future__ import annotations

import argparse
import errno
import functools
import io
import os
import re
import sys
import warnings
from typing import Callable, NoReturn

from .config import MAX_BPE_VOCAB_SIZE, Rule
from .threads import THREADS

BACKEND_CHOICES = ("numpy", "numba", "cython", "auto")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter,
                         argparse.RawDescriptionHelpFormatter):
    """Show "(default: X)" unless the help already says what the default is; the
    description and the examples keep their own lines."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# free text, never a path: read as UTF-8 when the locale could not decode it
TEXT_ARGUMENTS = ("prompt", "stop", "separator")


def prog_name(module: str) -> str:
    """The command as the user typed it, for usage lines and messages: the console script's
    name (pyproject.toml's [project.scripts], "minitf-" and the module's last name, e.g.
    minitf-generate) when that is what runs, else "python -m <module>" (`python -m`, or a
    command's main called from Python)."""
    script = "minitf-" + module.rsplit(".", 1)[-1]
    typed = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if typed.removesuffix(".exe") == script:  # a console script (a Windows one ends in .exe)
        return script
    return "python -m " + module


class Parser(argparse.ArgumentParser):
    """argparse with every default shown in --help and errors on one line, exit status 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(**kwargs)
        # a flag's value that starts with "-" is taken for a value, so that its check names
        # it, when it is a number: argparse's own pattern knows -3 and -0.5, not -1e-3, -inf
        # or -nan ("expected one argument"). No minitf flag looks like a number.
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for name in TEXT_ARGUMENTS:
            value = getattr(namespace, name, None)
            if isinstance(value, str):
                setattr(namespace, name, text_argument(value))
            elif isinstance(value, list):
                setattr(namespace, name, [text_argument(v) if isinstance(v, str) else v
                                          for v in value])
        return namespace, extras


def text_argument(value: str) -> str:
    """A free-text argument as the user typed it: Python decodes the command line with the
    locale's encoding and keeps undecodable bytes as lone surrogates (surrogateescape); if
    those bytes are UTF-8 (a UTF-8 terminal under a C locale), decode them as UTF-8. Bytes
    that are not UTF-8 stay surrogates, for the tokenizer to refuse by name."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(value).decode("utf-8")
    except (UnicodeError, ValueError):
        return value


def path_argument(value: str) -> str:
    """A path argument (argparse type): any text but the empty string, which would name
    the current directory by accident (`--out "$UNSET_VARIABLE"`)."""
    if not value:
        raise argparse.ArgumentTypeError("an empty path; give a directory or file name")
    return value


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Report a bad value on one line and exit with status 2 (argparse's convention)."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """--backend (default: $MINITF_BACKEND, else auto) and --threads."""
    parser.add_argument(
        "--backend",
        default=None,
        help=f"kernel backend, one of {', '.join(BACKEND_CHOICES)} "
             f"(default: $MINITF_BACKEND, else auto; now {os.environ.get('MINITF_BACKEND') or 'auto'})",
    )
    add_threads_argument(parser)


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """--data: the corpus, as minitf.data.load_corpus resolves it."""
    parser.add_argument(
        "--data", default=None, type=path_argument,
        help="corpus text file, or a dataset folder from python -m minitf.prepare (whose "
             "tokenizer is then used) (default: $MINITF_DATA, else ~/.cache/minitf, else a "
             "verified download)",
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=ruled(int, THREADS), default=None,
        # 1 for inference: its matmuls are small, and a second BLAS thread that spins while
        # the other core is busy made quantize's validation 10x slower (measured)
        help="threads: for generate, evaluate and quantize, BLAS's and those of minitf's "
             "fused kernels, which split GPT-2-sized layers over them (default 1); for "
             "train, the step's, each running a block of the batch's rows with "
             "single-threaded BLAS (default: every core)",
    )


def int_at_least(low: int):
    """An argparse type: an integer >= low, else a message naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def int_between(low: int, high: int):
    """An argparse type: an integer in [low, high], else a message naming the value."""
    at_least = int_at_least(low)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"{value} must be in [{low}, {high}]")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def ruled(convert: Callable[[str], object], rule: Rule):
    """An argparse type: `convert(text)` (int or float), then `rule`, the config.Rule the
    Python API checks the same setting with, so that a flag and its parameter allow the same
    values and the rule is written once. argparse names the flag:
    "argument --top-p: 1.5 is not allowed: it must be a number in (0, 1] ...", and text
    that `convert` refuses the same way: "argument --threads: 'two' is not allowed: it must
    be an integer in [1, 2] ..."."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not allowed: it must be {rule.allowed}") from None
        if not rule.allows(value):
            raise argparse.ArgumentTypeError(f"{text} is not allowed: it must be {rule.allowed}")
        return value

    parse.__name__ = convert.__name__
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
bpe_vocab_size = int_between(256, MAX_BPE_VOCAB_SIZE)  # the 256 bytes, then merges


# ----------------------------------------------------------------------------------------
# One line and an exit status for whatever goes wrong


class OutputError(OSError):
    """Standard output cannot be written: closed, full, or its encoding lacks a character."""


class _Stdout(io.TextIOBase):
    """sys.stdout as seen by a command: its writes raise OutputError with one clear line
    (BrokenPipeError stays itself: the reader went away)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if self._stream is None:
            raise OutputError(errno.EBADF, "cannot write standard output: it is closed")
        try:
            return self._stream.write(text)
        except UnicodeEncodeError as e:
            c = e.object[e.start]
            raise OutputError(errno.EILSEQ, (
                f"cannot print {c!r} (U+{ord(c):04X}): standard output's encoding "
                f"({e.encoding}, from the locale) has no such character; use a UTF-8 locale "
                f"(LC_ALL=C.UTF-8) or set PYTHONUTF8=1")) from None
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(e.errno, f"cannot write standard output: {e.strerror or e}") from None

    def flush(self) -> None:
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(e.errno, f"cannot write standard output: {e.strerror or e}") from None

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._stream is not None and self._stream.isatty()

    def fileno(self) -> int:
        if self._stream is None:
            raise OutputError(errno.EBADF, "cannot write standard output: it is closed")
        return self._stream.fileno()

    def __getattr__(self, name):  # encoding, errors, buffer, ...
        return getattr(self._stream, name)


def error_line(e: BaseException) -> str:
    """An exception as one line: an OSError as "file: reason", anything else its message
    with line breaks folded."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, OSError) and e.strerror and not e.filename:
        text = e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split("\n")).strip()


def _fill_closed_std_fds() -> bool:
    """Give a closed fd 0, 1 or 2 /dev/null, so that no file minitf opens gets one of their
    numbers (and some library's print lands in a checkpoint). True if stdout was closed."""
    closed_stdout = False
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this fd
            closed_stdout |= fd == 1
    return closed_stdout


def guarded(main: Callable[..., int]) -> Callable[..., int]:
    """Run a command's `main(argv=None) -> int` so that everything ends in one line on
    standard error and the exit status of the module docstring. Its own messages (argparse,
    `fail`) and statuses pass through.

    Errors raise SystemExit with their status, as `fail` and argparse do; a finished,
    interrupted or quietly ended run returns its status (`sys.exit(main())`).
    """

    @functools.wraps(main)
    def run(argv=None) -> int:
        spec = getattr(sys.modules.get(main.__module__), "__spec__", None)  # __main__ under -m
        module = spec.name if spec is not None else main.__module__
        prog = prog_name(module.removesuffix(".__main__"))  # a package's __main__: its name
        stdout_closed = _fill_closed_std_fds()
        real_stdout, real_showwarning = sys.stdout, warnings.showwarning
        sys.stdout = _Stdout(None if stdout_closed or real_stdout is None else real_stdout)
        warnings.showwarning = functools.partial(_one_line_warning, prog)
        try:
            status = main(argv)
            sys.stdout.flush()  # a full or closed output shows here, not at interpreter exit
            return status
        except BrokenPipeError:  # the reader went away (| head): stop quietly
            _silence(real_stdout)
            return 0
        except KeyboardInterrupt:
            print(f"\n{prog}: interrupted", file=sys.stderr)
            return 130
        except MemoryError:
            print(f"{prog}: error: out of memory; choose a smaller model, batch or input",
                  file=sys.stderr)
            sys.exit(2)
        except (ValueError, OSError) as e:  # bad input, a damaged file, a failed write
            if isinstance(e, OutputError):
                _silence(real_stdout)
            print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
            sys.exit(2)  # as `fail` and argparse do
        except Exception as e:  # noqa: BLE001 - a bug: say so on one line
            if isinstance(e, RuntimeError) and str(e).startswith("Symlink loop"):
                # a path given in a loop of links (pathlib's resolve() before Python 3.13)
                print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
                sys.exit(2)
            if os.environ.get("MINITF_DEBUG"):
                raise
            print(f"{prog}: internal error: {type(e).__name__}: {error_line(e)} (a bug in "
                  f"minitf; please report it with the command; MINITF_DEBUG=1 shows the "
                  f"traceback)", file=sys.stderr)
            sys.exit(1)
        finally:
            sys.stdout, warnings.showwarning = real_stdout, real_showwarning

    return run


def _one_line_warning(prog, message, category, filename, lineno, file=None, line=None):
    print(f"{prog}: warning: {error_line(Warning(str(message)))}", file=file or sys.stderr)


def _silence(stream) -> None:
    """Point a broken standard output at /dev/null, so that the interpreter's last flush at
    exit has nothing to complain about."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
