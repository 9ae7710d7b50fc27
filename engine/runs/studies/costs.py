"""Rough seconds of each study for the progress bar: FLOPs of the training and attack passes it runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.attacks.uap import UAP_METHODS
from engine.runs.studies.uap_analysis import uap_attacks

TRAINING_ONLY = ("arch", "epochs", "lr", "batch_size")
STUDY_EFFICIENCY = 0.58  # idle seconds / FLOP-estimated seconds of both studies in the default audit (measured)


def _flops(machine: Any, model_cfg: Mapping[str, Any], spec: Mapping[str, Any]) -> float:
    options = {k: v for k, v in model_cfg.items() if k not in TRAINING_ONLY}
    return machine.model_flops(model_cfg["arch"], int(spec.get("image_size", 64)), 3, **options)


def _training(model_cfg: Mapping[str, Any], n: int, flops: float) -> float:
    return model_cfg["epochs"] * n * (0.7 * 3 + 0.15) * flops


def stress_cost(cfg: Mapping[str, Any], machine: Any) -> float:
    """Per seed and dataset: training (with a validation pass at every snapshot when accuracies are matched), then
    untargeted PGD and feature passes on the pool for every eps."""
    total = 0.0
    for spec in cfg["datasets"]:
        flops = _flops(machine, cfg["model"], spec)
        n = int(spec.get("n", 3000))
        attack = len(cfg["eps"]) * cfg["pool"] * (3 * (cfg["pgd_steps"] + 2) + 2) * flops
        snapshots = 0.0
        if cfg["match_accuracy"]:
            train_n = n * (1 - cfg["split"]["val"] - cfg["split"]["test"])
            steps = cfg["model"]["epochs"] * train_n / cfg["model"]["batch_size"]
            snapshots = steps / cfg["match_every"] * n * cfg["split"]["val"] * flops
        total += cfg["seeds"] * (_training(cfg["model"], n, flops) + snapshots + attack)
    return STUDY_EFFICIENCY * machine.seconds(total)


def _craft(cfg: Mapping[str, Any], kind: str, flops: float) -> float:
    """FLOPs of one UAP of ``kind``: its passes (engine.attacks.uap.UAPMethod) per fitting image, or per step for
    the data-free UAP (``uap.<kind>.steps`` single-image passes whatever the data)."""
    method = UAP_METHODS[kind]
    count = cfg["uap"][kind]["steps"] if method.data_free else cfg["uap"]["fit"]
    return 3 * method.passes * count * flops


def uap_cost(cfg: Mapping[str, Any], machine: Any) -> float:
    """Per model and seed: training the baseline, UAP fine-tuning (with its regenerated UAPs) and the evaluation
    (every UAP of the study and PGD) of the baseline and of the fine-tuned model."""
    spec, ft, n = cfg["dataset"], cfg["finetune"], int(cfg["dataset"].get("n", 2000))
    total = 0.0
    for model_cfg in cfg["models"]:
        flops = _flops(machine, model_cfg, spec)
        evaluation = sum(_craft(cfg, kind, flops) for _, kind, _, _ in uap_attacks(cfg))
        evaluation += len(cfg["pgd"]["eps"]) * cfg["eval"] * 3 * (cfg["pgd"]["steps"] + 1) * flops
        regenerations = -(-ft["epochs"] // ft["regenerate_every"]) * sum(_craft(cfg, m, flops) for m in ft["methods"])
        finetune = ft["epochs"] * 0.7 * n * 3 * flops + regenerations
        total += cfg["seeds"] * (_training(model_cfg, n, flops) + finetune + 2 * evaluation)
    return STUDY_EFFICIENCY * machine.seconds(total)
