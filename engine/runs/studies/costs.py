"""Rough seconds of each study for the progress bar: FLOPs of the training and attack passes it runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TRAINING_ONLY = ("arch", "epochs", "lr", "batch_size")
UAP_PASSES = 20  # forward-backward passes per fitting image to craft one UAP (DeepFool / SGD / targeted loops)
STUDY_EFFICIENCY = 0.6  # measured / FLOP-estimated seconds of both studies in the default audit


def _flops(machine: Any, model_cfg: Mapping[str, Any], spec: Mapping[str, Any]) -> float:
    options = {k: v for k, v in model_cfg.items() if k not in TRAINING_ONLY}
    return machine.model_flops(model_cfg["arch"], int(spec.get("image_size", 64)), 3, **options)


def _training(model_cfg: Mapping[str, Any], n: int, flops: float) -> float:
    return model_cfg["epochs"] * n * (0.7 * 3 + 0.15) * flops


def stress_cost(cfg: Mapping[str, Any], machine: Any) -> float:
    """Per dataset: training, then untargeted PGD and feature passes on the pool for every eps."""
    total = 0.0
    for spec in cfg["datasets"]:
        flops = _flops(machine, cfg["model"], spec)
        attack = len(cfg["eps"]) * cfg["pool"] * (3 * (cfg["pgd_steps"] + 2) + 2) * flops
        total += _training(cfg["model"], int(spec.get("n", 3000)), flops) + attack
    return STUDY_EFFICIENCY * machine.seconds(total)


def uap_cost(cfg: Mapping[str, Any], machine: Any) -> float:
    """Per model: training, UAP fine-tuning with regenerated UAPs, and the evaluation (every UAP kind x eps and
    PGD) of the baseline and the fine-tuned model; plus the ensemble's evaluation."""
    spec, ft, n = cfg["dataset"], cfg["finetune"], int(cfg["dataset"].get("n", 2000))
    total = 0.0
    for model_cfg in cfg["models"]:
        flops = _flops(machine, model_cfg, spec)
        craft = UAP_PASSES * cfg["uap"]["fit"] * flops
        evaluation = len(cfg["methods"]) * len(cfg["eps"]) * craft
        evaluation += len(cfg["pgd"]["eps"]) * cfg["eval"] * 3 * (cfg["pgd"]["steps"] + 1) * flops
        regenerations = -(-ft["epochs"] // ft["regenerate_every"]) * len(ft["methods"]) * craft
        finetune = ft["epochs"] * 0.7 * n * 3 * flops + regenerations
        total += _training(model_cfg, n, flops) + finetune + 3 * evaluation
    return STUDY_EFFICIENCY * machine.seconds(total)
