"""pytest-benchmark entry points for the Mahalanobis rows of engine.bench.mahalanobis (shapes, baseline there).

Run: ``python -m pytest benchmarks/bench_mahalanobis.py --benchmark-only``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from harness import pytest_timer, save  # noqa: E402

from engine.bench.mahalanobis import CLASSES, maha_rows, multi_layer_rows  # noqa: E402


@pytest.mark.parametrize("c", CLASSES)
def test_mahalanobis(benchmark, c):
    (row,) = save(maha_rows(c, pytest_timer(benchmark, 5)))
    benchmark.extra_info.update(row)


def test_mahalanobis_layers(benchmark):
    (row,) = save(multi_layer_rows(pytest_timer(benchmark, 3)))
    benchmark.extra_info.update(row)
