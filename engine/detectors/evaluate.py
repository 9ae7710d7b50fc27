"""The HFC detection protocol and its tidy result.

Inputs are aligned by row: ``clean[i]`` is test image i, ``noise[i]`` its noise control (same L-inf budget as the
attack) and ``adversarial[i]`` its adversarial example, ``success[i]`` whether the attack succeeded on it.

1. Pool = correctly classified clean images (prediction == label).
2. Seeded split of the pool: first ``fit_fraction`` (70%) to fit, the rest to evaluate. An image, its noise
   control and its AE always fall on the same side.
3. Fit every detector on negatives = clean + noise of the fit split and positives = its successful AEs (each
   detector combines its per-layer scores by standardisation + logistic regression fitted here). Data too small
   for this -- no correctly classified image on either side of the split, no successful AE in the fit part, fewer
   examples than a detector needs -- raises :class:`TooFewExamples` (a run reports the detector as not measurable
   there). An evaluation part without a successful AE still gives the failed and all-AE rows.
4. Score the evaluation split: negatives = clean + noise; positives = successful AEs, failed AEs and all AEs,
   reported separately, for the attack the detectors were fitted on and for every ``transfer`` set (e.g. HFC AEs
   of the same images, scored by detectors fitted on plain AEs).
5. Paired comparison: on the evaluation images where both the fitted attack and a transfer attack succeeded, the
   metrics of both and their change (transfer minus fitted).
Metrics (see ``engine.metrics.roc``) with 95% CIs from a bootstrap that resamples evaluation images, an image's
clean, noise and adversarial scores together (``engine.metrics.paired``); per-image scores are kept. Beside
``auroc``, ``auroc_reversed`` is the AUROC of the other orientation (the negated score): 1 - AUROC, exactly, on the
tie-aware ROC, replicate by replicate, so its interval is (1 - ci_high, 1 - ci_low); its paired change is minus
the AUROC change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.detectors.base import Detector, TooFewExamples
from engine.detectors.features import FeatureCache, Features
from engine.metrics.paired import image_bootstrap

SUBSETS = ("successful", "failed", "all")


@dataclass
class ProtocolSplit:
    """Row indices (into the aligned inputs) of the correctly classified pool and its fit / evaluation parts."""

    pool: np.ndarray
    fit: np.ndarray
    eval: np.ndarray

    @classmethod
    def make(cls, correct: np.ndarray, fit_fraction: float = 0.7, seed: int = 0) -> ProtocolSplit:
        if not 0 < fit_fraction < 1:
            raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
        pool = np.flatnonzero(np.asarray(correct, dtype=bool))
        shuffled = pool[np.random.default_rng(seed).permutation(len(pool))]
        n_fit = int(round(fit_fraction * len(pool)))
        return cls(pool=pool, fit=np.sort(shuffled[:n_fit]), eval=np.sort(shuffled[n_fit:]))


@dataclass
class EvalScores:
    """One detector's scores on the evaluation split, aligned by image: ``negatives`` (n, c) holds each image's
    clean score (and its noise copy's), ``adversarial[set]`` (n,) each image's AE score under that attack set, and
    ``success[set]`` (n,) whether that attack succeeded; ``index`` (n,) gives the input rows of the images."""

    negatives: np.ndarray
    adversarial: dict[str, np.ndarray]
    success: dict[str, np.ndarray]
    index: np.ndarray

    def positives(self, attack_set: str, subset: str = "successful") -> np.ndarray:
        """The AE scores of ``subset`` ("successful", "failed" or "all") of ``attack_set``."""
        success = self.success[attack_set]
        mask = {"successful": success, "failed": ~success, "all": np.ones_like(success)}[subset]
        return self.adversarial[attack_set][mask]


@dataclass
class DetectionResult:
    """Metric rows plus each detector's per-image evaluation scores (:class:`EvalScores`).

    Rows: per (detector, attack set, subset) every metric, and ``auroc_reversed`` (the negated score's AUROC),
    with its image-bootstrap 95% CI (subsets "successful", "failed", "all"); per transfer set, subset "paired" for
    both sets on the images where both attacks succeeded and subset "change" (transfer minus the fitted attack on
    those images), attack = the transfer set.
    """

    rows: list[dict[str, Any]]
    scores: dict[str, EvalScores]
    split: ProtocolSplit
    attack_success_rate: dict[str, float] = field(default_factory=dict)

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per (detector, attack, subset, metric): value, ci_low, ci_high, n_neg, n_pos."""
        return [dict(r) for r in self.rows]

    def value(self, detector: str, metric: str = "auroc", attack: str = "attack", subset: str = "successful") -> float:
        for r in self.rows:
            if (r["detector"], r["metric"], r["attack"], r["subset"]) == (detector, metric, attack, subset):
                return r["value"]
        raise KeyError(f"no row for detector={detector!r}, metric={metric!r}, attack={attack!r}, subset={subset!r}")


def run_protocol(
    detectors: Sequence[Detector],
    clean: Features,
    adversarial: Features,
    success: np.ndarray,
    noise: Features | None = None,
    labels: np.ndarray | None = None,
    source: FeatureCache | None = None,
    transfer: Mapping[str, tuple[Features, np.ndarray]] | None = None,
    train: Features | None = None,
    attack_name: str = "attack",
    fit_fraction: float = 0.7,
    seed: int = 0,
    n_boot: int = 1000,
) -> DetectionResult:
    """Fit each detector on the fit split and evaluate it on the evaluation split (see the module docstring).

    ``labels`` default to ``clean.labels``. ``train`` (labelled clean features, e.g. of the training set) feeds the
    class-conditional detectors; by default they use the clean fit split. ``source`` is the FeatureCache the
    detectors need to run the model (BU, MAHA preprocessing).
    """
    labels = clean.labels if labels is None else np.asarray(labels)
    if labels is None:
        raise ValueError("labels are needed to find the correctly classified pool: pass labels= or Features.labels")
    sets = {attack_name: (adversarial, np.asarray(success, dtype=bool))}
    sets.update({name: (f, np.asarray(s, dtype=bool)) for name, (f, s) in (transfer or {}).items()})
    for name, (feats, succ) in sets.items():
        if len(feats) != len(clean) or len(succ) != len(clean):
            raise ValueError(
                f"{name}: adversarial set and success must align with clean ({len(clean)} rows), "
                f"got {len(feats)} and {len(succ)}"
            )
    if noise is not None and len(noise) != len(clean):
        raise ValueError(f"noise must align with clean ({len(clean)} rows), got {len(noise)}")
    split = ProtocolSplit.make(clean.preds == labels, fit_fraction, seed)
    if len(split.fit) == 0 or len(split.eval) == 0:
        raise TooFewExamples(
            f"only {len(split.pool)} of {len(clean)} images are classified correctly, too few to split into fit and "
            "evaluation parts"
        )
    success = sets[attack_name][1]
    fit_pos = split.fit[success[split.fit]]
    if len(fit_pos) == 0:
        raise TooFewExamples(f"the attack succeeded on none of the {len(split.fit)} images of the fit split")

    fit_clean = clean.subset(split.fit)
    fit_clean.labels = labels[split.fit]
    rows, scores = [], {}
    for det in detectors:
        label = det.name if det.name not in scores else f"{det.name}#{len(scores)}"
        det.fit(
            source,
            fit_clean,
            adversarial.subset(fit_pos),
            None if noise is None else noise.subset(split.fit),
            train=train,
        )
        negatives = [det.score(clean.subset(split.eval))]
        if noise is not None:
            negatives.append(det.score(noise.subset(split.eval)))
        scores[label] = EvalScores(
            negatives=np.stack(negatives, axis=1),
            adversarial={name: det.score(feats.subset(split.eval)) for name, (feats, _) in sets.items()},
            success={name: succ[split.eval] for name, (_, succ) in sets.items()},
            index=split.eval,
        )
        rows += _metric_rows(label, scores[label], attack_name, n_boot, seed)
    asr = {
        name: float(succ[split.pool].mean()) if len(split.pool) else float("nan") for name, (_, succ) in sets.items()
    }
    return DetectionResult(rows=rows, scores=scores, split=split, attack_success_rate=asr)


def _metric_rows(detector: str, scores: EvalScores, fitted: str, n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Rows of every metric with image-bootstrap CIs: per set and subset, and paired fitted-vs-transfer changes."""
    positives = {}
    for name in scores.adversarial:
        for subset in SUBSETS:
            keep = {"successful": scores.success[name], "failed": ~scores.success[name]}.get(subset)
            values = scores.adversarial[name].astype(np.float64)
            positives[(name, subset)] = values if keep is None else np.where(keep, values, np.nan)
    pairs = [((fitted, "successful"), (name, "successful")) for name in scores.adversarial if name != fitted]
    boot = image_bootstrap(scores.negatives, positives, pairs, n_boot=n_boot, seed=seed)
    n_neg = scores.negatives.size
    rows = []
    for (name, subset), metrics in boot.sets.items():
        base = {"detector": detector, "attack": name, "subset": subset}
        rows += _rows({**base, "n_neg": n_neg, "n_pos": boot.n_positive[(name, subset)]}, metrics)
    for (a, b), sides in boot.paired.items():
        count = {"n_neg": n_neg, "n_pos": boot.n_paired[(a, b)], "versus": b[0]}
        for side, attack, subset in ((a, a[0], "paired"), (b, b[0], "paired"), ("change", b[0], "change")):
            rows += _rows({"detector": detector, "attack": attack, "subset": subset, **count}, sides[side])
    return rows


def _rows(base: dict[str, Any], metrics: Mapping[str, tuple[float, float, float]]) -> list[dict[str, Any]]:
    """One row per metric, plus ``auroc_reversed`` (see the module docstring)."""
    value, low, high = metrics["auroc"]
    flipped = (-value, -high, -low) if base["subset"] == "change" else (1 - value, 1 - high, 1 - low)
    metrics = {**metrics, "auroc_reversed": flipped}
    return [{**base, "metric": m, "value": v, "ci_low": lo, "ci_high": hi} for m, (v, lo, hi) in metrics.items()]
