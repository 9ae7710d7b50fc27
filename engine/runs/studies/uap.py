"""Paper B's UAP study on 5-grade fundus-synth (docs/methods.md, Studies) as one study run.

The protocol (data, split, fitting and test images) is the same for every seed. For each of ``seeds`` seeds:

1. Baseline graders (ResNet-18 and VGG-16, small) trained on the train split with that seed (ctx.trained: cached
   by settings, split and seed).
2. Every baseline is UAP fine-tuned with the *training* UAP family; then baseline and fine-tuned model are
   attacked, white-box, by UAPs of every kind and norm (fitted on validation images, the attacker's data) and by
   per-image PGD, all seeded, and scored on the test pool (quadratic kappa, accuracy, fooling rate, confusion,
   predictions). Each attack is named by its relation to the fine-tuning family: seen, unseen norm, unseen
   family, per-image.

Then (engine.runs.studies.uap_analysis): kappa gain = fine-tuned minus baseline kappa per (model, attack, eps, seed)
with a paired image bootstrap per seed, combined over seeds, per condition and per relation; clean performance of
each fine-tuned model vs its own baseline and of the fine-tuned ensemble vs the ensemble of the same seed's
baselines (mean softmax): difference, paired t-test and equivalence test (TOST) against a stated margin, over
shared folds of the test pool and over the seeds' whole-pool differences.
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
from engine.errors import UserError
from engine.metrics import confusion_matrix, quadratic_weighted_kappa
from engine.models.checkpoint import atomic_save
from engine.runs.artifacts import Artifacts
from engine.runs.context import RunContext
from engine.runs.overrides import merge
from engine.runs.schema import dataset_label, fingerprint
from engine.runs.studies.base import StudyResult
from engine.runs.studies.finetune import UAP_KINDS, Ensemble, craft_uap, uap_finetune
from engine.runs.studies.uap_analysis import clean_comparisons, kappa_gains, relations, uap_attacks, uap_rows

# The default audit's settings, sized to its time budget (docs/studies.md): 2 seeds, each training its own
# baselines; configs/studies-full.yaml holds the full-strength ones (more seeds, fitting images, budgets, attacks).
UAP_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "seeds": 2,
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
    "eps": ["8/255"],
    "methods": ["deepfool", "sgd", "data_free"],
    "l2": {"methods": ["sgd"], "eps": [1.74]},
    "uap": {
        "fit": 100,
        "deepfool": {"delta": 0.2, "max_passes": 10, "max_iter": 50},
        "sgd": {"epochs": 3, "batch_size": 50},
        "targeted": {"target": 0, "delta": 0.2, "max_passes": 10, "inner_steps": 5, "batch_size": 50},
        "data_free": {"steps": 100},
    },
    "finetune": {
        "methods": ["sgd"],
        "eps": "8/255",
        "epochs": 2,
        "regenerate_every": 1,
        "mix": 0.5,
        "lr": 0.0003,
        "batch_size": 64,
    },
    "pgd": {"eps": ["2/255"], "steps": 5},
    "eval": 300,
    "bootstrap": 1000,  # image-bootstrap replicates of each kappa change, per seed
    "clean_test": {"folds": 10, "margin": 0.02, "alpha": 0.05},
}

UAP_TINY: dict[str, Any] = {
    "seeds": 2,
    "dataset": {"name": "fundus-synth", "task": "grade", "n": 100, "image_size": 16},
    "models": [
        {"arch": "resnet18", "width": 0.125, "small_stem": True, "epochs": 1, "batch_size": 32},
        {"arch": "resnet18", "width": 0.0625, "small_stem": True, "epochs": 1, "batch_size": 32},
    ],
    "l2": {"eps": [0.4]},
    "uap": {
        "fit": 12,
        "deepfool": {"max_passes": 1, "max_iter": 2},
        "sgd": {"epochs": 1, "batch_size": 12},
        "data_free": {"steps": 2},
    },
    "finetune": {"epochs": 1, "batch_size": 32},
    "pgd": {"eps": ["2/255"], "steps": 1},
    "eval": 24,
    "bootstrap": 200,
    "clean_test": {"folds": 3},
}


def _scores(y: np.ndarray, pred: np.ndarray, clean_pred: np.ndarray, k: int) -> dict[str, Any]:
    return {
        "kappa": quadratic_weighted_kappa(y, pred, k),
        "accuracy": float((pred == y).mean()),
        "fooling_rate": float((pred != clean_pred).mean()),
        "confusion": confusion_matrix(y, pred, k).tolist(),
        "pred": pred.tolist(),
    }


def evaluate_model(
    model: nn.Module,
    cfg: Mapping[str, Any],
    fit: tuple[torch.Tensor, torch.Tensor],
    pool: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    seed: int,
) -> dict[str, Any]:
    """Scores and predictions on ``pool`` under every UAP of :func:`uap_attacks` (white-box, fitted on ``fit``) and
    PGD, all seeded with ``seed``; ``clean_pred`` holds the clean predictions."""
    x, y = pool
    y_np = y.numpy()
    clean_pred = predict(model, x).cpu().numpy()
    out: dict[str, Any] = {"clean_pred": clean_pred.tolist(), "attacks": []}
    for name, kind, norm, eps in uap_attacks(cfg):
        result = craft_uap(model, kind, fit, eps, options=cfg["uap"].get(kind), seed=seed, norm=norm)
        pred = predict(model, x, result.perturbation.to(x.dtype)).cpu().numpy()
        out["attacks"].append({"attack": name, "eps": str(eps), **_scores(y_np, pred, clean_pred, num_classes)})
    for eps in cfg["pgd"]["eps"]:
        adv = PGD(model, eps=eps, steps=cfg["pgd"]["steps"], seed=seed)(x, y)
        pred = adv.logits.argmax(1).cpu().numpy()
        out["attacks"].append({"attack": "pgd", "eps": str(eps), **_scores(y_np, pred, clean_pred, num_classes)})
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
    base_ref: str,
    base: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    seed: int,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``base`` (the checkpoint ``base_ref``) after UAP fine-tuning with the training methods, cached by
    what determines it (the baseline's reference names its settings, split and seed)."""
    ft = cfg["finetune"]
    options = {key: v for key, v in ft.items() if key not in ("methods", "eps")}
    key = {"baseline": base_ref, "finetune": ft, "uap": cfg["uap"], "seed": seed}

    def run() -> tuple[nn.Module, list[dict[str, Any]]]:
        return uap_finetune(
            base, train, ft["methods"], ft["eps"], fit=cfg["uap"]["fit"], uap_options=cfg["uap"], seed=seed,
            progress=ctx.progress, **options,
        )  # fmt: skip

    return cached_finetune(ctx, f"{name}-uap-finetuned", key, copy.deepcopy(base), run)


def _names(models: list[Mapping[str, Any]]) -> list[str]:
    archs = [m["arch"] for m in models]
    return [a if archs.count(a) == 1 else f"{a}#{i}" for i, a in enumerate(archs)]


def _check(cfg: Mapping[str, Any]) -> None:
    kinds = [*cfg["methods"], *cfg["l2"]["methods"], *cfg["finetune"]["methods"]]
    unknown = [m for m in kinds if m not in UAP_KINDS]
    if unknown or not cfg["models"]:
        raise UserError(f"uap config: methods must come from {UAP_KINDS} (got {unknown}) and models be non-empty")
    for key, why in (("seeds", "intervals and tests are over seeds"), ("bootstrap", "replicates of the intervals")):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise UserError(f"uap config: {key} must be an int >= 2 ({why}), got {value!r}")


def run_uap_study(config: Mapping[str, Any] | None, workdir: Path, context: RunContext | None = None) -> StudyResult:
    """Per seed: baselines, their UAP fine-tuning and every attack; kappa gains combined over seeds, clean
    comparisons over folds and over seeds.

    ``config`` is merged over :data:`UAP_DEFAULTS` (unknown keys raise); seeds are ``seed``, ``seed + 1``, ...
    (``seeds`` of them, at least 2); ``seed`` also fixes the split. Trained and fine-tuned weights are cached under
    ``workdir`` (or the artifact location of ``context``) and reused by a resumed run.
    """
    start = time.perf_counter()
    cfg = merge(UAP_DEFAULTS, config or {}, name="uap config")
    _check(cfg)
    ctx = context or RunContext(Artifacts(workdir), progress=False)
    splits = ctx.splits(cfg["dataset"], cfg["split"], cfg["seed"])
    classes = list(splits.train.classes)
    data = {"train": as_tensors(splits.train), "fit": as_tensors(splits.val, cfg["uap"]["fit"])}
    pool = as_tensors(splits.test, cfg["eval"])
    seeds = [cfg["seed"] + i for i in range(cfg["seeds"])]
    models: list[dict[str, Any]] = [{"name": n, "runs": []} for n in _names(cfg["models"])]
    ensemble: dict[str, list[Any]] = {"baseline": [], "finetuned": []}  # clean predictions, per seed
    for seed in seeds:
        refs = [ctx.trained(splits, m, seed) for m in cfg["models"]]  # baselines trained with this seed
        bases, tuned = [ctx.model(ref) for ref in refs], []
        for entry, ref, base in zip(models, refs, bases, strict=True):
            model, history = _finetuned(ctx, cfg, entry["name"], ref, base, data["train"], seed)
            tuned.append(model)
            run = {"seed": seed, "baseline_model": ref, "history": history}
            for label, m in (("baseline", base), ("finetuned", model)):
                run[label] = evaluate_model(m, cfg, data["fit"], pool, len(classes), seed)
            entry["runs"].append(run)
        for label, members in (("baseline", bases), ("finetuned", tuned)):
            ensemble[label].append(predict(Ensemble(members).eval(), pool[0]).cpu().tolist())
    payload = {
        "config": cfg,
        "dataset": dataset_label(cfg["dataset"]),
        "classes": classes,
        "labels": pool[1].tolist(),
        "seeds": seeds,
        "relations": relations(cfg),
        "models": models,
        "ensemble": ensemble,
    }
    payload["gains"], payload["summary"] = kappa_gains(payload)
    payload["clean"] = clean_comparisons(payload)
    return StudyResult("uap", uap_rows(payload), payload, time.perf_counter() - start)


__all__ = ["UAP_DEFAULTS", "UAP_TINY", "evaluate_model", "run_uap_study"]
