"""pytest-benchmark entry points for the GMM rows of engine.bench.gmm (shapes and baselines described there).

Run: ``python -m pytest benchmarks/bench_gmm.py --benchmark-only``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from harness import pytest_timer, save  # noqa: E402

from engine.bench.gmm import QUICK_SHAPES, gmm_rows, hfc_rows  # noqa: E402


@pytest.mark.parametrize("d,k", QUICK_SHAPES)
def test_gmm_log_prob_grad(benchmark, d, k):
    rows = save(gmm_rows(d, k, pytest_timer(benchmark, 3)))
    benchmark.extra_info.update(rows[0])


def test_hfc_loss_8_layers(benchmark):
    (row,) = save(hfc_rows(pytest_timer(benchmark, 5)))
    benchmark.extra_info.update(row)
