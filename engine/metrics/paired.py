"""Detection metrics with a bootstrap that resamples images, and paired changes between two attacks.

An audit scores, for every evaluation image i, its negatives (the clean image and its noise copy) and, for each
attack, its adversarial example when the attack succeeded on it. Those scores are not independent samples: an
image's copies move together. :func:`image_bootstrap` therefore resamples *images* with replacement (one draw
weighs all of an image's scores), evaluates every metric of :data:`engine.metrics.roc.METRICS` on each replicate,
and for a pair of attacks (a, b) also gives both on the images where both succeeded and the paired change b - a,
replicate by replicate (the same resampled images on both sides). Percentile intervals; a replicate that draws no
positive of a set is left out of that set's interval; ``n_boot=0`` gives point estimates with NaN intervals.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.metrics.roc import BOOT_CHUNK, METRICS, bootstrap_weights, roc_curves

Interval = tuple[float, float, float]  # value, ci_low, ci_high


@dataclass
class ImageBootstrap:
    """``sets[name]``: metrics of attack ``name`` on its own successful images; ``paired[(a, b)]``: ``a`` and ``b`` on
    the images where both succeeded and ``"change"`` = b - a; each ``{metric: (value, ci_low, ci_high)}``."""

    sets: dict[Hashable, dict[str, Interval]] = field(default_factory=dict)
    paired: dict[tuple[Hashable, Hashable], dict[Hashable, dict[str, Interval]]] = field(default_factory=dict)
    n_positive: dict[Hashable, int] = field(default_factory=dict)
    n_paired: dict[tuple[Hashable, Hashable], int] = field(default_factory=dict)


def image_bootstrap(
    negatives: np.ndarray,
    positives: Mapping[Hashable, np.ndarray],
    pairs: Sequence[tuple[Hashable, Hashable]] = (),
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> ImageBootstrap:
    """Metrics per set and paired changes, with a bootstrap over images.

    ``negatives`` (n, c): the c negative scores of each of n images (e.g. clean and noise); ``positives[name]``
    (n,): the adversarial score of each image under attack ``name``, NaN where the attack failed (no positive).
    ``pairs``: (a, b) names whose change b - a is wanted on the images where both are present.
    """
    neg = np.asarray(negatives, dtype=np.float64)
    if neg.ndim != 2 or not len(neg) or not np.isfinite(neg).all():
        raise ValueError(f"negatives must be a finite (n_images, copies) array, got shape {neg.shape}")
    pos = {name: np.asarray(p, dtype=np.float64) for name, p in positives.items()}
    for name, p in pos.items():
        if p.shape != (len(neg),):
            raise ValueError(f"positives[{name!r}] must have shape ({len(neg)},) like negatives, got {p.shape}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot must be an int >= 0 (0: no intervals), got {n_boot!r}")
    masks = {name: np.isfinite(p) for name, p in pos.items()}
    jobs: dict[Hashable, tuple[Hashable, np.ndarray]] = {name: (name, m) for name, m in masks.items() if m.any()}
    for a, b in pairs:
        both = masks[a] & masks[b]
        if both.any():
            jobs.update({(a, b, side): (side, both) for side in (a, b)})
    flat = neg.reshape(-1)
    point = {job: _metrics(flat, pos[name][mask], None, None) for job, (name, mask) in jobs.items()}
    draws: dict[Hashable, dict[str, list[np.ndarray]]] = {job: {m: [] for m in METRICS} for job in jobs}
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, BOOT_CHUNK):
        weights = bootstrap_weights(rng, len(neg), min(BOOT_CHUNK, n_boot - start))
        w_neg = np.repeat(weights, neg.shape[1], axis=1)  # an image's negatives move with it
        for job, (name, mask) in jobs.items():
            for metric, values in _metrics(flat, pos[name][mask], w_neg, weights[:, mask]).items():
                draws[job][metric].append(values)
    samples = {job: {m: np.concatenate(v) if v else np.zeros(0) for m, v in per.items()} for job, per in draws.items()}
    out = ImageBootstrap()
    for name, mask in masks.items():
        if name in jobs:
            out.sets[name] = {m: _interval(point[name][m][0], samples[name][m], level) for m in METRICS}
            out.n_positive[name] = int(mask.sum())
    for a, b in pairs:
        if (a, b, a) not in jobs:  # no image where both succeeded
            continue
        sides = {side: {m: _interval(point[(a, b, side)][m][0], samples[(a, b, side)][m], level) for m in METRICS}
                 for side in (a, b)}  # fmt: skip
        change = {
            m: _interval(
                point[(a, b, b)][m][0] - point[(a, b, a)][m][0], samples[(a, b, b)][m] - samples[(a, b, a)][m], level
            )
            for m in METRICS
        }
        out.paired[(a, b)] = {**sides, "change": change}
        out.n_paired[(a, b)] = int((masks[a] & masks[b]).sum())
    return out


def _metrics(neg: np.ndarray, pos: np.ndarray, w_neg: np.ndarray | None, w_pos: np.ndarray | None) -> dict:
    """{metric: (B,) values}; NaN for replicates whose positives all have weight 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr, tpr = roc_curves(neg, pos, w_neg, w_pos)
        return {name: fn(fpr, tpr) for name, fn in METRICS.items()}


def _interval(point: float, draws: np.ndarray, level: float) -> Interval:
    finite = draws[np.isfinite(draws)]
    if not len(finite):
        return float(point), float("nan"), float("nan")
    alpha = (1 - level) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return float(point), float(low), float(high)
