"""Paper A's stress test and fixed-direction analysis (docs/methods.md, Studies) as one study run.

For models of one architecture trained on medical data (fundus-synth binary, cxr-synth) and natural photos
(`natural`), and for each L-inf eps of a small grid, on the correctly classified images of a test pool:

* relative feature deviation ||f_l(x') - f_l(x)|| / ||f_l(x)|| per layer (GAP of every hooked layer), for x' an
  untargeted PGD example and for x' = x + uniform noise of the same budget (the control);
* alignment of the feature shifts f_l(x') - f_l(x): mean pairwise cosine over samples of the same clean class
  (near 1 = one fixed direction; an untargeted attack on a binary model pushes the two classes oppositely);
* Mahalanobis outlier score of the shifted features: squared distance to the nearest class mean under a tied
  covariance fitted on clean training features; reported as the AUROC of shifted vs clean features and as the
  ratio of their mean scores.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from engine.attacks import PGD, noise_like
from engine.data import as_tensors
from engine.detectors import TiedGaussian
from engine.html import Section, plt
from engine.metrics import auroc, mean_pairwise_cosine, relative_deviation
from engine.models import FeatureExtractor, extract_pooled, predict_logits
from engine.runs.artifacts import Artifacts
from engine.runs.context import RunContext
from engine.runs.overrides import merge
from engine.runs.schema import dataset_label
from engine.runs.studies.base import StudyResult, study_row

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
    "layers": "activations",
    "eps": ["1/256", "2/256", "4/256"],
    "pgd_steps": 10,
    "pool": 200,
    "train_features": 600,
    "reg": 1e-3,
}

STRESS_TINY: dict[str, Any] = {
    "datasets": [
        {"name": "fundus-synth", "task": "binary", "n": 80, "image_size": 16, "group": "medical"},
        {"name": "natural", "n": 80, "image_size": 16, "group": "natural"},
    ],
    "model": {"width": 0.125, "epochs": 1, "batch_size": 32},
    "layers": ["relu", "layer2.1.relu2", "layer4.1.relu2"],
    "eps": ["4/256"],
    "pgd_steps": 2,
    "pool": 16,
    "train_features": 40,
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
) -> dict[str, list[float]]:
    """Per layer (in the order of ``clean``): mean relative deviation, within-class shift cosine, Mahalanobis
    AUROC (shifted = positive vs clean) and mean-score ratio shifted / clean."""
    out: dict[str, list[float]] = {q: [] for q in QUANTITIES}
    for layer, c in clean.items():
        s = shifted[layer]
        out["deviation"].append(float(np.nanmean(relative_deviation(c, s))))
        out["cosine"].append(mean_pairwise_cosine(s - c, labels))
        d_clean, d_shift = gaussians[layer].min_distance(c), gaussians[layer].min_distance(s)
        out["maha_auroc"].append(auroc(d_clean, d_shift))
        out["maha_ratio"].append(float(d_shift.mean() / max(d_clean.mean(), 1e-12)))
    return out


def _study_dataset(spec: Mapping[str, Any], cfg: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
    seed = cfg["seed"]
    data_spec = {k: v for k, v in spec.items() if k != "group"}
    splits = ctx.splits(data_spec, cfg["split"], seed)
    model = ctx.model(ctx.trained(splits, cfg["model"], seed))
    extractor = FeatureExtractor(model, cfg["layers"])
    try:
        x, y = as_tensors(splits.test, cfg["pool"])
        correct = predict_logits(model, x).argmax(1) == y.numpy()
        accuracy = float(correct.mean())
        if correct.sum() < 2:  # an (almost) untrained model: measure on the whole pool rather than on nothing
            correct[:] = True
        x, y = x[correct], y[correct]
        train_x, train_y = as_tensors(splits.train, cfg["train_features"])
        train_feats = layer_features(extractor, train_x)
        gaussians = {n: TiedGaussian(cfg["reg"]).fit(f, train_y.numpy()) for n, f in train_feats.items()}
        clean = layer_features(extractor, x)
        results = []
        for eps in cfg["eps"]:
            attack = PGD(model, eps=eps, steps=cfg["pgd_steps"], seed=seed)
            adv = attack(x, y)
            for name, images, success in (
                ("pgd", adv.adv.detach(), adv.success_rate),
                ("noise", noise_like(x, eps, kind="uniform", seed=seed), None),
            ):
                stats = shift_statistics(clean, layer_features(extractor, images), y.numpy(), gaussians)
                results.append({"attack": name, "eps": eps, "success_rate": success, **stats})
        layers = list(clean)
    finally:
        extractor.remove()
    return {
        "label": dataset_label(spec),
        "group": spec.get("group", "medical"),
        "accuracy": accuracy,
        "n_pool": int(len(x)),
        "layers": layers,
        "results": results,
    }


def run_stress_study(
    config: Mapping[str, Any] | None, workdir: Path, context: RunContext | None = None
) -> StudyResult:
    """Train (or reuse) one model per dataset and measure the stress-test quantities.

    ``config`` is merged over :data:`STRESS_DEFAULTS` (unknown keys raise). Each dataset spec may carry
    ``group`` ("medical" or "natural"; default medical). Models are cached under ``workdir`` (or the artifact
    location of ``context``). Returns rows and a JSON payload (report: :func:`stress_sections`).
    """
    start = time.perf_counter()
    cfg = merge(STRESS_DEFAULTS, config or {}, name="stress config")
    ctx = context or RunContext(Artifacts(workdir), progress=False)
    groups = {spec.get("group", "medical") for spec in cfg["datasets"]}
    if not groups <= {"medical", "natural"}:
        raise ValueError(f"stress config: datasets[].group must be 'medical' or 'natural', got {sorted(groups)}")
    datasets = [_study_dataset(spec, cfg, ctx) for spec in cfg["datasets"]]
    payload = {"config": cfg, "datasets": datasets, "verdict": stress_verdict(datasets)}
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


# ---------------------------------------------------------------------------------------------------------------
# Verdict and report


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _pick(d: Mapping[str, Any], attack: str, eps: str) -> Mapping[str, Any]:
    return next(r for r in d["results"] if r["attack"] == attack and r["eps"] == eps)


def stress_verdict(datasets: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Whether the paper's two claims hold on these models, with the numbers behind the decision.

    Vulnerability: at every eps, the medical models' PGD feature deviation (mean over layers, and at the
    deepest layer) exceeds the natural models'. Alignment: at every eps, the deepest layer's within-class shift
    cosine under PGD is >= 0.5 and above the noise control for every binary medical model.
    """
    medical = [d for d in datasets if d["group"] == "medical"]
    natural = [d for d in datasets if d["group"] == "natural"]
    eps_grid = [r["eps"] for r in datasets[0]["results"] if r["attack"] == "pgd"] if datasets else []
    per_eps = []
    for eps in eps_grid:
        entry: dict[str, Any] = {"eps": eps}
        for group, members in (("medical", medical), ("natural", natural)):
            entry[f"{group}_mean_deviation"] = _mean([_mean(_pick(d, "pgd", eps)["deviation"]) for d in members])
            entry[f"{group}_deep_deviation"] = _mean([_pick(d, "pgd", eps)["deviation"][-1] for d in members])
            entry[f"{group}_deep_cosine"] = _mean([_pick(d, "pgd", eps)["cosine"][-1] for d in members])
        entry["medical_deep_cosine_noise"] = _mean([_pick(d, "noise", eps)["cosine"][-1] for d in medical])
        per_eps.append(entry)
    vulnerable = aligned = None
    if medical and natural and per_eps:
        vulnerable = all(
            e["medical_mean_deviation"] > e["natural_mean_deviation"]
            and e["medical_deep_deviation"] > e["natural_deep_deviation"]
            for e in per_eps
        )
    if medical and per_eps:
        aligned = all(
            _pick(d, "pgd", e["eps"])["cosine"][-1] >= 0.5
            and _pick(d, "pgd", e["eps"])["cosine"][-1] > _pick(d, "noise", e["eps"])["cosine"][-1]
            for d in medical
            for e in per_eps
        )
    accuracy = {d["label"]: d["accuracy"] for d in datasets}
    return {
        "per_eps": per_eps,
        "medical_more_vulnerable": vulnerable,
        "binary_shifts_aligned": aligned,
        "clean_accuracy": accuracy,
    }


def _verdict_text(verdict: Mapping[str, Any]) -> str:
    def word(flag: bool | None) -> str:
        return "cannot be decided (a group is missing)" if flag is None else ("HOLDS" if flag else "does NOT hold")

    parts = []
    for e in verdict["per_eps"]:
        parts.append(
            f"eps={e['eps']}: PGD deviation (mean over layers) medical {e['medical_mean_deviation']:.3f} vs natural "
            f"{e['natural_mean_deviation']:.3f}, deepest layer {e['medical_deep_deviation']:.3f} vs "
            f"{e['natural_deep_deviation']:.3f}; deepest-layer shift cosine medical {e['medical_deep_cosine']:.3f} "
            f"(noise {e['medical_deep_cosine_noise']:.3f}), natural {e['natural_deep_cosine']:.3f}"
        )
    return (
        f"Claim 'deep features of medical images are more vulnerable than natural ones' "
        f"{word(verdict['medical_more_vulnerable'])} on this data; claim 'attacks on binary medical models shift "
        f"features in one fixed direction' (deepest-layer cosine >= 0.5 and above noise, every eps) "
        f"{word(verdict['binary_shifts_aligned'])}. " + "; ".join(parts) + ". " + _accuracy_note(verdict)
    )


def _accuracy_note(verdict: Mapping[str, Any]) -> str:
    """The models' clean accuracies, with a warning when they differ enough to confound the comparison."""
    accuracy = verdict.get("clean_accuracy", {})
    text = "Clean test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()) + "."
    if accuracy and max(accuracy.values()) - min(accuracy.values()) > 0.1:
        text += (
            " The models differ by more than 0.1 in accuracy, which confounds the medical-vs-natural "
            "comparison (a weaker model has less confident, differently scaled features)."
        )
    return text


def _depth_figure(datasets: list[Mapping[str, Any]], quantity: str, ylabel: str, log: bool = False) -> Any:
    eps_grid = [r["eps"] for r in datasets[0]["results"] if r["attack"] == "pgd"]
    fig, axes = plt.subplots(1, len(eps_grid), figsize=(4.2 * len(eps_grid), 3.5), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, eps in zip(axes[0], eps_grid, strict=True):
        for i, d in enumerate(datasets):
            depth = np.arange(len(d["layers"]))
            style = "-" if d["group"] == "medical" else "--"
            colour = colours[i % len(colours)]
            ax.plot(
                depth,
                _pick(d, "pgd", eps)[quantity],
                style,
                marker="o",
                ms=3,
                color=colour,
                label=f"{d['label']} ({d['group']}) PGD",
            )
            ax.plot(depth, _pick(d, "noise", eps)[quantity], ":", color=colour, alpha=0.7, label=f"{d['label']} noise")
        ax.set(title=f"eps = {eps}", xlabel="layer depth (hooked layer index)", ylabel=ylabel)
        if log:
            ax.set_yscale("log")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def stress_sections(payload: Mapping[str, Any]) -> list[Any]:
    """Report sections of a stress-study payload: verdict, summary table, depth plots."""
    datasets = payload["datasets"]
    section = Section(
        "Stress test and fixed-direction analysis (paper A)",
        "Relative GAP-feature deviation under untargeted PGD and under uniform noise of the same L-inf "
        "budget, per layer; within-class mean pairwise cosine of the feature shifts; AUROC of the "
        "tied-covariance Mahalanobis outlier score (shifted vs clean features). Correctly classified "
        "test images only.",
    )
    section.paragraph(_verdict_text(payload["verdict"]), css="verdict")
    records = []
    for d in datasets:
        for eps in [r["eps"] for r in d["results"] if r["attack"] == "pgd"]:
            pgd, noise = _pick(d, "pgd", eps), _pick(d, "noise", eps)
            records.append(
                {
                    "dataset": d["label"],
                    "group": d["group"],
                    "eps": eps,
                    "clean acc": d["accuracy"],
                    "n": d["n_pool"],
                    "PGD success": pgd["success_rate"],
                    "dev mean PGD": _mean(pgd["deviation"]),
                    "dev mean noise": _mean(noise["deviation"]),
                    "dev deep PGD": pgd["deviation"][-1],
                    "cos deep PGD": pgd["cosine"][-1],
                    "cos deep noise": noise["cosine"][-1],
                    "MAHA AUROC deep PGD": pgd["maha_auroc"][-1],
                    "MAHA AUROC deep noise": noise["maha_auroc"][-1],
                }
            )
    section.table(
        pd.DataFrame(records).set_index(["dataset", "group", "eps"]),
        caption=f"'deep' = the last hooked layer ({datasets[0]['layers'][-1]}); dev = relative deviation.",
    )
    section.figure(
        _depth_figure(datasets, "deviation", "relative feature deviation", log=True),
        caption="Deviation vs depth per eps: medical solid, natural dashed, noise control dotted.",
    )
    section.figure(
        _depth_figure(datasets, "cosine", "within-class shift cosine"),
        caption="Alignment of the feature shifts vs depth (1 = one fixed direction).",
    )
    section.figure(
        _depth_figure(datasets, "maha_auroc", "Mahalanobis AUROC"),
        caption="Outlier score of the shifted features (AUROC of shifted vs clean) vs depth.",
    )
    return [section]
