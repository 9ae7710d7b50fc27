"""Comparisons of models on the same test images and over repeated seeds: quadratic kappa over shared resamples,
the paired t-test, the paired equivalence test (TOST), Student-t confidence intervals of a mean and the exact
binomial interval of a proportion."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

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
    a, b = _pairs(a, b, "paired_ttest")
    res = stats.ttest_rel(a, b)
    p = float(res.pvalue)
    return {
        "t": float(res.statistic),
        "p": p,
        "mean_diff": float(np.mean(a - b)),
        "n": len(a),
        "significant": bool(p < alpha),
        "alpha": float(alpha),
    }


def _pairs(a: Any, b: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The finite pairs of two 1-D arrays of the same length (at least 2)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D arrays of the same length, got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        raise ValueError(f"{name} needs at least 2 finite pairs, got {int(keep.sum())}")
    return a[keep], b[keep]


MAD_TO_SD = 1.482602218505602  # 1 / Phi^-1(3/4): a normal's standard deviation over its median absolute deviation


def robust_location_scale(values: Any) -> tuple[float, float]:
    """(median, MAD_TO_SD x median absolute deviation) of ``values``: a normal's mean and standard deviation,
    robust to outliers."""
    x = np.asarray(values, dtype=np.float64).ravel()
    median = float(np.median(x))
    return median, MAD_TO_SD * float(np.median(np.abs(x - median)))


def mean_ci(values: Any, level: float = 0.95) -> dict[str, Any]:
    """Mean of the finite ``values`` with its Student-t confidence interval (``level``), e.g. over seeds.

    With n independent replicates the interval is mean +- t_{(1+level)/2, n-1} s / sqrt(n); with fewer than two
    values the bounds are NaN. (A percentile bootstrap under-covers badly at n = 5, hence the t interval.)
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    mean = float(x.mean()) if len(x) else float("nan")
    low = high = float("nan")
    if len(x) >= 2:
        half = stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
        low, high = mean - half, mean + half
    return {"mean": mean, "low": float(low), "high": float(high), "n": len(x), "level": float(level)}


def binomial_ci(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial proportion: ``successes`` of ``trials`` (NaN, NaN for none)."""
    if not 0 <= successes <= trials or not 0 < level < 1:
        raise ValueError(f"need 0 <= successes <= trials and 0 < level < 1, got {successes}, {trials}, {level}")
    if trials == 0:
        return float("nan"), float("nan")
    alpha = 1 - level
    low = stats.beta.ppf(alpha / 2, successes, trials - successes + 1) if successes > 0 else 0.0
    high = stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes) if successes < trials else 1.0
    return float(low), float(high)


def percentile_ci(replicates: Any, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the finite ``replicates`` (NaN, NaN when there are none)."""
    x = np.asarray(replicates, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if not len(x):
        return float("nan"), float("nan")
    low, high = np.quantile(x, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def tost_paired(a: Any, b: Any, margin: float, alpha: float = 0.05) -> dict[str, Any]:
    """Paired equivalence test (two one-sided t-tests) of the mean difference d = a - b against +-``margin``.

    H0: mean d <= -margin or >= +margin; equivalence is shown when both one-sided p-values are < ``alpha``
    (``p`` is their max), i.e. when the (1 - 2 alpha) t interval of d lies inside (-margin, margin). ``decision``:
    "equivalent", "lower" / "higher" (that interval lies wholly beyond -margin / +margin), else "inconclusive".
    Equals statsmodels' ``ttost_paired(a, b, -margin, margin)``.
    """
    if not margin > 0 or not 0 < alpha < 0.5:
        raise ValueError(f"margin must be > 0 and alpha in (0, 0.5), got {margin!r} and {alpha!r}")
    a, b = _pairs(a, b, "tost_paired")
    d = a - b
    n, mean = len(d), float(d.mean())
    se = d.std(ddof=1) / np.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_lower = float(stats.t.sf((mean + margin) / se, n - 1))  # H0: d <= -margin
        p_upper = float(stats.t.cdf((mean - margin) / se, n - 1))  # H0: d >= +margin
    ci = mean_ci(d, 1 - 2 * alpha)
    if max(p_lower, p_upper) < alpha:
        decision = "equivalent"
    elif ci["high"] < -margin:
        decision = "lower"
    elif ci["low"] > margin:
        decision = "higher"
    else:
        decision = "inconclusive"
    return {
        "mean_diff": mean,
        "p_lower": p_lower,
        "p_upper": p_upper,
        "p": max(p_lower, p_upper),
        "ci_low": ci["low"],
        "ci_high": ci["high"],
        "ci_level": ci["level"],
        "margin": float(margin),
        "alpha": float(alpha),
        "n": n,
        "decision": decision,
    }
