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
