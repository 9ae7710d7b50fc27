"""How features move under a perturbation: relative deviation and the alignment of the shifts (the stress study).

Plain numpy on (N, d) arrays; checked against direct loops in tests/test_studies.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
    return float(weighted_pairwise_cosine(s, groups, np.ones((1, len(s))))[0])


def weighted_pairwise_cosine(shifts: Any, groups: Any, weights: Any) -> np.ndarray:
    """:func:`mean_pairwise_cosine` of resamples given as counts: ``weights`` (B, N) says how often each row is
    drawn in each of B resamples (engine.metrics.roc.bootstrap_weights); returns (B,).

    A pair of draws of the same row is not a pair (it would add a cosine of 1): in a group, the sum over pairs of
    distinct rows is ||sum_i w_i u_i||^2 - sum_i w_i^2 over (sum_i w_i)^2 - sum_i w_i^2 pairs.
    """
    s = _matrix(shifts, "shifts")
    w = np.asarray(weights, dtype=np.float64)
    g = np.zeros(len(s), dtype=np.int64) if groups is None else np.asarray(groups)
    if g.shape != (len(s),) or w.ndim != 2 or w.shape[1] != len(s):
        raise ValueError(f"groups must have shape ({len(s)},) and weights (B, {len(s)}), got {g.shape}, {w.shape}")
    norm = np.linalg.norm(s, axis=1)
    keep = norm > 0
    unit, g, w = s[keep] / norm[keep, None], g[keep], w[:, keep]
    total, pairs = np.zeros(len(w)), np.zeros(len(w))
    for value in np.unique(g):
        wg, ug = w[:, g == value], unit[g == value]
        squares = (wg**2).sum(1)
        total += ((wg @ ug) ** 2).sum(1) - squares
        pairs += wg.sum(1) ** 2 - squares
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, total / np.where(pairs > 0, pairs, 1.0), np.nan)
