"""Shared fixtures: the corpus path (never downloaded) and the repository root."""

import os
from pathlib import Path

import pytest

import minitf

REPO = Path(__file__).resolve().parent.parent
# CI runs the tests against the installed wheel and says where it is installed: a minitf
# imported from anywhere else (the checkout) fails the run at once
if os.environ.get("MINITF_INSTALLED") and not minitf.__file__.startswith(os.environ["MINITF_INSTALLED"]):
    raise RuntimeError(f"minitf is imported from {minitf.__file__}, not from the installed "
                       f"package in {os.environ['MINITF_INSTALLED']}")


def pytest_report_header(config):
    return f"minitf: {Path(minitf.__file__).parent}"
SHARED_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
# where the tests read TinyShakespeare: $MINITF_DATA, else the shared folder beside the checkout
CORPUS = Path(os.environ.get("MINITF_DATA") or SHARED_CORPUS).absolute()
CORPUS_MISSING = f"TinyShakespeare not found at {CORPUS}; set MINITF_DATA=/path/to/input.txt"


def in_ci() -> bool:
    """CI says so (CI=true), or runs the tests against the installed wheel (.ci/run)."""
    return os.environ.get("CI") == "true" or bool(os.environ.get("MINITF_INSTALLED"))


def missing(message: str):
    """Something a test needs from outside minitf is not there: the test fails in CI, which
    must prove everything, and skips elsewhere (the run's summary counts the corpus' skips)."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    """TinyShakespeare's input.txt at CORPUS; missing, see `missing`."""
    if not CORPUS.is_file():
        missing(CORPUS_MISSING)
    return CORPUS


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    # a run without the corpus passes with a sixth of the tests skipped: say so last, after
    # pytest's short summary (this wrapper is outside the terminal reporter's)
    yield
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and CORPUS_MISSING in r.longrepr[2]]
    if skipped:
        n = len(skipped)
        terminalreporter.write_line(f"{n} test{'s' if n > 1 else ''} skipped: {CORPUS_MISSING}",
                                    red=True, bold=True)
