"""The studies' measurements: feature deviation, shift alignment, a tied-covariance Gaussian outlier score, kappa
over resamples and the paired t-test. Plain numpy/scipy on (N, d) arrays; each is checked against an
independent reference in tests/test_studies.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.models.metrics import quadratic_weighted_kappa


def _matrix(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, d) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _pair(clean: Any, shifted: Any) -> tuple[np.ndarray, np.ndarray]:
    c, s = _matrix(clean, "clean"), _matrix(shifted, "shifted")
    if c.shape != s.shape:
        raise ValueError(f"clean and shifted must have the same shape, got {c.shape} and {s.shape}")
    return c, s


def relative_deviation(clean: Any, shifted: Any) -> np.ndarray:
    """Per-sample ||shifted - clean|| / ||clean|| (N,); NaN where the clean feature is exactly zero."""
    c, s = _pair(clean, shifted)
    norm = np.linalg.norm(c, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm > 0, np.linalg.norm(s - c, axis=1) / norm, np.nan)


def mean_pairwise_cosine(shifts: Any, groups: Any = None) -> float:
    """Mean cosine similarity over pairs i != j of the rows of ``shifts`` (1 = every row points the same way).

    With ``groups`` (N,) only pairs inside the same group count (e.g. the same source class: an untargeted
    attack on a binary model pushes the two classes in opposite directions); the mean is over all such pairs.
    Zero rows have no direction and are left out. NaN when fewer than one pair remains.
    """
    s = _matrix(shifts, "shifts")
    g = np.zeros(len(s), dtype=np.int64) if groups is None else np.asarray(groups)
    if g.shape != (len(s),):
        raise ValueError(f"groups must have shape ({len(s)},), got {g.shape}")
    norm = np.linalg.norm(s, axis=1)
    keep = norm > 0
    unit, g = s[keep] / norm[keep, None], g[keep]
    total, pairs = 0.0, 0
    for value in np.unique(g):
        u = unit[g == value]
        n = len(u)
        if n >= 2:  # sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - n
            total += float(np.sum(u.sum(0) ** 2)) - n
            pairs += n * (n - 1)
    return total / pairs if pairs else float("nan")


class TiedGaussian:
    """Class-conditional Gaussian with one tied covariance (Lee et al.'s Mahalanobis model) on (N, d) features.

    ``fit`` takes class means and the covariance of the class-centred features, regularised by ``reg`` times
    the mean variance on the diagonal; ``min_distance`` is the squared Mahalanobis distance to the nearest class
    mean (engine.ops.mahalanobis), the outlier score: large = far from every class of clean training features.
    """

    def __init__(self, reg: float = 1e-3) -> None:
        if not reg > 0:
            raise ValueError(f"reg must be > 0, got {reg!r}")
        self.reg = float(reg)
        self.means: np.ndarray | None = None
        self.precision: np.ndarray | None = None

    def fit(self, features: Any, labels: Any) -> TiedGaussian:
        x = _matrix(features, "features")
        y = np.asarray(labels)
        if y.shape != (len(x),):
            raise ValueError(f"labels must have shape ({len(x)},), got {y.shape}")
        classes = np.unique(y)
        self.means = np.stack([x[y == c].mean(0) for c in classes])
        centred = x - self.means[np.searchsorted(classes, y)]
        cov = centred.T @ centred / len(x)
        scale = max(float(np.trace(cov)) / cov.shape[0], 1e-12)
        self.precision = np.linalg.inv(cov + self.reg * scale * np.eye(cov.shape[0]))
        self.precision = 0.5 * (self.precision + self.precision.T)
        return self

    def min_distance(self, features: Any) -> np.ndarray:
        from engine.ops import mahalanobis

        if self.means is None:
            raise ValueError("TiedGaussian is not fitted; call fit(features, labels) first")
        x = _matrix(features, "features")
        if x.shape[1] != self.means.shape[1]:
            raise ValueError(f"features must have d={self.means.shape[1]} columns, got {x.shape[1]}")
        return np.asarray(mahalanobis(x, self.means, self.precision)).min(axis=1)


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
