"""Squared Mahalanobis distances to C class means: ours vs sklearn, as a multiple of one N x d x d sgemm.

* ``mahalanobis`` (float32, N=4096, d=512, C=2 and 5) vs sklearn ``EmpiricalCovariance.mahalanobis``, called once
  per class mean (how a user gets N x C from sklearn; it runs scipy cdist's "mahalanobis" metric). The baseline
  is timed on BASELINE_ROWS rows and scaled linearly to N.
* A 4-layer call (each N=4096, d=512, C=5) in one kernel call vs four single-layer calls.

Run: ``run(quick)`` (``hfc-engine bench``) or ``python -m pytest benchmarks/bench_mahalanobis.py --benchmark-only``.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import EmpiricalCovariance

from engine.bench.harness import Timer, default_timer, median_time, result_row, scaled_seconds, sgemm_seconds
from engine.ops.mahalanobis import mahalanobis

N, D = 4096, 512
CLASSES = (2, 5)
BASELINE_ROWS = 512
LAYERS = 4


def class_problem(n: int, d: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GAP-like features (offset, correlated) of C classes, their means and the tied precision, float32."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    means = 5 + rng.normal(size=(c, d))
    x = means[rng.integers(c, size=n)] + rng.normal(size=(n, d)) @ mixing
    centred = x[:2048] - x[:2048].mean(0)
    precision = np.linalg.inv(centred.T @ centred / len(centred) + 1e-3 * np.eye(d))
    return x.astype(np.float32), means.astype(np.float32), precision.astype(np.float32)


def sklearn_per_class(cov: EmpiricalCovariance, x: np.ndarray, means: np.ndarray) -> np.ndarray:
    columns = []
    for mu in means:
        cov.location_ = mu
        columns.append(cov.mahalanobis(x))
    return np.stack(columns, axis=1)


def maha_rows(c: int, timer: Timer, repeats: int = 5) -> list[dict]:
    """Time ours vs sklearn per class mean at N=4096, d=512 and C=c."""
    x, means, precision = class_problem(N, D, c)
    shape = f"N={N} d={D} C={c}"
    flops = 2.0 * N * D * D
    gemm_s = sgemm_seconds(N, D, D, repeats=repeats)
    ours = timer(lambda: mahalanobis(x, means, precision, backend="cpu"))
    cov = EmpiricalCovariance().fit(x[:1024])
    cov.precision_ = precision
    sk_s = scaled_seconds(lambda part: sklearn_per_class(cov, part, means), x, BASELINE_ROWS)
    baseline = "sklearn EmpiricalCovariance (scaled)"
    return [result_row("mahalanobis", shape, "float32", ours, baseline, sk_s, flops, gemm_s)]


def multi_layer_rows(timer: Timer, repeats: int = 3) -> list[dict]:
    """Time one call over LAYERS layers vs one call per layer."""
    problems = [class_problem(N, D, 5, seed=i) for i in range(LAYERS)]
    xs, ms, ps = (list(a) for a in zip(*problems, strict=True))
    ours = timer(lambda: mahalanobis(xs, ms, ps, backend="cpu"))
    separate = median_time(lambda: [mahalanobis(*p, backend="cpu") for p in problems], repeats=repeats)[0]
    gemm_s = LAYERS * sgemm_seconds(N, D, D, repeats=repeats)
    shape = f"{LAYERS} layers N={N} d={D} C=5"
    flops = LAYERS * 2.0 * N * D * D
    return [result_row("mahalanobis", shape, "float32", ours, "one call per layer", separate, flops, gemm_s)]


def run(quick: bool = True) -> list[dict]:
    """Mahalanobis rows (quick: C=5 only; full: C=2 and 5, plus the multi-layer call)."""
    rows = []
    for c in CLASSES[1:] if quick else CLASSES:
        rows += maha_rows(c, default_timer(5))
    return rows if quick else rows + multi_layer_rows(default_timer(3))
