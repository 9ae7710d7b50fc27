"""From a validated config to the run's cells (engine.runs.config.DEFAULTS documents every key).

Per dataset: one ``data`` cell (load or generate, split), one ``model`` cell (train or take the checkpoint, clean
metrics), one ``gmms`` cell (HFC's mixtures)
when HFC is on, one ``attack`` cell per (attack, eps, plain/HFC) -- one per (attack, plain/HFC) for attacks
without a budget --, one ``detect`` cell per (attack, eps, detector) fitting on plain AEs and scoring plain and
HFC AEs, and one ``features`` cell at the headline setting (feature log-likelihoods, PCA). Then one ``study`` cell
per study. Cells carry only JSON-able inputs; labels name what they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.attacks import ATTACKS, parse_eps
from engine.models.classifier import ARCHITECTURES
from engine.runs.cells import Cell
from engine.runs.context import MEMORY, checkpoint_ref
from engine.runs.overrides import merge
from engine.runs.schema import dataset_label


def model_label(model_cfg: Mapping[str, Any]) -> str:
    """The ``model`` column: ``model.name``, else the checkpoint's file name, else the architecture."""
    if model_cfg.get("name"):
        return str(model_cfg["name"])
    checkpoint = model_cfg.get("checkpoint")
    if checkpoint and not str(checkpoint).startswith(MEMORY):
        return Path(str(checkpoint)).stem
    return str(model_cfg["arch"])


def _model_hint(model: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """What a cost estimate needs to count the model's FLOPs per image."""
    return {
        "arch": model["arch"],
        "image_size": int(spec.get("image_size", 224)),
        "channels": 3,
        "width": model["width"],
        **{k: v for k, v in model.get("options", {}).items() if k in ARCHITECTURES[model["arch"]][1]},
    }


def model_configs(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The models of a run: each entry of ``models`` merged over ``model``, or ``model`` alone."""
    options = lambda dotted: dotted.startswith("model.options.")  # noqa: E731 - free-form build/training options
    merged = [merge(config["model"], entry, "model.", "models entry", options) for entry in config["models"]]
    return merged or [config["model"]]


def build_cells(config: Mapping[str, Any]) -> list[Cell]:
    """Every cell of the run described by ``config`` (dependencies before dependants)."""
    cells: list[Cell] = []
    for spec in config["datasets"]:
        for model_cfg in model_configs(config):
            cells += _dataset_cells(config, spec, model_cfg)
    for name in config["studies"]:
        settings = {"seed": config["seed"], **config["study"].get(name, {})}
        cells.append(Cell("study", {"study": name, "config": settings}, label=f"{name} study"))
    return list({cell.key: cell for cell in cells}.values())  # the data cell is shared by a dataset's models


def _dataset_cells(config: Mapping[str, Any], spec: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[Cell]:
    label, model = dataset_label(spec), model_label(model_cfg)
    seed, split, attack_cfg = config["seed"], config["split"], config["attack"]
    n = int(spec.get("n", 1000))
    hint = {"model": _model_hint(model_cfg, spec), "n": n, "pool": attack_cfg["pool"] or int(n * split["test"])}
    common = {"dataset": spec, "dataset_label": label, "model_label": model, "seed": seed, "split": split}
    model_cfg = dict(model_cfg)
    if model_cfg["checkpoint"] and not str(model_cfg["checkpoint"]).startswith(MEMORY):
        model_cfg["checkpoint"] = checkpoint_ref(model_cfg["checkpoint"])
    data_cell = Cell("data", {k: common[k] for k in ("dataset", "seed", "split")}, label=f"{label} data", hint=hint)
    model_cell = Cell(
        "model", {**common, "model": model_cfg}, (data_cell.key,), label=f"{label} {model} model", hint=hint
    )
    cells = [data_cell, model_cell]
    gmm_cell = None
    if config["hfc"]["enabled"]:
        hfc = {k: config["hfc"][k] for k in ("layers", "n_components", "reg_covar")}
        gmm_cell = Cell(
            "gmms",
            {**common, "hfc": hfc, "model_cell": model_cell.key},
            (model_cell.key,),
            label=f"{label} {model} HFC mixtures",
            hint=hint,
        )
        cells.append(gmm_cell)
    common = {**common, "pool": attack_cfg["pool"], "model_cell": model_cell.key}
    settings: dict[tuple[str, str | None], dict[bool, Cell]] = {}
    for attack in config["attacks"]:
        for eps in config["eps"] if ATTACKS[attack].budgeted() else [None]:
            setting = f"{label} {model} {attack}" + ("" if eps is None else f" eps={eps}")
            attack_cells, settings[attack, eps] = _attack_cells(config, common, attack, eps, setting, gmm_cell, hint)
            cells += [*attack_cells, *_detect_cells(config, common, attack, eps, setting, settings[attack, eps], hint)]
    if gmm_cell is not None and settings:
        attack, eps = headline(config)
        plain, hfc_set = settings[attack, eps][False], settings[attack, eps][True]
        inputs = {
            **common,
            "attack": attack,
            "eps": eps,
            "layers": config["detector"]["layers"],
            "projection_layers": config["projection"]["layers"],
            "gmms_cell": gmm_cell.key,
            "plain_cell": plain.key,
            "hfc_cell": hfc_set.key,
            "label": f"{label} {model} features {attack}" + ("" if eps is None else f" eps={eps}"),
        }
        deps = (model_cell.key, gmm_cell.key, plain.key, hfc_set.key)
        cells.append(Cell("features", inputs, deps, label=inputs["label"], hint=hint))
    return cells


def headline(config: Mapping[str, Any]) -> tuple[str, str | None]:
    """The (attack, eps) the report leads with: ``headline.attack`` / ``headline.eps``, by default the first
    attack at its largest budget."""
    attack = config["headline"]["attack"] or config["attacks"][0]
    if not ATTACKS[attack].budgeted():
        return attack, None
    eps = config["headline"]["eps"] or max(config["eps"], key=parse_eps)
    return attack, str(eps)


def _attack_cells(
    config: Mapping[str, Any],
    common: Mapping[str, Any],
    attack: str,
    eps: str | None,
    setting: str,
    gmm_cell: Cell | None,
    hint: Mapping[str, Any],
) -> tuple[list[Cell], dict[bool, Cell]]:
    """(cells in order, the attack cells keyed by whether HFC is on): the plain attack cell and, when HFC is on,
    the HFC one, after the calibration cell of its weight when ``hfc.lam`` is auto."""
    attack_cfg, hfc = config["attack"], config["hfc"]
    base = {
        **common,
        "attack": attack,
        "eps": eps,
        "steps": attack_cfg["steps"],
        "travel": attack_cfg["travel"],
        "targeted": attack_cfg["targeted"],
        "batch_size": attack_cfg["batch_size"],
        "options": dict(attack_cfg[attack]),
    }
    sets = {False: Cell("attack", {**base, "hfc": False, "label": setting}, (common["model_cell"],), setting, hint)}
    cells = [sets[False]]
    if gmm_cell is None:
        return cells, sets
    inputs = {**base, "hfc": True, "steps": hfc["steps"] or attack_cfg["steps"], "hfc_config": hfc}
    inputs.update(gmms_cell=gmm_cell.key, label=f"{setting} +HFC")
    deps: tuple[str, ...] = (common["model_cell"], gmm_cell.key)
    if hfc["lam"] == "auto":
        calibrate = Cell("calibrate", {**inputs, "label": f"{setting} HFC weight"}, deps, f"{setting} HFC weight", hint)
        cells.append(calibrate)
        inputs["calibrate_cell"] = calibrate.key
        deps += (calibrate.key,)
    sets[True] = Cell("attack", inputs, deps, label=inputs["label"], hint=hint)
    return [*cells, sets[True]], sets


def _detect_cells(
    config: Mapping[str, Any],
    common: Mapping[str, Any],
    attack: str,
    eps: str | None,
    setting: str,
    sets: Mapping[bool, Cell],
    hint: Mapping[str, Any],
) -> list[Cell]:
    """One cell per detector: fitted on the plain set, scoring the plain and the HFC set of (attack, eps); the noise
    control has the attack's L-inf budget (for an attack without one, the largest budget of the run)."""
    detector_cfg = config["detector"]
    plain, hfc = sets[False], sets.get(True, sets[False])
    settings = ("fit_fraction", "bootstrap", "train_limit", "layers", "raw_layers", "noise")
    cells = []
    for detector in config["detectors"]:
        inputs = {
            **common,
            "attack": attack,
            "eps": eps,
            "detector": detector,
            **{k: detector_cfg[k] for k in settings},
            "noise_eps": eps if eps is not None else config["eps"][-1],
            "options": dict(detector_cfg[detector]),
            "plain_cell": plain.key,
            "hfc_cell": hfc.key,
            "label": f"{setting} {detector}",
        }
        deps = tuple(dict.fromkeys((common["model_cell"], plain.key, hfc.key)))
        cells.append(Cell("detect", inputs, deps, label=inputs["label"], hint=hint))
    return cells
