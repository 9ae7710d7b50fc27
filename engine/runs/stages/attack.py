"""The ``attack`` stage: attack the test pool (plain or with the HFC add-on) and store the adversarial set.

Any attack of the registry (engine.attacks.ATTACKS) runs here with no special case: the run's settings (budget,
steps, targets, seed, HFC constraint) and the attack's own options (``attack.<name>``) are passed as far as the
attack's constructor accepts them (:meth:`engine.attacks.Attack.parameters`). Attacks without a budget (CW-L2)
get one cell per dataset instead of one per eps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from engine.attacks import ATTACKS, HFC, AdvWriter, Attack, extract_features, parse_eps, typical_reference
from engine.models import predict_logits
from engine.runs.cells import Cell, CellOutput
from engine.runs.context import RunContext
from engine.runs.schema import fingerprint

ATTACK_EFFICIENCY = 0.35  # attack steps (large batches, input gradients only) vs training steps, seconds per FLOP
ATTACK_OVERHEAD = 15  # forward-pass equivalents per image besides the steps (checks, prediction, storage; measured)


def make_attack(name: str, model: nn.Module, settings: Mapping[str, Any], constraint: Any = None) -> Attack:
    """Attack ``name`` on ``model`` with the run's ``settings`` (eps, steps, travel, targeted, seed, the attack's own
    options), keeping those its constructor accepts. The step size of an iterative attack is travel x eps / steps
    (the reference code's 2 eps / steps) unless ``options`` sets it."""
    cls = ATTACKS[name]
    targeted, steps = settings["targeted"], settings.get("options", {}).get("steps", settings["steps"])
    options = {
        "eps": settings["eps"],
        "steps": steps,
        "targeted": "random" if targeted is True else targeted,
        "seed": settings["seed"],
        "constraint": constraint,
        **settings.get("options", {}),
    }
    if settings.get("travel") and settings["eps"] is not None and "step_size" not in options:
        options["step_size"] = settings["travel"] * parse_eps(settings["eps"]) / steps
    return cls(model, **{k: v for k, v in options.items() if k in cls.parameters()})


def hfc_constraint(
    ctx: RunContext, inputs: Mapping[str, Any], deps: Mapping[str, Any], model: nn.Module, lam: float
) -> HFC:
    """The HFC constraint of an HFC cell at weight ``lam``; in ``typical`` mode (the adaptive attack) with each
    (layer, class)'s clean median and scale of the log-likelihood, from the correctly classified validation
    images (never the attacked pool)."""
    gmms = ctx.artifacts.gmms(deps[inputs["gmms_cell"]]["directory"])
    typical = None
    if inputs["mode"] == "typical":

        def reference() -> dict[str, Any]:
            val = ctx.splits(inputs["dataset"], inputs["split"], inputs["seed"]).val
            feats, logits, labels = extract_features(model, val, list(gmms))
            correct = (logits.argmax(1) == labels).numpy()
            return typical_reference(gmms, {k: v[correct] for k, v in feats.items()}, labels.numpy()[correct])

        typical = ctx.memo(("typical", inputs["gmms_cell"]), reference)
    return HFC(gmms, lam=lam, mode=inputs["mode"], typical=typical)


def run_attack(ctx: RunContext, inputs: Mapping[str, Any], deps: Mapping[str, Any]) -> CellOutput:
    """Attack the pool in batches, appending each to the adversarial set (a resumed cell skips stored batches)."""
    model_info = deps[inputs["model_cell"]]
    model = ctx.model(model_info["checkpoint"])
    x, y = ctx.pool(inputs["dataset"], inputs["split"], inputs["seed"], inputs["pool"])
    constraint = None
    lam = deps[inputs["calibrate_cell"]]["lam"] if inputs.get("calibrate_cell") else inputs.get("lam")
    if inputs["hfc"] and lam:  # weight 0: HFC's schedule alone
        constraint = hfc_constraint(ctx, inputs, deps, model, lam)
    attack = make_attack(inputs["attack"], model, inputs, constraint)
    directory = ctx.artifacts.directory("adversarial", inputs["label"], fingerprint(dict(inputs)))
    writer = AdvWriter(directory, classes=model_info["classes"], name=inputs["label"])
    done = set(writer.stored_indices().tolist())
    batch = inputs["batch_size"]
    for start in range(0, len(x), batch):
        index = np.arange(start, min(start + batch, len(x)))
        if set(index.tolist()) <= done:
            continue
        result = attack(x[index], y[index])
        writer.append_result(result, index, labels=y[index])
    success = ctx.artifacts.adversarial(ctx.artifacts.ref(directory)).success
    correct = predict_logits(model, x, batch).argmax(1) == y.numpy()
    row = {
        "dataset": inputs["dataset_label"],
        "model": inputs["model_label"],
        "attack": inputs["attack"],
        "eps": inputs["eps"],
        "hfc": inputs["hfc"],
        "variant": inputs["variant"],
        "detector": "",
        "metric": "attack_success_rate",
        "value": float(success[correct].mean()) if correct.any() else float("nan"),
    }
    return CellOutput({"directory": ctx.artifacts.ref(directory), "n": len(x)}, [row])


def attack_passes(inputs: Mapping[str, Any], hfc: bool) -> float:
    """Forward-pass equivalents per image of an attack cell: (steps + 2) forward-backward passes (x 1.3 with the
    HFC feature term) plus fixed per-image work."""
    steps = inputs["options"].get("steps", inputs["steps"]) if "steps" in ATTACKS[inputs["attack"]].parameters() else 1
    return 3 * (steps + 2) * (1.3 if hfc else 1.0) + ATTACK_OVERHEAD


def attack_cost(cell: Cell, machine: Any) -> tuple[str, float]:
    """Per pool image: :func:`attack_passes`; batched attack steps run at ATTACK_EFFICIENCY x the nominal training
    rate (measured on the quick audit)."""
    inputs = cell.inputs
    flops = attack_passes(inputs, inputs["hfc"]) * cell.hint["pool"] * machine.model_flops(**cell.hint["model"])
    return f"attack/{inputs['attack']}", ATTACK_EFFICIENCY * machine.seconds(flops)
