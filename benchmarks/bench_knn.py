"""pytest-benchmark entry point for the k-NN / LID rows of engine.bench.knn (shapes and baselines described there).

Run: ``python -m pytest benchmarks/bench_knn.py --benchmark-only``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from harness import pytest_timer, save  # noqa: E402

from engine.bench.knn import FULL_N, knn_rows  # noqa: E402


@pytest.mark.parametrize("n", [FULL_N])
def test_knn_lid(benchmark, n):
    rows = save(knn_rows(n, pytest_timer(benchmark, 3)))
    benchmark.extra_info.update({f"{r['op']}: {r['baseline']}": r["speedup"] for r in rows})
    benchmark.extra_info.update(rows[0])
