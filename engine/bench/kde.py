"""Gaussian KDE log density: ours vs sklearn KernelDensity, as a multiple of one N x d x M sgemm.

``kde_log_density`` (float32, N=M=4096, d=512, bandwidth 1.0 as in the KD detector code) vs sklearn
``KernelDensity(kernel="gaussian").fit(ref).score_samples(x)`` (float64, exact with its default atol=rtol=0),
timed on BASELINE_ROWS query rows and scaled linearly to N (its cost is linear in the number of queries).

Run: ``run(quick)`` (``hfc-engine bench``) or ``python -m pytest benchmarks/bench_kde.py --benchmark-only``.
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import KernelDensity

from engine.bench.harness import Timer, default_timer, result_row, scaled_seconds, sgemm_seconds
from engine.ops.kde import kde_log_density

D, BANDWIDTH = 512, 1.0
FULL_N, QUICK_N = 4096, 1024
BASELINE_ROWS = 256


def kde_rows(n: int, timer: Timer, repeats: int = 3) -> list[dict]:
    """Time ours vs sklearn KernelDensity at N=M=n."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(n, D)).astype(np.float32)
    x = (ref[rng.integers(n, size=n)] + 0.5 * rng.normal(size=(n, D))).astype(np.float32)
    shape = f"N=M={n} d={D}"
    flops = 2.0 * n * n * D
    gemm_s = sgemm_seconds(n, D, n, repeats=repeats)
    ours = timer(lambda: kde_log_density(x, ref, BANDWIDTH, backend="cpu"))
    model = KernelDensity(kernel="gaussian", bandwidth=BANDWIDTH).fit(ref)
    sk_s = scaled_seconds(model.score_samples, x, BASELINE_ROWS)
    baseline = "sklearn KernelDensity (scaled)"
    return [result_row("kde_log_density", shape, "float32", ours, baseline, sk_s, flops, gemm_s)]


def run(quick: bool = True) -> list[dict]:
    """KDE rows (quick: N=M=1024; full: N=M=4096)."""
    return kde_rows(QUICK_N if quick else FULL_N, default_timer(3))
