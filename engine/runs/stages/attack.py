"""The ``attack`` stage: attack the test pool (plain or with the HFC add-on) and store the adversarial set.

Any attack of the registry (engine.attacks.ATTACKS) runs here with no special case: the run's settings (budget,
steps, targets, seed, HFC constraint) and the attack's own options (``attack.<name>``) are passed as far as the
attack's constructor accepts them (:meth:`engine.attacks.Attack.parameters`). Attacks without a budget (CW-L2)
get one cell per dataset instead of one per eps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from engine.attacks import ATTACKS, HFC, AdvWriter, Attack, extract_features, parse_eps, typical_reference
from engine.metrics import binomial_ci
from engine.models import predict_logits
from engine.runs.cells import Cell, CellOutput, Payload, reads
from engine.runs.context import RunContext
from engine.runs.schema import Metric, fingerprint, row
from engine.runs.stages.model import GmmsPayload, ModelPayload, OnModel

ATTACK_EFFICIENCY = 0.35  # attack steps (large batches, input gradients only) vs training steps, seconds per FLOP
ATTACK_OVERHEAD = 15  # forward-pass equivalents per image besides the steps (checks, prediction, storage; measured)
HFC_PASS_FACTOR = 1.3  # cost of a forward-backward pass with the HFC feature term vs without (measured)
PLAIN, HFC_SET = "plain", "hfc"  # the attack sets every HFC run has; fixed-weight sets are named w<weight>
ADAPTIVE = "adaptive"  # the adaptive HFC set (typical mode) at the headline setting
TRANSFER = "transfer:"  # prefix of another attack's sets scored by a detector (the transfer matrix)


@dataclass(frozen=True, kw_only=True)
class AttackInputs(OnModel):
    """One adversarial set: the attack at a budget on the test pool, plain or (``hfc``) with the HFC add-on at weight
    ``lam`` (None: the weight its ``calibrate_cell`` chose) in ``mode``, on the mixtures of ``gmms_cell``."""

    attack: str
    eps: str | None  # None: an attack without a budget
    label: str
    pool: int | None = reads("attack.pool")
    steps: int = reads("attack.steps")
    travel: float | None = reads("attack.travel")
    targeted: bool | str = reads("attack.targeted")
    batch_size: int = reads("attack.batch_size")
    options: dict[str, Any] = reads("attack.{attack}", absent={})
    hfc: bool = False
    variant: str = ""  # the set beside the main HFC set: w<weight> or adaptive
    gmms_cell: str | None = None
    mode: str | None = None
    lam: float | None = None
    calibrate_cell: str | None = None
    hfc_options: dict[str, Any] | None = reads("hfc.options.{attack}", when="hfc", absent={})
    hfc_steps: int | None = reads("hfc.steps", when="hfc")
    hfc_step_size: str | float | None = reads("hfc.step_size", when="hfc")

    def method_options(self) -> dict[str, Any]:
        """The attack's own options: ``attack.<attack>``, then (an HFC set) ``hfc.options.<attack>`` over them."""
        return {**self.options, **(self.hfc_options or {})} if self.hfc else dict(self.options)

    def schedule(self) -> tuple[int, float | str | None]:
        """(steps, step size; None: the attack's default), the one place that decides them. An HFC set:
        ``hfc.step_size`` fixes the step and the steps follow as travel x eps / step size (the reference's
        schedule), else ``hfc.steps`` (or ``attack.steps``) steps. Otherwise the attack's own ``steps`` option, else
        ``attack.steps``. The step size, unless fixed so or set by the attack's options, is travel x eps / steps
        (the reference code's 2 eps / steps)."""
        options = self.method_options()
        if self.hfc and self.hfc_step_size is not None and self.eps is not None:
            step = parse_eps(self.hfc_step_size)
            return max(1, round((self.travel or 2.0) * parse_eps(self.eps) / step)), step
        steps = (self.hfc_steps or self.steps) if self.hfc else options.get("steps", self.steps)
        if "step_size" in options:
            return steps, options["step_size"]
        return steps, (self.travel * parse_eps(self.eps) / steps if self.travel and self.eps is not None else None)


@dataclass(frozen=True, kw_only=True)
class CalibratePayload(Payload):
    """The HFC weight a ``calibrate`` cell chose (engine.runs.stages.calibrate), whether it reached the target
    success rate, on how many validation images, and every trial's success."""

    lam: float
    reached: bool
    target: float
    images: int
    trials: list[dict[str, float]]
    note: str | None = None  # why the weight was kept when no weight of the grid reached the target


@dataclass(frozen=True, kw_only=True)
class AttackPayload(Payload):
    """Where the adversarial set is, and how many pool images it holds."""

    directory: str
    n: int


def make_attack(model: nn.Module, inputs: AttackInputs, constraint: Any = None) -> Attack:
    """The attack of ``inputs`` on ``model`` (budget, :meth:`AttackInputs.schedule`, targets, seed, its own
    options), keeping the settings its constructor accepts."""
    cls = ATTACKS[inputs.attack]
    steps, step_size = inputs.schedule()
    options = {
        "eps": inputs.eps,
        "targeted": "random" if inputs.targeted is True else inputs.targeted,
        "seed": inputs.seed,
        "constraint": constraint,
        **inputs.method_options(),
        "steps": steps,
    }
    if step_size is not None:
        options["step_size"] = step_size
    return cls(model, **{k: v for k, v in options.items() if k in cls.parameters()})


def hfc_constraint(ctx: RunContext, inputs: AttackInputs, deps: Mapping[str, Any], model: nn.Module, lam: float) -> HFC:
    """The HFC constraint of an HFC cell at weight ``lam``; in ``typical`` mode (the adaptive attack) with each
    (layer, class)'s clean median and scale of the log-likelihood, from the correctly classified validation
    images (never the attacked pool)."""
    gmms = ctx.artifacts.gmms(GmmsPayload(**deps[inputs.gmms_cell]).directory)
    typical = None
    if inputs.mode == "typical":

        def reference() -> dict[str, Any]:
            val = ctx.splits(inputs.dataset, inputs.split, inputs.seed).val
            feats, logits, labels = extract_features(model, val, list(gmms))
            correct = (logits.argmax(1) == labels).numpy()
            return typical_reference(gmms, {k: v[correct] for k, v in feats.items()}, labels.numpy()[correct])

        typical = ctx.memo(("typical", inputs.gmms_cell), reference)
    return HFC(gmms, lam=lam, mode=inputs.mode, typical=typical)


def run_attack(ctx: RunContext, inputs: AttackInputs, deps: Mapping[str, Any]) -> CellOutput:
    """Attack the pool in batches, appending each to the adversarial set (a resumed cell skips stored batches)."""
    model_info = ModelPayload(**deps[inputs.model_cell])
    model = ctx.model(model_info.checkpoint)
    x, y = ctx.pool(inputs.dataset, inputs.split, inputs.seed, inputs.pool)
    constraint = None
    lam = CalibratePayload(**deps[inputs.calibrate_cell]).lam if inputs.calibrate_cell else inputs.lam
    if inputs.hfc and lam:  # weight 0: HFC's schedule alone
        constraint = hfc_constraint(ctx, inputs, deps, model, lam)
    attack = make_attack(model, inputs, constraint)
    directory = ctx.artifacts.directory("adversarial", inputs.label, fingerprint(inputs.to_json()))
    writer = AdvWriter(directory, classes=model_info.classes, name=inputs.label)
    done = set(writer.stored_indices().tolist())
    for start in range(0, len(x), inputs.batch_size):  # the attack keeps its memory within budget itself
        index = np.arange(start, min(start + inputs.batch_size, len(x)))
        if set(index.tolist()) <= done:
            continue
        result = attack(x[index], y[index])
        writer.append_result(result, index, labels=y[index])
    success = ctx.artifacts.adversarial(ctx.artifacts.ref(directory)).success
    correct = predict_logits(model, x).argmax(1) == y.numpy()
    setting = {"attack": inputs.attack, "eps": inputs.eps, "hfc": inputs.hfc, "variant": inputs.variant}
    rate = success_row(int(success[correct].sum()), int(correct.sum()), dataset=inputs.dataset_label,
                       model=inputs.model_label, detector="", **setting)  # fmt: skip
    return CellOutput(AttackPayload(directory=ctx.artifacts.ref(directory), n=len(x)), [rate])


def success_row(successes: int, trials: int, **columns: Any) -> dict[str, Any]:
    """The attack success rate row: ``successes`` of ``trials`` (the correctly classified pool) with its exact
    binomial interval; n_pos / n_neg count the successful / failed attacks (NaN rate without trials)."""
    low, high = binomial_ci(successes, trials)
    value = successes / trials if trials else float("nan")
    return row(Metric.ATTACK_SUCCESS_RATE, value, ci_low=low, ci_high=high, n_pos=successes,
               n_neg=trials - successes, **columns)  # fmt: skip


def set_identity(name: str) -> tuple[bool, str]:
    """(the ``hfc`` column, the ``variant`` column) of the rows of an attack set named ``name``."""
    if name in (PLAIN, HFC_SET):
        return name == HFC_SET, ""
    if name.startswith(TRANSFER):
        return name.endswith("+hfc"), name
    return True, name


def attack_passes(inputs: AttackInputs) -> float:
    """Forward-pass equivalents per image of an attack cell: the attack's forward-backward passes
    (:meth:`engine.attacks.Attack.passes`, 3 forward equivalents each; x HFC_PASS_FACTOR with the HFC feature term)
    plus fixed per-image work."""
    passes = ATTACKS[inputs.attack].passes(inputs.schedule()[0], inputs.method_options())
    return 3 * passes * (HFC_PASS_FACTOR if inputs.hfc else 1.0) + ATTACK_OVERHEAD


def attack_cost(cell: Cell, machine: Any) -> tuple[str, float]:
    """Per pool image: :func:`attack_passes`; batched attack steps run at ATTACK_EFFICIENCY x the nominal training
    rate (measured on the quick audit)."""
    inputs = AttackInputs(**cell.inputs)
    flops = attack_passes(inputs) * cell.hint["pool"] * machine.model_flops(**cell.hint["model"])
    return f"attack/{inputs.attack}", ATTACK_EFFICIENCY * machine.seconds(flops)
