"""pytest-benchmark entry point for the KDE row of engine.bench.kde (shapes and baseline described there).

Run: ``python -m pytest benchmarks/bench_kde.py --benchmark-only``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import pytest_timer, save  # noqa: E402

from engine.bench.kde import FULL_N, kde_rows  # noqa: E402


def test_kde(benchmark):
    (row,) = save(kde_rows(FULL_N, pytest_timer(benchmark, 3)))
    benchmark.extra_info.update(row)
