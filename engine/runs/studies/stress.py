"""Paper A's stress test and fixed-direction analysis (docs/methods.md, Studies) as one study run.

For models of one architecture trained on medical data (fundus-synth binary, cxr-synth) and natural photos
(`natural`), compared at matched clean accuracy (each model's epoch whose *validation* accuracy is closest to the
weakest model's), and for each L-inf eps of a small grid, on the test images the model classifies correctly and
the untargeted PGD attack *fools* (failed AEs are left out; the noise control uses the same images):

* relative feature deviation ||f_l(x') - f_l(x)|| / ||f_l(x)|| per layer (GAP of every hooked layer), for x' the
  PGD example and for x' = x + uniform noise of the same budget (the control);
* alignment of the feature shifts f_l(x') - f_l(x): mean pairwise cosine over samples of the same clean class
  (near 1 = one fixed direction; an untargeted attack on a binary model pushes the two classes oppositely);
* Mahalanobis outlier score of the shifted features: squared distance to the nearest class mean under a tied
  covariance fitted on clean training features; reported as the AUROC of shifted vs clean features and as the
  ratio of their mean scores.

Percentile bootstrap intervals (images resampled) for the quantities the verdicts use (stress_report.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.attacks import PGD, noise_like
from engine.data import as_tensors
from engine.detectors import TiedGaussian
from engine.metrics import auroc, mean_pairwise_cosine, relative_deviation, weighted_pairwise_cosine
from engine.metrics.roc import bootstrap_weights
from engine.models import FeatureExtractor, extract_pooled, predict_logits
from engine.runs.artifacts import Artifacts
from engine.runs.context import RunContext
from engine.runs.overrides import merge
from engine.runs.schema import dataset_label
from engine.runs.studies.base import StudyResult, study_row
from engine.runs.studies.stress_report import stress_verdict

STRESS_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "datasets": [
        {"name": "fundus-synth", "task": "binary", "n": 3000, "image_size": 64, "group": "medical"},
        {"name": "cxr-synth", "n": 3000, "image_size": 64, "group": "medical"},
        {"name": "natural", "n": 3000, "image_size": 64, "group": "natural"},
    ],
    "model": {
        "arch": "resnet18",
        "width": 0.25,
        "small_stem": False,
        "dropout": 0.0,
        "epochs": 8,
        "lr": 0.003,
        "batch_size": 64,
    },
    "split": {"val": 0.15, "test": 0.15},
    "match_accuracy": True,
    "layers": "activations",
    "eps": ["1/256", "2/256", "4/256"],
    "pgd_steps": 10,
    "pool": 200,
    "train_features": 600,
    "reg": 1e-3,
    "bootstrap": 1000,
}

STRESS_TINY: dict[str, Any] = {
    "datasets": [
        {"name": "fundus-synth", "task": "binary", "n": 160, "image_size": 16, "group": "medical"},
        {"name": "natural", "n": 160, "image_size": 16, "group": "natural"},
    ],
    "model": {"width": 0.125, "epochs": 3, "batch_size": 32},
    "layers": ["relu", "layer2.1.relu2", "layer4.1.relu2"],
    "eps": ["4/256"],
    "pgd_steps": 2,
    "pool": 24,
    "train_features": 40,
    "bootstrap": 50,
}

QUANTITIES = ("deviation", "cosine", "maha_auroc", "maha_ratio")
ROW_METRIC = {
    "deviation": "feature_deviation",
    "cosine": "shift_cosine",
    "maha_auroc": "maha_auroc",
    "maha_ratio": "maha_distance_ratio",
}


@torch.no_grad()
def layer_features(extractor: Any, x: torch.Tensor, batch_size: int = 128) -> dict[str, np.ndarray]:
    """GAP features (N, C_l) float64 of every layer of a FeatureExtractor, in eval mode, batched."""
    extractor.model.eval()
    batches = (x[start : start + batch_size] for start in range(0, len(x), batch_size))
    _, feats, _ = extract_pooled(extractor, batches)
    return {name: f.double().numpy() for name, f in feats.items()}


def shift_statistics(
    clean: Mapping[str, np.ndarray],
    shifted: Mapping[str, np.ndarray],
    labels: np.ndarray,
    gaussians: Mapping[str, TiedGaussian],
    weights: np.ndarray,
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Per layer (in the order of ``clean``): mean relative deviation, within-class shift cosine, Mahalanobis
    AUROC (shifted = positive vs clean) and mean-score ratio shifted / clean; and the bootstrap replicates
    (resampling counts ``weights`` (B, N)) of the layer-mean and deepest-layer deviation and deepest cosine."""
    out: dict[str, list[float]] = {q: [] for q in QUANTITIES}
    deviations = []
    for layer, c in clean.items():
        s = shifted[layer]
        deviations.append(relative_deviation(c, s))
        out["deviation"].append(float(np.nanmean(deviations[-1])))
        out["cosine"].append(mean_pairwise_cosine(s - c, labels))
        d_clean, d_shift = gaussians[layer].min_distance(c), gaussians[layer].min_distance(s)
        out["maha_auroc"].append(auroc(d_clean, d_shift))
        out["maha_ratio"].append(float(d_shift.mean() / max(d_clean.mean(), 1e-12)))
    per_sample = np.nan_to_num(np.stack(deviations))  # (layers, N); a zero clean feature has no relative deviation
    deep = list(clean)[-1]
    replicates = {
        "deviation_mean": weights @ per_sample.mean(0) / weights.sum(1),
        "deviation_deep": weights @ per_sample[-1] / weights.sum(1),
        "cosine_deep": weighted_pairwise_cosine(shifted[deep] - clean[deep], labels, weights),
    }
    return out, replicates


def matched_models(cfg: Mapping[str, Any], ctx: RunContext) -> list[dict[str, Any]]:
    """Per dataset: its splits and the model to measure. With ``match_accuracy`` every model is trained keeping
    its epoch snapshots; the target is the lowest validation accuracy among the final models, and each model is
    replaced by its snapshot whose validation accuracy is closest to it (the latest on ties). Test data is never
    used for the choice."""
    settings = {**cfg["model"], "snapshots": True} if cfg["match_accuracy"] else cfg["model"]
    chosen = []
    for spec in cfg["datasets"]:
        splits = ctx.splits({k: v for k, v in spec.items() if k != "group"}, cfg["split"], cfg["seed"])
        ref = ctx.trained(splits, settings, cfg["seed"])
        meta = ctx.model(ref).meta
        val = [h["val_accuracy"] for h in meta["history"]]
        chosen.append({"splits": splits, "ref": ref, "epoch": meta["best_epoch"] + 1, "val_accuracy": val})
    if cfg["match_accuracy"]:
        target = min(c["val_accuracy"][c["epoch"] - 1] for c in chosen)
        for c in chosen:
            gaps = [abs(a - target) for a in c["val_accuracy"]]
            c["epoch"] = max(e + 1 for e, gap in enumerate(gaps) if gap == min(gaps))
            c["ref"] = ctx.artifacts.ref(ctx.artifacts.path(c["ref"]).parent / "epochs" / f"{c['epoch']}.pt")
    return chosen


def _study_dataset(spec: Mapping[str, Any], cfg: Mapping[str, Any], ctx: RunContext, chosen: Mapping[str, Any]):
    """The payload entry of one dataset and the bootstrap replicates of its PGD and noise results."""
    seed, splits = cfg["seed"], chosen["splits"]
    model = ctx.model(chosen["ref"])
    extractor = FeatureExtractor(model, cfg["layers"])
    try:
        x, y = as_tensors(splits.test, cfg["pool"])
        correct = predict_logits(model, x).argmax(1) == y.numpy()
        accuracy = float(correct.mean())
        x, y = x[correct], y[correct]
        train_x, train_y = as_tensors(splits.train, cfg["train_features"])
        gaussians = {
            n: TiedGaussian(cfg["reg"]).fit(f, train_y.numpy()) for n, f in layer_features(extractor, train_x).items()
        }
        results, replicates = [], {}
        layers = list(gaussians)
        for i, eps in enumerate(cfg["eps"]):
            adv = PGD(model, eps=eps, steps=cfg["pgd_steps"], seed=seed)(x, y)
            ok = adv.success.cpu().numpy()
            n = int(ok.sum())
            for name in ("pgd", "noise"):
                stats = {q: [float("nan")] * len(layers) for q in QUANTITIES}
                replicates[(name, eps)] = {}
                if n >= 2:  # at least one pair of successful AEs to measure
                    images = adv.adv.detach()[ok] if name == "pgd" else noise_like(x[ok], eps, seed=seed)
                    weights = bootstrap_weights(np.random.default_rng([seed, i]), n, cfg["bootstrap"])
                    stats, replicates[(name, eps)] = shift_statistics(
                        layer_features(extractor, x[ok]), layer_features(extractor, images), y[ok].numpy(),
                        gaussians, weights,
                    )  # fmt: skip
                rate = adv.success_rate if name == "pgd" else None
                results.append({"attack": name, "eps": eps, "success_rate": rate, "n": n, **stats})
    finally:
        extractor.remove()
    entry = {
        "label": dataset_label(spec),
        "group": spec.get("group", "medical"),
        "epoch": chosen["epoch"],
        "val_accuracy": chosen["val_accuracy"][chosen["epoch"] - 1],
        "accuracy": accuracy,
        "n_correct": int(correct.sum()),
        "layers": layers,
        "results": results,
    }
    return entry, replicates


def run_stress_study(config: Mapping[str, Any] | None, workdir: Path, context: RunContext | None = None) -> StudyResult:
    """Train (or reuse) one model per dataset, match their accuracies, measure the stress-test quantities.

    ``config`` is merged over :data:`STRESS_DEFAULTS` (unknown keys raise). Each dataset spec may carry
    ``group`` ("medical" or "natural"; default medical). Models are cached under ``workdir`` (or the artifact
    location of ``context``). Returns rows and a JSON payload (report: stress_report.stress_sections).
    """
    start = time.perf_counter()
    cfg = merge(STRESS_DEFAULTS, config or {}, name="stress config")
    ctx = context or RunContext(Artifacts(workdir), progress=False)
    groups = {spec.get("group", "medical") for spec in cfg["datasets"]}
    if not groups <= {"medical", "natural"}:
        raise ValueError(f"stress config: datasets[].group must be 'medical' or 'natural', got {sorted(groups)}")
    measured = [
        _study_dataset(spec, cfg, ctx, chosen)
        for spec, chosen in zip(cfg["datasets"], matched_models(cfg, ctx), strict=True)
    ]
    datasets = [entry for entry, _ in measured]
    payload = {"config": cfg, "datasets": datasets, "verdict": stress_verdict(measured)}
    rows = []
    arch = cfg["model"]["arch"]
    for d in datasets:
        rows.append(study_row(d["label"], arch, "clean_accuracy", d["accuracy"]))
        for r in d["results"]:
            base = {"attack": r["attack"], "eps": r["eps"]}
            if r["success_rate"] is not None:
                rows.append(study_row(d["label"], arch, "attack_success_rate", r["success_rate"], **base))
            for q in QUANTITIES:
                for layer, value in zip(d["layers"], r[q], strict=True):
                    rows.append(study_row(d["label"], arch, f"{ROW_METRIC[q]}@{layer}", value, **base))
    return StudyResult("stress", rows, payload, time.perf_counter() - start)


__all__ = ["STRESS_DEFAULTS", "STRESS_TINY", "matched_models", "run_stress_study", "shift_statistics"]
