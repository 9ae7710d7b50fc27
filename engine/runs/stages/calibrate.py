"""The ``calibrate`` stage: choose the HFC weight on a calibration split, never on the images it is evaluated on.

The reference setting is lam = 1 (nearest-component mode). A weight that suits one model can stop the attack on
another (the HFC term outweighs the classification loss), so with ``hfc.lam: auto`` the weight is the largest
value of ``hfc.calibration.grid`` whose HFC attack still reaches ``hfc.calibration.target`` success on the first
``hfc.calibration.images`` correctly classified images of the *validation* split (disjoint from the test pool the
audit attacks): the grid's largest weight (the reference's 1) first, then, if it fails, bisection over the rest
(success falls as the weight grows). The calibration's cost is proportional to the pool: its images are capped so
that all its trials together cost at most ``hfc.calibration.max_cost`` HFC attacks on the pool
(:func:`calibration_limit`). The choice and every trial go to the payload, the result rows and the run card.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.data import as_tensors
from engine.errors import UserError
from engine.models import predict_logits
from engine.runs.cells import Cell, CellOutput, reads
from engine.runs.context import RunContext
from engine.runs.schema import Metric, row
from engine.runs.stages.attack import (
    ATTACK_EFFICIENCY,
    AttackInputs,
    CalibratePayload,
    attack_passes,
    hfc_constraint,
    make_attack,
)
from engine.runs.stages.model import ModelPayload, OnModel

MIN_CALIBRATION_IMAGES = 10  # the cap never goes below this: 9 of 10 successes pass a 0.9 target


@dataclass(frozen=True, kw_only=True)
class CalibrateInputs(AttackInputs):
    """The HFC set whose weight is calibrated (``lam`` unset), and the calibration's target, grid, images and cost
    cap."""

    target: float = reads("hfc.calibration.target")
    grid: list[float] = reads("hfc.calibration.grid")
    images: int = reads("hfc.calibration.images")
    max_cost: float = reads("hfc.calibration.max_cost")


def bisection_trials(grid: Sequence[float]) -> int:
    """The most attacks :func:`largest_passing` runs on ``grid``: the largest weight, then floor(log2(len - 1)) + 1
    for the bisection of the rest (4 for the default 7 weights)."""
    return 1 + (len(grid) - 1).bit_length()


def calibration_limit(inputs: CalibrateInputs, pool: int) -> int:
    """How many validation images the calibration attacks: ``images``, capped at ``max_cost`` x ``pool`` / the
    bisection's trials (never below MIN_CALIBRATION_IMAGES), so that it costs at most ``max_cost`` HFC attacks on
    a pool of ``pool`` images."""
    share = math.floor(inputs.max_cost * pool / bisection_trials(inputs.grid))
    return min(inputs.images, max(MIN_CALIBRATION_IMAGES, share))


def calibration_images(ctx: RunContext, inputs: OnModel, model: torch.nn.Module, limit: int) -> tuple[Any, Any]:
    """The first correctly classified validation images, at most ``limit`` of them."""
    splits = ctx.splits(inputs.dataset, inputs.split, inputs.seed)
    x, y = as_tensors(splits.val, name=f"the validation split of {inputs.dataset_label}")
    correct = torch.from_numpy(predict_logits(model, x).argmax(1) == y.numpy())
    keep = correct.nonzero()[:, 0][:limit]
    if len(keep) == 0:
        raise UserError(
            f"{inputs.dataset_label}: no validation image is classified correctly, so the HFC weight cannot be "
            "calibrated; set hfc.lam to a number or train the model longer"
        )
    return x[keep], y[keep]


def largest_passing(
    grid: Sequence[float], success: Callable[[float], float], target: float
) -> tuple[float, dict[float, float]]:
    """(the largest weight of ``grid`` whose ``success`` reaches ``target`` -- the smallest weight if none does --,
    every trial's success). The largest weight (the reference's 1) first, since most models keep it; when it fails,
    bisection over the rest, assuming success falls as the weight grows."""
    weights = sorted((float(v) for v in grid), reverse=True)
    trials: dict[float, float] = {}

    def passes(i: int) -> bool:
        if weights[i] not in trials:
            trials[weights[i]] = success(weights[i])
        return trials[weights[i]] >= target

    if passes(0) or len(weights) == 1:
        return weights[0], trials
    low, high = 1, len(weights) - 1
    while low < high:
        mid = (low + high) // 2
        if passes(mid):
            high = mid
        else:
            low = mid + 1
    passes(low)
    return weights[low], trials


def run_calibrate(ctx: RunContext, inputs: CalibrateInputs, deps: Mapping[str, Any]) -> CellOutput:
    """Bisect the weight grid for the largest weight whose HFC attack reaches the target success rate."""
    model = ctx.model(ModelPayload(**deps[inputs.model_cell]).checkpoint)
    pool, _ = ctx.pool(inputs.dataset, inputs.split, inputs.seed, inputs.pool)
    x, y = calibration_images(ctx, inputs, model, calibration_limit(inputs, len(pool)))

    def success(lam: float) -> float:
        constraint = hfc_constraint(ctx, inputs, deps, model, lam) if lam else None
        return make_attack(model, inputs, constraint)(x, y).success_rate

    lam, trials = largest_passing(inputs.grid, success, inputs.target)
    reached = trials[lam] >= inputs.target
    columns = {"dataset": inputs.dataset_label, "model": inputs.model_label, "attack": inputs.attack}
    columns |= {"eps": inputs.eps, "hfc": True, "variant": inputs.variant, "detector": ""}
    rows = [row(Metric.HFC_LAM, lam, **columns), row(Metric.HFC_CALIBRATION_SUCCESS, trials[lam], **columns)]
    note = None
    if not reached:  # the model resists the attack even with the weakest constraint: the run goes on with it
        note = (
            f"no weight of the grid reaches {inputs.target:g} success on the {len(x)} calibration images "
            f"(at {lam:g}, the smallest: {trials[lam]:.2f}), so the smallest weight is used"
        )
    payload = CalibratePayload(
        lam=lam,
        reached=reached,
        target=inputs.target,
        images=len(x),
        trials=[{"lam": k, "success": v} for k, v in sorted(trials.items(), reverse=True)],
        note=note,
    )
    return CellOutput(payload, rows)


def calibrate_cost(cell: Cell, machine: Any) -> tuple[str, float]:
    """At most :func:`bisection_trials` HFC attacks on the calibration images."""
    inputs = CalibrateInputs(**cell.inputs)
    passes = attack_passes(inputs) * calibration_limit(inputs, cell.hint["pool"]) * bisection_trials(inputs.grid)
    return "calibrate", ATTACK_EFFICIENCY * machine.seconds(passes * machine.model_flops(**cell.hint["model"]))
