"""The ``features`` stage: where adversarial features lie, at the headline setting (the mechanism HFC claims).

On the pool images where both the plain and the HFC attack succeeded: the per-layer log-likelihood of the GAP
features under HFC's mixtures (clean images under their true class, plain and HFC AEs under their target
class) and, for the report's PCA plot, the features of the three sets at two layers. The paper's claim is that
plain AEs leave the target class's feature distribution (low log-likelihood at deep layers) while HFC AEs stay
inside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from engine.attacks import HFC, extract_features
from engine.models import predict_logits, resolve_layers
from engine.runs.artifacts import Projection
from engine.runs.cells import Cell, CellOutput
from engine.runs.context import RunContext
from engine.runs.schema import fingerprint

GROUPS = {"clean": "clean", "plain": "plain AE", "hfc": "HFC AE"}


def run_features(ctx: RunContext, inputs: Mapping[str, Any], deps: Mapping[str, Any]) -> CellOutput:
    """Per-layer mixture log-likelihood rows of clean, plain and HFC features, and the projection artifact."""
    model = ctx.model(deps[inputs["model_cell"]]["checkpoint"])
    gmms = ctx.artifacts.gmms(deps[inputs["gmms_cell"]]["directory"])
    x, y = ctx.pool(inputs["dataset"], inputs["split"], inputs["seed"], inputs["pool"])
    plain, hfc = (ctx.artifacts.adversarial(deps[inputs[key]]["directory"]) for key in ("plain_cell", "hfc_cell"))
    both = torch.from_numpy(plain.success & hfc.success)
    if not both.any():
        raise ValueError(f"{inputs['label']}: no pool image where both the plain and the HFC attack succeeded")
    sets = {"clean": (x[both], y[both])}
    for name, adv in (("plain", plain), ("hfc", hfc)):  # under the class the attack aimed at (or reached)
        aimed = adv.target if adv.target is not None else predict_logits(model, adv.images).argmax(1)
        sets[name] = (adv.images[both], torch.from_numpy(aimed)[both])
    layers = resolve_layers(model, inputs["layers"])
    chosen = resolve_layers(model, inputs["projection_layers"]) if inputs["projection_layers"] else None
    chosen = chosen or [layers[min(1, len(layers) - 1)], layers[-1]]
    hooked = resolve_layers(model, [*gmms, *chosen])
    constraint = HFC(gmms)
    rows, projection = [], {}
    for name, (images, classes) in sets.items():
        feats, _, _ = extract_features(model, (images, classes), hooked)
        loglik = constraint.log_likelihood(feats, classes)
        base = {"dataset": inputs["dataset_label"], "model": inputs["model_label"], "detector": ""}
        base |= {"attack": "", "eps": None} if name == "clean" else {"attack": inputs["attack"], "eps": inputs["eps"]}
        base["hfc"] = name == "hfc"
        rows += [
            {**base, "metric": f"feature_loglik@{layer}", "value": float(np.mean(v))} for layer, v in loglik.items()
        ]
        projection[GROUPS[name]] = {layer: feats[layer].numpy() for layer in chosen}
    directory = ctx.artifacts.directory("projections", inputs["label"], fingerprint(dict(inputs)))
    Projection(chosen, projection).save(directory)
    payload = {"directory": ctx.artifacts.ref(directory), "layers": chosen, "n": int(both.sum())}
    return CellOutput(payload, rows)


def features_cost(cell: Cell, machine: Any) -> tuple[str, float]:
    """Three feature passes over the pool plus the mixtures' log-likelihoods."""
    return "features", machine.seconds(3 * cell.hint["pool"] * machine.model_flops(**cell.hint["model"]))
