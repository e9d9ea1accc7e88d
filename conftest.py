"""Project-wide pytest configuration: `pytest` runs the tests, `pytest --benchmark` the benchmarks."""

import pathlib

import pytest

BENCH_DIR = pathlib.Path(__file__).parent / "bench"


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the bench/ suite (pytest-benchmark) instead of the tests",
    )


def pytest_ignore_collect(collection_path, config):
    # Plain `pytest` stays quick: benchmarks run only when asked for, and then alone.
    in_bench = BENCH_DIR == collection_path or BENCH_DIR in collection_path.parents
    if config.getoption("--benchmark"):
        return None if in_bench or collection_path in BENCH_DIR.parents else True
    return True if in_bench else None
