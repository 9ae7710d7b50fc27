"""The suite's glue around engine.bench.harness: a pytest-benchmark Timer and rows appended to RESULTS_CSV.

RESULTS_CSV is $HFC_BENCH_CSV, else benchmarks/results.csv.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.bench.harness import Timer, append_csv, default_timer, median_time, result_row, sgemm_seconds

__all__ = ["RESULTS_CSV", "Timer", "default_timer", "median_time", "pytest_timer", "record", "save", "sgemm_seconds"]

RESULTS_CSV = Path(os.environ.get("HFC_BENCH_CSV", Path(__file__).parent / "results.csv"))


def pytest_timer(benchmark: Any, repeats: int) -> Timer:
    """A Timer backed by pytest-benchmark's ``benchmark`` fixture (one warm-up round discarded)."""

    def timer(fn: Callable[[], object]) -> tuple[float, float]:
        if benchmark.disabled:  # --benchmark-disable keeps no stats: one warm-up run through the fixture, one timed
            benchmark.pedantic(fn)
            return median_time(fn, repeats=1, warmup=0)
        benchmark.pedantic(fn, rounds=repeats, warmup_rounds=1, iterations=1)
        return benchmark.stats.stats.median, benchmark.stats.stats.iqr

    return timer


def save(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Append rows to RESULTS_CSV and return them."""
    append_csv(rows, RESULTS_CSV)
    return rows


def record(*args: Any, **kwargs: Any) -> dict[str, str]:
    """One :func:`engine.bench.harness.result_row` (same arguments), appended to RESULTS_CSV."""
    return save([result_row(*args, **kwargs)])[0]
