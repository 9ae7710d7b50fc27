"""Detection metrics from negative (clean + noise) and positive (adversarial) scores, higher = more adversarial.

Every metric is computed from the exact, tie-aware ROC curve (thresholds at the distinct scores, "positive if
score >= t"), optionally with per-sample weights; the bootstrap draws resampling counts (negatives and positives
resampled separately, seeded) and evaluates all replicates at once as a (B, n) array.

Definitions:
- ``auroc``: area under the ROC curve (ties count 1/2), equal to sklearn ``roc_auc_score``.
- ``tpr_at_tnr`` (default TNR 0.90): the largest TPR among thresholds with FPR <= 1 - TNR; i.e. the threshold is
  the TNR-quantile of the negatives (the HFC protocol's "10th percentile of normal-ness").
- ``tnr_at_tpr`` (default TPR 0.95): the largest TNR among thresholds with TPR >= 0.95.
- ``partial_auroc`` (FPR <= 0.1): the McClish-standardised partial AUC of sklearn ``roc_auc_score(max_fpr=0.1)``
  (0.5 = chance, 1 = perfect); ``standardized=False`` gives the raw area, in [0, max_fpr].
- ``detection_accuracy``: max over thresholds of the balanced accuracy (TPR + TNR) / 2 (Lee et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_TNR = 0.90
DEFAULT_TPR = 0.95
DEFAULT_MAX_FPR = 0.1
BOOT_CHUNK = 250  # bootstrap replicates evaluated per (chunk, n) array


def _check(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    neg, pos = np.asarray(neg, dtype=np.float64).ravel(), np.asarray(pos, dtype=np.float64).ravel()
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError(f"metrics need negatives and positives, got {len(neg)} and {len(pos)}")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("scores contain NaN or inf")
    return neg, pos


def roc_curves(
    neg: np.ndarray, pos: np.ndarray, w_neg: np.ndarray | None = None, w_pos: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr), each (B, T+1), starting at (0, 0): one ROC per row of the weights ((B, n) or None = ones).

    Thresholds are the T distinct scores, descending; a point counts the (weighted) examples with score >= t.
    """
    neg, pos = _check(neg, pos)
    w_neg = np.ones((1, len(neg))) if w_neg is None else np.atleast_2d(w_neg)
    w_pos = np.ones((1, len(pos))) if w_pos is None else np.atleast_2d(w_pos)
    thresholds = -np.unique(-np.concatenate([neg, pos]))  # distinct scores, descending

    def cumulative(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
        order = np.argsort(-scores, kind="stable")
        counts = np.searchsorted(-scores[order], -thresholds, side="right")  # how many have score >= t
        cum = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(weights[:, order], axis=1)], axis=1)
        return np.concatenate([np.zeros((len(weights), 1)), cum[:, counts]], axis=1)

    fp, tp = cumulative(neg, w_neg), cumulative(pos, w_pos)
    return fp / fp[:, -1:], tp / tp[:, -1:]


def bootstrap_weights(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(size, n) resampling counts: how often each of n examples is drawn in each of ``size`` resamples."""
    draws = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
    return np.bincount(draws.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)


def _area(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    return (np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2).sum(1)


def auroc_curve(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    return _area(fpr, tpr)


def tpr_at_tnr_curve(fpr: np.ndarray, tpr: np.ndarray, tnr: float = DEFAULT_TNR) -> np.ndarray:
    return np.where(fpr <= 1 - tnr + 1e-12, tpr, 0.0).max(1)


def tnr_at_tpr_curve(fpr: np.ndarray, tpr: np.ndarray, tpr_level: float = DEFAULT_TPR) -> np.ndarray:
    return np.where(tpr >= tpr_level - 1e-12, 1 - fpr, 0.0).max(1)


def detection_accuracy_curve(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    return ((tpr + 1 - fpr) / 2).max(1)


def partial_auroc_curve(
    fpr: np.ndarray, tpr: np.ndarray, max_fpr: float = DEFAULT_MAX_FPR, standardized: bool = True
) -> np.ndarray:
    """Area under the ROC for FPR <= max_fpr (ROC linearly interpolated at max_fpr), as sklearn."""
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    stop = (fpr <= max_fpr).sum(1)  # fpr is non-decreasing: points [0, stop) lie inside
    rows = np.arange(len(fpr))
    right = np.minimum(stop, fpr.shape[1] - 1)
    x0, x1 = fpr[rows, stop - 1], fpr[rows, right]
    y0, y1 = tpr[rows, stop - 1], tpr[rows, right]
    y_cut = np.where(x1 > x0, y0 + (y1 - y0) * (max_fpr - x0) / np.where(x1 > x0, x1 - x0, 1.0), y0)
    inside = np.arange(fpr.shape[1])[None] < stop[:, None]
    f = np.where(inside, fpr, max_fpr)
    t = np.where(inside, tpr, y_cut[:, None])
    area = _area(f, t)
    if not standardized:
        return area
    min_area, max_area = 0.5 * max_fpr**2, max_fpr
    return 0.5 * (1 + (area - min_area) / (max_area - min_area))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "auroc": auroc_curve,
    "tpr_at_tnr90": tpr_at_tnr_curve,
    "tnr_at_tpr95": tnr_at_tpr_curve,
    "pauc_fpr10": partial_auroc_curve,
    "detection_accuracy": detection_accuracy_curve,
}


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Area under the ROC curve (= sklearn roc_auc_score)."""
    return float(auroc_curve(*roc_curves(neg, pos))[0])


def tpr_at_tnr(neg: np.ndarray, pos: np.ndarray, tnr: float = DEFAULT_TNR) -> float:
    """TPR at the threshold that keeps TNR >= ``tnr``."""
    return float(tpr_at_tnr_curve(*roc_curves(neg, pos), tnr)[0])


def tnr_at_tpr(neg: np.ndarray, pos: np.ndarray, tpr: float = DEFAULT_TPR) -> float:
    """TNR at the threshold that keeps TPR >= ``tpr``."""
    return float(tnr_at_tpr_curve(*roc_curves(neg, pos), tpr)[0])


def partial_auroc(
    neg: np.ndarray, pos: np.ndarray, max_fpr: float = DEFAULT_MAX_FPR, standardized: bool = True
) -> float:
    """Partial AUC for FPR <= ``max_fpr`` (McClish-standardised as sklearn unless ``standardized=False``)."""
    return float(partial_auroc_curve(*roc_curves(neg, pos), max_fpr, standardized)[0])


def detection_accuracy(neg: np.ndarray, pos: np.ndarray) -> float:
    """Best balanced accuracy over thresholds."""
    return float(detection_accuracy_curve(*roc_curves(neg, pos))[0])


def bootstrap_metrics(
    neg: np.ndarray, pos: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float, float]]:
    """{metric: (value, ci_low, ci_high)}: point estimates and stratified percentile bootstrap CIs."""
    neg, pos = _check(neg, pos)
    point = roc_curves(neg, pos)
    out = {name: [float(fn(*point)[0])] for name, fn in METRICS.items()}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        values: dict[str, list[np.ndarray]] = {name: [] for name in METRICS}
        for start in range(0, n_boot, BOOT_CHUNK):
            size = min(BOOT_CHUNK, n_boot - start)
            curves = roc_curves(
                neg, pos, bootstrap_weights(rng, len(neg), size), bootstrap_weights(rng, len(pos), size)
            )
            for name, fn in METRICS.items():
                values[name].append(fn(*curves))
        alpha = (1 - level) / 2
        for name in METRICS:
            out[name] += [float(v) for v in np.quantile(np.concatenate(values[name]), [alpha, 1 - alpha])]
    else:
        for name in out:
            out[name] += [float("nan"), float("nan")]
    return {name: tuple(v) for name, v in out.items()}
