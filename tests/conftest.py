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


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    """TinyShakespeare from $MINITF_DATA, else ../shared/data/tinyshakespeare/input.txt.

    Missing data fails the test in CI (CI=true) and skips it elsewhere.
    """
    path = Path(os.environ.get("MINITF_DATA") or SHARED_CORPUS)
    if not path.is_file():
        message = f"corpus not found at {path}; set MINITF_DATA to TinyShakespeare's input.txt"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
