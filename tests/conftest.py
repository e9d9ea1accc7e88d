"""Shared fixtures: the corpus path (never downloaded) and the repository root."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
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
