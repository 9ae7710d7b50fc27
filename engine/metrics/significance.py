"""Paired comparisons of models on the same test images: quadratic kappa over shared resamples, the paired t-test."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.metrics.classification import quadratic_weighted_kappa


def resample_kappas(
    y: Any, preds: dict[str, Any], resampling: str = "folds", n: int = 10, seed: int = 0, num_classes: int | None = None
) -> dict[str, np.ndarray]:
    """Quadratic kappa of each prediction vector in ``preds`` on the same ``n`` resamples of the test set.

    ``resampling="folds"``: n disjoint, shuffled (seeded) folds; ``"bootstrap"``: n draws with replacement.
    Every prediction vector sees identical index sets, which makes the kappas paired.
    """
    if resampling not in ("folds", "bootstrap"):
        raise ValueError(f"resampling must be 'folds' or 'bootstrap', got {resampling!r}")
    y = np.asarray(y)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2 or (resampling == "folds" and n > len(y)):
        raise ValueError(f"n must be an int in [2, {len(y)}] for {resampling}, got {n!r}")
    for name, p in preds.items():
        if np.shape(p) != y.shape:
            raise ValueError(f"preds[{name!r}] must have shape {y.shape} like y, got {np.shape(p)}")
    rng = np.random.default_rng(seed)
    if resampling == "folds":
        index_sets = np.array_split(rng.permutation(len(y)), n)
    else:
        index_sets = [rng.integers(0, len(y), len(y)) for _ in range(n)]
    k = num_classes or int(max(y.max(), *(np.max(p) for p in preds.values()))) + 1
    return {
        name: np.array([quadratic_weighted_kappa(y[i], np.asarray(p)[i], k) for i in index_sets])
        for name, p in preds.items()
    }


def paired_ttest(a: Any, b: Any, alpha: float = 0.05) -> dict[str, Any]:
    """scipy.stats.ttest_rel of paired samples ``a`` vs ``b`` (NaN pairs dropped): t, p, mean difference a - b,
    and whether p < ``alpha``."""
    from scipy.stats import ttest_rel

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D arrays of the same length, got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        raise ValueError(f"paired_ttest needs at least 2 finite pairs, got {int(keep.sum())}")
    res = ttest_rel(a[keep], b[keep])
    p = float(res.pvalue)
    return {
        "t": float(res.statistic),
        "p": p,
        "mean_diff": float(np.mean(a[keep] - b[keep])),
        "n": int(keep.sum()),
        "significant": bool(p < alpha),
        "alpha": float(alpha),
    }
