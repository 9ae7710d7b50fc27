"""Classification metrics in numpy: accuracy, quadratic-weighted kappa, confusion matrix, and the per-task summary.

Each equals its scikit-learn counterpart (tests compare them); degenerate cases (one class present) give NaN
instead of raising. Binary ROC-AUC comes from the one AUROC of :mod:`engine.metrics.roc`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.metrics.roc import auroc


def _labels(y: Any, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of class indices, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise TypeError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
    return arr.astype(np.int64, copy=False)


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.size} and {p.size}")
    return t, p


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of exact matches (sklearn ``accuracy_score``)."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """(K,K) int64 counts, rows = true class, columns = predicted (sklearn ``confusion_matrix`` with labels 0..K-1)."""
    t, p = _pair(y_true, y_pred)
    if min(t.min(), p.min()) < 0:
        raise ValueError("class indices must be >= 0")
    k = int(max(t.max(), p.max())) + 1 if num_classes is None else int(num_classes)
    if max(t.max(), p.max()) >= k:
        raise ValueError(f"class index {int(max(t.max(), p.max()))} is out of range for num_classes={k}")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def quadratic_weighted_kappa(y_true: Any, y_pred: Any, num_classes: int | None = None) -> float:
    """Cohen's kappa with quadratic weights (sklearn ``cohen_kappa_score(weights="quadratic")``), the DR-grading
    convention. NaN when it is undefined (a single class everywhere)."""
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    k = cm.shape[0]
    idx = np.arange(k)
    weights = (idx[:, None] - idx[None, :]) ** 2 / max((k - 1) ** 2, 1)
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / cm.sum()
    denom = float((weights * expected).sum())
    if denom == 0:
        return float("nan")
    return float(1.0 - (weights * cm).sum() / denom)


def classification_metrics(y_true: Any, probs: Any) -> dict[str, Any]:
    """Accuracy and confusion matrix for any task, plus ROC-AUC (2 classes) or quadratic kappa (> 2 classes).

    ``probs`` is (N,K) class probabilities (or logits: only their ordering per row and column is used).
    """
    t = _labels(y_true, "y_true")
    pr = np.asarray(probs, dtype=np.float64)
    if pr.ndim != 2 or pr.shape[0] != t.size or pr.shape[1] < 2:
        raise ValueError(f"probs must have shape (N={t.size}, K>=2), got {pr.shape}")
    k = pr.shape[1]
    pred = pr.argmax(axis=1)
    out: dict[str, Any] = {
        "accuracy": accuracy(t, pred),
        "confusion": confusion_matrix(t, pred, k).tolist(),
    }
    if k == 2:
        score = pr[:, 1] - pr[:, 0]
        both = (t == 0).any() and (t == 1).any()
        out["auc"] = auroc(score[t == 0], score[t == 1]) if both else float("nan")
    else:
        out["kappa"] = quadratic_weighted_kappa(t, pred, k)
    return out
