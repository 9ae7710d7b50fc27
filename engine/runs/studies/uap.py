"""Paper B's UAP study on 5-grade fundus-synth (docs/methods.md, Studies) as one study run.

1. Baseline graders (ResNet-18 and VGG-16, small) trained on the train split; the first is "the baseline".
2. Against every model: UAPs of each kind (DeepFool-UAP, SGD-UAP, targeted toward "no DR", data-free) at each
   L-inf budget, fitted on the validation split (the attacker's data) and scored on the test pool: quadratic
   kappa, fooling rate, accuracy, confusion; plus per-image PGD.
3. UAP adversarial fine-tuning of every model with the *training* UAP methods (regenerated against the current
   weights), then the same evaluation, white-box against the fine-tuned weights; kappa gain = fine-tuned minus
   baseline kappa under *held-out* UAP methods and PGD, per model; mean and max over models and conditions.
4. Ensemble of the fine-tuned models (mean softmax), evaluated the same way; clean kappa of the ensemble vs the
   baseline grader on the same folds (or bootstrap resamples) of the test pool, paired t-test (ttest_rel).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.attacks import PGD
from engine.attacks.uap import predict
from engine.data import as_tensors
from engine.metrics import confusion_matrix, paired_ttest, quadratic_weighted_kappa, resample_kappas
from engine.models import predict_logits
from engine.models.checkpoint import atomic_save
from engine.runs.artifacts import Artifacts
from engine.runs.context import RunContext
from engine.runs.overrides import merge
from engine.runs.schema import dataset_label, fingerprint
from engine.runs.studies.base import StudyResult, study_row
from engine.runs.studies.finetune import UAP_KINDS, Ensemble, craft_uap, uap_finetune
from engine.runs.studies.uap_report import is_heldout

UAP_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "dataset": {"name": "fundus-synth", "task": "grade", "n": 2000, "image_size": 64},
    "split": {"val": 0.15, "test": 0.15},
    "models": [
        {
            "arch": "resnet18",
            "width": 0.25,
            "small_stem": False,
            "dropout": 0.0,
            "epochs": 10,
            "lr": 0.003,
            "batch_size": 64,
        },
        {
            "arch": "vgg16_bn",
            "width": 0.125,
            "pool_size": 1,
            "hidden": 128,
            "dropout": 0.3,
            "epochs": 10,
            "lr": 0.003,
            "batch_size": 64,
        },
    ],
    "eps": ["4/255", "8/255"],
    "methods": list(UAP_KINDS),
    "uap": {
        "fit": 200,
        "deepfool": {"max_passes": 2, "max_iter": 10, "batch_size": 50},
        "sgd": {"epochs": 3, "batch_size": 50},
        "targeted": {"target": 0, "max_passes": 2, "inner_steps": 5, "batch_size": 50},
        "data_free": {"steps": 100},
    },
    "finetune": {
        "methods": ["sgd", "data_free"],
        "eps": "8/255",
        "epochs": 4,
        "regenerate_every": 2,
        "mix": 0.5,
        "lr": 0.0003,
        "batch_size": 64,
    },
    "pgd": {"eps": ["2/255"], "steps": 5},
    "eval": 300,
    "ttest": {"resampling": "folds", "n": 10, "alpha": 0.05},
}

UAP_TINY: dict[str, Any] = {
    "dataset": {"name": "fundus-synth", "task": "grade", "n": 100, "image_size": 16},
    "models": [
        {"arch": "resnet18", "width": 0.125, "small_stem": True, "epochs": 1, "batch_size": 32},
        {"arch": "resnet18", "width": 0.0625, "small_stem": True, "epochs": 1, "batch_size": 32},
    ],
    "eps": ["8/255"],
    "uap": {
        "fit": 12,
        "deepfool": {"max_passes": 1, "max_iter": 2, "batch_size": 12},
        "sgd": {"epochs": 1, "batch_size": 12},
        "targeted": {"target": 0, "max_passes": 1, "inner_steps": 1, "batch_size": 12},
        "data_free": {"steps": 2},
    },
    "finetune": {"epochs": 1, "regenerate_every": 1, "batch_size": 32},
    "pgd": {"eps": ["2/255"], "steps": 1},
    "eval": 24,
    "ttest": {"n": 3},
}


def _scores(y: np.ndarray, pred: np.ndarray, clean_pred: np.ndarray, k: int) -> dict[str, Any]:
    return {
        "kappa": quadratic_weighted_kappa(y, pred, k),
        "accuracy": float((pred == y).mean()),
        "fooling_rate": float((pred != clean_pred).mean()),
        "confusion": confusion_matrix(y, pred, k).tolist(),
    }


def evaluate_model(
    model: nn.Module,
    cfg: Mapping[str, Any],
    fit: tuple[torch.Tensor, torch.Tensor],
    pool: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
) -> dict[str, Any]:
    """Clean scores and scores under every UAP kind x eps (white-box, fitted on ``fit``) and PGD on ``pool``."""
    x, y = pool
    y_np = y.numpy()
    clean_pred = predict(model, x).cpu().numpy()
    out: dict[str, Any] = {"clean": _scores(y_np, clean_pred, clean_pred, num_classes), "attacks": []}
    for method in cfg["methods"]:
        for eps in cfg["eps"]:
            result = craft_uap(model, method, fit, eps, options=cfg["uap"].get(method), seed=cfg["seed"])
            pred = predict(model, x, result.perturbation.to(x.dtype)).cpu().numpy()
            out["attacks"].append({"attack": result.method, "eps": eps, **_scores(y_np, pred, clean_pred, num_classes)})
    for eps in cfg["pgd"]["eps"]:
        adv = PGD(model, eps=eps, steps=cfg["pgd"]["steps"], seed=cfg["seed"])(x, y)
        pred = adv.logits.argmax(1).cpu().numpy()
        out["attacks"].append({"attack": "pgd", "eps": eps, **_scores(y_np, pred, clean_pred, num_classes)})
    return out


def cached_finetune(
    ctx: RunContext, label: str, key: Any, model: nn.Module, run: Callable[[], tuple[nn.Module, list[dict[str, Any]]]]
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """(model, history) of a fine-tuning: loaded into ``model`` when an earlier run saved it under
    ``models/<label>-<hash(key)>/finetuned.pt``, else ``run()``, then saved atomically."""
    path = ctx.artifacts.directory("models", label, fingerprint(key)) / "finetuned.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), json.loads(saved["history"])
    tuned, history = run()
    atomic_save({"state_dict": tuned.state_dict(), "history": json.dumps(history)}, path)
    return tuned.eval(), history


def _finetuned(
    ctx: RunContext,
    cfg: Mapping[str, Any],
    name: str,
    model_cfg: Mapping[str, Any],
    base: nn.Module,
    split_hash: str,
    train: tuple[torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``base`` after UAP fine-tuning with the training methods (cached by what determines it)."""
    ft = cfg["finetune"]
    options = {key: v for key, v in ft.items() if key not in ("methods", "eps")}
    key = {"model": model_cfg, "split": split_hash, "finetune": ft, "uap": cfg["uap"], "seed": cfg["seed"]}

    def run() -> tuple[nn.Module, list[dict[str, Any]]]:
        return uap_finetune(
            base, train, ft["methods"], ft["eps"], fit=cfg["uap"]["fit"], uap_options=cfg["uap"], seed=cfg["seed"],
            progress=ctx.progress, **options,
        )  # fmt: skip

    return cached_finetune(ctx, f"{name}-uap-finetuned", key, copy.deepcopy(base), run)


def _ttest(cfg: Mapping[str, Any], y: np.ndarray, ensemble: np.ndarray, baseline: np.ndarray, k: int) -> dict:
    """Paired t-test of the clean kappa of the ensemble's and the baseline grader's predictions on shared resamples."""
    tt = cfg["ttest"]
    kappas = resample_kappas(y, {"ensemble": ensemble, "baseline": baseline}, tt["resampling"], tt["n"], cfg["seed"], k)
    return {
        **paired_ttest(kappas["ensemble"], kappas["baseline"], tt["alpha"]),
        "resampling": tt["resampling"],
        "kappas_ensemble": kappas["ensemble"].tolist(),
        "kappas_baseline": kappas["baseline"].tolist(),
    }


def _names(models: list[Mapping[str, Any]]) -> list[str]:
    archs = [m["arch"] for m in models]
    return [a if archs.count(a) == 1 else f"{a}#{i}" for i, a in enumerate(archs)]


def run_uap_study(config: Mapping[str, Any] | None, workdir: Path, context: RunContext | None = None) -> StudyResult:
    """Baselines, UAPs of every kind, UAP fine-tuning, ensemble and t-test (see the module docstring).

    ``config`` is merged over :data:`UAP_DEFAULTS` (unknown keys raise); trained and fine-tuned weights are cached
    under ``workdir`` (or the artifact location of ``context``) and reused by a resumed run.
    """
    start = time.perf_counter()
    cfg = merge(UAP_DEFAULTS, config or {}, name="uap config")
    ctx = context or RunContext(Artifacts(workdir), progress=False)
    unknown = [m for m in [*cfg["methods"], *cfg["finetune"]["methods"]] if m not in UAP_KINDS]
    if unknown or not cfg["models"]:
        raise ValueError(f"uap config: methods must come from {UAP_KINDS} (got {unknown}) and models be non-empty")
    seed = cfg["seed"]
    splits = ctx.splits(cfg["dataset"], cfg["split"], seed)
    classes = list(splits.train.classes)
    k = len(classes)
    train = as_tensors(splits.train)
    fit = as_tensors(splits.val, cfg["uap"]["fit"])
    pool = as_tensors(splits.test, cfg["eval"])
    heldout = [m for m in cfg["methods"] if m not in cfg["finetune"]["methods"]]
    models, tuned = [], []
    for name, model_cfg in zip(_names(cfg["models"]), cfg["models"], strict=True):
        base = ctx.model(ctx.trained(splits, model_cfg, seed))
        tuned_model, history = _finetuned(ctx, cfg, name, model_cfg, base, splits.hash, train)
        tuned.append(tuned_model)
        models.append(
            {
                "name": name,
                "baseline": evaluate_model(base, cfg, fit, pool, k),
                "finetuned": evaluate_model(tuned_model, cfg, fit, pool, k),
                "history": history,
            }
        )
    ensemble = Ensemble(tuned).eval()
    ens_eval = evaluate_model(ensemble, cfg, fit, pool, k)
    y = pool[1].numpy()
    baseline = ctx.model(ctx.trained(splits, cfg["models"][0], seed))
    ttest = _ttest(cfg, y, *(predict_logits(m, pool[0]).argmax(1) for m in (ensemble, baseline)), k)
    gains = kappa_gains(models, heldout)
    payload = {
        "config": cfg,
        "dataset": dataset_label(cfg["dataset"]),
        "classes": classes,
        "n_eval": len(y),
        "heldout_methods": heldout,
        "models": models,
        "ensemble": ens_eval,
        "ttest": ttest,
        "gains": gains,
        "summary": gain_summary(gains),
    }
    return StudyResult("uap", uap_rows(payload), payload, time.perf_counter() - start)


def kappa_gains(models: list[Mapping[str, Any]], heldout: list[str]) -> list[dict[str, Any]]:
    """Fine-tuned minus baseline kappa per (model, held-out attack, eps)."""
    gains = []
    for m in models:
        base = {(a["attack"], a["eps"]): a["kappa"] for a in m["baseline"]["attacks"]}
        for a in m["finetuned"]["attacks"]:
            if is_heldout(a["attack"], heldout):
                gains.append(
                    {
                        "model": m["name"],
                        "attack": a["attack"],
                        "eps": a["eps"],
                        "baseline": base[(a["attack"], a["eps"])],
                        "finetuned": a["kappa"],
                        "gain": a["kappa"] - base[(a["attack"], a["eps"])],
                    }
                )
    return gains


def gain_summary(gains: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, max and min kappa gain over the NaN-free conditions, where the max occurs, how many are negative."""
    finite = [g for g in gains if np.isfinite(g["gain"])]
    if not finite:
        nan = float("nan")
        return {"mean_gain": nan, "max_gain": nan, "min_gain": nan, "max_at": None, "n": 0, "n_negative": 0}
    best = max(finite, key=lambda g: g["gain"])
    values = [g["gain"] for g in finite]
    return {
        "mean_gain": float(np.mean(values)),
        "max_gain": float(best["gain"]),
        "min_gain": float(min(values)),
        "max_at": {k: best[k] for k in ("model", "attack", "eps")},
        "n": len(values),
        "n_negative": sum(v < 0 for v in values),
    }


def uap_rows(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Long-format rows of a UAP-study payload."""
    ds, rows = payload["dataset"], []

    def add(model: str, evaluation: Mapping[str, Any]) -> None:
        for metric in ("kappa", "accuracy"):
            rows.append(study_row(ds, model, metric, evaluation["clean"][metric]))
        for a in evaluation["attacks"]:
            for metric in ("kappa", "accuracy", "fooling_rate"):
                rows.append(study_row(ds, model, metric, a[metric], attack=a["attack"], eps=a["eps"]))

    for m in payload["models"]:
        add(m["name"], m["baseline"])
        add(f"{m['name']}+uap-ft", m["finetuned"])
    add("ensemble(uap-ft)", payload["ensemble"])
    for g in payload["gains"]:
        rows.append(study_row(ds, g["model"], "kappa_gain", g["gain"], attack=g["attack"], eps=g["eps"]))
    for metric in ("mean_gain", "max_gain", "min_gain"):
        rows.append(study_row(ds, "all", f"kappa_{metric}_heldout", payload["summary"][metric]))
    t = payload["ttest"]
    for metric, value in (
        ("ttest_p_clean_kappa", t["p"]),
        ("ttest_t_clean_kappa", t["t"]),
        ("clean_kappa_diff_vs_baseline", t["mean_diff"]),
    ):
        rows.append(study_row(ds, "ensemble(uap-ft)", metric, value))
    return rows


__all__ = ["UAP_DEFAULTS", "UAP_TINY", "evaluate_model", "gain_summary", "kappa_gains", "run_uap_study", "uap_rows"]
