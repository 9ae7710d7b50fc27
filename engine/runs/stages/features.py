"""The ``features`` stage: where adversarial features lie, at the headline setting (the mechanism HFC claims).

On the pool images where both the plain and the HFC attack succeeded: the per-layer log-likelihood of the GAP
features under HFC's mixtures (clean images under their true class, plain and HFC AEs under their target
class) and, for the report's PCA plot, the features of the three sets at two layers. The paper's claim is that
plain AEs leave the target class's feature distribution (low log-likelihood at deep layers) while HFC AEs stay
inside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.attacks import HFC
from engine.models import dropout_modules, mc_dropout, model_device, model_dtype, resolve_layers
from engine.runs.artifacts import Projection
from engine.runs.cells import Cell, CellOutput, Payload, reads
from engine.runs.context import RunContext, noise_images, noise_key, pool_key
from engine.runs.schema import Metric, fingerprint, row
from engine.runs.stages.attack import AttackPayload
from engine.runs.stages.detect import NotMeasurable
from engine.runs.stages.model import GmmsPayload, ModelPayload, OnModel

GROUPS = {"clean": "clean", "plain": "plain AE", "hfc": "HFC AE"}
MC_PASSES = 20  # MC-dropout passes of the diagnostics (BU itself uses 50)
DIAGNOSTIC_BATCH = 64


@dataclass(frozen=True, kw_only=True)
class FeaturesInputs(OnModel):
    """The headline setting's plain and HFC sets (``plain_cell``, ``hfc_cell``) under HFC's mixtures, with the
    noise control at ``noise_eps`` (engine.runs.plan.noise_budget)."""

    attack: str
    eps: str | None
    label: str
    gmms_cell: str
    plain_cell: str
    hfc_cell: str
    noise_eps: str
    pool: int | None = reads("attack.pool")
    layers: Any = reads("detector.layers")
    projection_layers: Any = reads("projection.layers")
    noise: str = reads("detector.noise")


@dataclass(frozen=True, kw_only=True)
class FeaturesPayload(Payload):
    """Where the projection artifact is, its two layers, and how many images (both attacks succeeded) it holds."""

    directory: str
    layers: list[str]
    n: int


def run_features(ctx: RunContext, inputs: FeaturesInputs, deps: Mapping[str, Any]) -> CellOutput:
    """Per-layer mixture log-likelihood rows of clean, plain and HFC features, the diagnostics of clean, noise,
    plain and HFC images, and the projection artifact."""
    checkpoint = ModelPayload(**deps[inputs.model_cell]).checkpoint
    model = ctx.model(checkpoint)
    gmms = ctx.artifacts.gmms(GmmsPayload(**deps[inputs.gmms_cell]).directory)
    x, y = ctx.pool(inputs.dataset, inputs.split, inputs.seed, inputs.pool)
    refs = [AttackPayload(**deps[key]).directory for key in (inputs.plain_cell, inputs.hfc_cell)]
    plain, hfc = (ctx.artifacts.adversarial(ref) for ref in refs)
    both = plain.success & hfc.success
    base = {"dataset": inputs.dataset_label, "model": inputs.model_label, "detector": "", "variant": ""}
    setting = {"attack": inputs.attack, "eps": inputs.eps}
    if not both.any():  # the model resisted one of the attacks: nothing to measure, the run goes on
        reason = "no pool image where both the plain and the HFC attack succeeded"
        not_measurable = row(Metric.NOT_MEASURABLE, 0, hfc=False, **base, **setting)
        return CellOutput(NotMeasurable(not_measurable=reason, successful=0), [not_measurable])
    layers = resolve_layers(model, inputs.layers)
    chosen = resolve_layers(model, inputs.projection_layers) if inputs.projection_layers else None
    chosen = chosen or [layers[min(1, len(layers) - 1)], layers[-1]]
    hooked = resolve_layers(model, [*gmms, *chosen])
    constraint = HFC(gmms)
    sets = {  # the detectors' image sets (RunContext.features shares their passes): key, images, attack set
        "clean": (("clean", pool_key(inputs)), x, None),
        "plain": (("adversarial", refs[0]), plain.images, plain),
        "hfc": (("adversarial", refs[1]), hfc.images, hfc),
        "noise": (noise_key(inputs), noise_images(inputs, x), None),
    }
    rows, projection = [], {}
    for name, (key, images, adversarial) in sets.items():  # on the images where both attacks succeeded
        found = ctx.features(checkpoint, key, images, y, hooked).subset(both)
        feats = {layer: torch.from_numpy(found.pooled[layer]) for layer in hooked}
        classes = found.labels  # an AE under the class its attack aimed at (or reached)
        if adversarial is not None:
            classes = found.preds if adversarial.target is None else adversarial.target[both]
        loglik = constraint.log_likelihood(feats, torch.from_numpy(classes))
        if name in GROUPS:
            where = {"attack": "", "eps": None} if name == "clean" else dict(setting)
            rows += [row(Metric.FEATURE_LOGLIK, float(np.mean(v)), layer=layer, hfc=name == "hfc", **base, **where)
                     for layer, v in loglik.items()]  # fmt: skip
            projection[GROUPS[name]] = {layer: feats[layer].numpy() for layer in chosen}
        deepest = float(np.mean(loglik[constraint.layers[-1]]))
        diagnosed = diagnostics(model, images[torch.from_numpy(both)], torch.from_numpy(found.logits), inputs.seed)
        rows += [row(f"diag_{quantity}", v, subset=name, hfc=False, **base, **setting)
                 for quantity, v in {**diagnosed, "loglik": deepest}.items()]  # fmt: skip
    directory = ctx.artifacts.directory("projections", inputs.label, fingerprint(inputs.to_json()))
    Projection(chosen, projection).save(directory)
    payload = FeaturesPayload(directory=ctx.artifacts.ref(directory), layers=chosen, n=int(both.sum()))
    return CellOutput(payload, rows)


def diagnostics(model: nn.Module, images: torch.Tensor, logits: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Why a detector may go the other way on a set of images (beside the deepest constrained layer's
    log-likelihood): the median logit margin (top logit minus the runner-up) of the images' ``logits`` and the
    median MC-dropout variance of the softmax (mean over classes, :data:`MC_PASSES` passes seeded with ``seed``;
    NaN without dropout)."""
    top = logits.topk(2, dim=1).values
    out = {"logit_margin": float((top[:, 0] - top[:, 1]).median()), "mc_variance": float("nan")}
    if dropout_modules(model):
        per_image = []
        with torch.no_grad(), torch.random.fork_rng(devices=[]), mc_dropout(model):
            torch.manual_seed(seed)
            for chunk in images.split(DIAGNOSTIC_BATCH):
                chunk = chunk.to(model_device(model), model_dtype(model))
                probs = torch.stack([torch.softmax(model(chunk), 1) for _ in range(MC_PASSES)])
                per_image.append(probs.var(0).mean(1).cpu())
        out["mc_variance"] = float(torch.cat(per_image).median())
    return out


def features_cost(cell: Cell, machine: Any) -> tuple[str, float]:
    """Per set (clean, plain, HFC, noise): one feature pass and the MC-dropout passes."""
    passes = 4 * (MC_PASSES + 1)
    return "features", machine.seconds(passes * cell.hint["pool"] * machine.model_flops(**cell.hint["model"]))
