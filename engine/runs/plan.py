"""From a validated config to the run's cells (engine.runs.config.DEFAULTS documents every key).

Per seed (``seeds``, else ``seed``), dataset and model: one ``data`` cell (load or generate, split), one ``model``
cell (train or take the checkpoint, clean metrics), one ``gmms`` cell (HFC's mixtures) when HFC is on; per
(attack, eps) -- per attack for attacks without a budget -- the attack sets: ``plain``, ``hfc`` (after its
``calibrate`` cell when the weight is auto), one per fixed HFC weight (``w0``: HFC's schedule alone) and, at the
headline setting, ``adaptive`` (HFC in typical mode); one ``detect`` cell per (attack, eps, detector layer arm,
detector) fitting on plain AEs and scoring every set of that setting and the other attacks' plain and HFC sets at
the same budget (the transfer matrix); one ``features`` cell at the headline setting (feature log-likelihoods,
diagnostics, PCA). Then one ``study`` cell per study.

The plan decides which cells exist and what each is (dataset, model, attack, eps, set, detector, arm, the cells it
reads); the values a cell computes with come from the config through its stage's inputs dataclass, which declares
the keys it reads (engine.runs.cells.reads), so a config key changes the keys of exactly the cells that read it and
of their dependants. A few inputs are derived here from several keys (a detector arm's layers, the noise budget,
an HFC set's weight and mode). Cells carry only JSON-able inputs; labels name what they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.attacks import ATTACKS, parse_eps
from engine.data import SYNTHETIC
from engine.detectors import DETECTORS
from engine.models import CONSTRAINED
from engine.models.classifier import ARCHITECTURES
from engine.runs.cells import Cell
from engine.runs.context import MEMORY, checkpoint_identity, content_keyed
from engine.runs.overrides import merge
from engine.runs.schema import dataset_label
from engine.runs.stages import STAGES
from engine.runs.stages.attack import ADAPTIVE, HFC_SET, PLAIN, TRANSFER, set_identity

GENERATOR_SEED_OFFSET = 1000  # a seed's generated data: generator seed offset + seed (0 was the development data)


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


def run_seeds(config: Mapping[str, Any]) -> list[int]:
    """The seeds the audit runs with: ``seeds`` when set, else ``[seed]``."""
    return [int(s) for s in config["seeds"]] if config.get("seeds") else [int(config["seed"])]


def seeded(config: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """``config`` for one seed: ``seed`` set, and each generated dataset without a seed of its own drawn with the
    generator seed ``GENERATOR_SEED_OFFSET + seed`` (so every seed changes the data, and no reported seed reuses
    the generator seed 0 the default regime was developed on)."""
    datasets = [
        {**spec, "seed": GENERATOR_SEED_OFFSET + seed} if spec["name"] in SYNTHETIC and "seed" not in spec else spec
        for spec in config["datasets"]
    ]
    return {**config, "seed": seed, "datasets": datasets}


def cell(stage: str, config: Mapping[str, Any], deps: Sequence[str], hint: Mapping[str, Any], name: str = "",
         **given: Any) -> Cell:  # fmt: skip
    """A cell of ``stage`` named ``name`` (else its inputs' ``label``): the ``given`` fields of its inputs, and every
    field its inputs dataclass declares (engine.runs.cells.reads) read from ``config``; nothing else of the config
    reaches it."""
    inputs = STAGES[stage].inputs.from_config(config, **given)
    return Cell(stage, inputs.to_json(), tuple(dict.fromkeys(deps)), name or given.get("label", ""), dict(hint))


def build_cells(config: Mapping[str, Any]) -> list[Cell]:
    """Every cell of the run described by ``config`` (dependencies before dependants): per seed, dataset and
    model the audit's cells, then one cell per study."""
    cells: list[Cell] = []
    for seed in run_seeds(config):
        one = seeded(config, seed)
        for spec in one["datasets"]:
            for model_cfg in model_configs(one):
                cells += _dataset_cells(one, spec, model_cfg)
    cells += [cell("study", config, [], {}, f"{name} study", study=name) for name in config["studies"]]
    return list({c.key: c for c in cells}.values())  # the data cell is shared by a dataset's models


def _dataset_cells(config: Mapping[str, Any], spec: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[Cell]:
    """The audit's cells of one dataset and model, read from ``config`` with ``model`` set to this model's settings
    (a model file named by its absolute path and the sha256 of its bytes; a dataset read from files carries its
    content fingerprint)."""
    spec, label, model = content_keyed(spec), dataset_label(spec), model_label(model_cfg)
    n = int(spec.get("n", 1000))
    pool = config["attack"]["pool"]
    hint = {"model": _model_hint(model_cfg, spec), "n": n, "pool": pool or int(n * config["split"]["test"])}
    checkpoint = model_cfg["checkpoint"]
    if checkpoint and not str(checkpoint).startswith(MEMORY):
        model_cfg = {**model_cfg, **checkpoint_identity(checkpoint)}
    config = {**config, "model": model_cfg}
    data_cell = cell("data", config, [], hint, f"{label} data", dataset=spec)
    named = {"dataset": spec, "dataset_label": label, "model_label": model}
    model_cell = cell("model", config, [data_cell.key], hint, f"{label} {model} model", **named)
    cells = [data_cell, model_cell]
    common = {**named, "model_cell": model_cell.key}
    gmm_cell = None
    if config["hfc"]["enabled"]:
        gmm_cell = cell("gmms", config, [model_cell.key], hint, f"{label} {model} HFC mixtures", **common)
        cells.append(gmm_cell)
    settings: dict[tuple[str, str | None], dict[str, Cell]] = {}
    for attack in config["attacks"]:
        for eps in config["eps"] if ATTACKS[attack].budgeted() else [None]:
            setting = f"{label} {model} {attack}" + ("" if eps is None else f" eps={eps}")
            given = {**common, "attack": attack, "eps": eps}
            attack_cells, settings[attack, eps] = _attack_cells(config, given, setting, gmm_cell, hint)
            cells += attack_cells
    for (attack, eps), sets in settings.items():
        setting = f"{label} {model} {attack}" + ("" if eps is None else f" eps={eps}")
        scored = {**sets, **transfer_sets(settings, attack, eps)}
        given = {**common, "attack": attack, "eps": eps, "noise_eps": noise_budget(config, eps)}
        cells += _detect_cells(config, given, setting, scored, gmm_cell, hint)
    if gmm_cell is not None and settings:
        attack, eps = headline(config)
        plain, hfc_set = settings[attack, eps][PLAIN], settings[attack, eps][HFC_SET]
        name = f"{label} {model} features {attack}" + ("" if eps is None else f" eps={eps}")
        deps = [model_cell.key, gmm_cell.key, plain.key, hfc_set.key]
        cells.append(cell(
            "features", config, deps, hint, **common, attack=attack, eps=eps, label=name,
            noise_eps=noise_budget(config, eps), gmms_cell=gmm_cell.key, plain_cell=plain.key, hfc_cell=hfc_set.key,
        ))  # fmt: skip
    return cells


def headline(config: Mapping[str, Any]) -> tuple[str, str | None]:
    """The (attack, eps) the report leads with: ``headline.attack`` / ``headline.eps``, by default the first
    attack at its largest budget."""
    attack = config["headline"]["attack"] or config["attacks"][0]
    if not ATTACKS[attack].budgeted():
        return attack, None
    eps = config["headline"]["eps"] or max(config["eps"], key=parse_eps)
    return attack, str(eps)


def noise_budget(config: Mapping[str, Any], eps: str | None) -> str:
    """The noise control's L-inf budget: ``detector.noise_eps``, else the attack's (for an attack without one, the
    largest budget of the run)."""
    chosen = config["detector"]["noise_eps"]
    return str(chosen) if chosen is not None else (eps if eps is not None else str(config["eps"][-1]))


def _attack_cells(
    config: Mapping[str, Any],
    given: Mapping[str, Any],
    setting: str,
    gmm_cell: Cell | None,
    hint: Mapping[str, Any],
) -> tuple[list[Cell], dict[str, Cell]]:
    """(cells in order, the attack cells by set name): the plain set; with HFC on, the HFC set (after the
    calibration cell of its weight when ``hfc.lam`` is auto), one set per ``hfc.fixed_weights`` entry at HFC's
    schedule (``w0``: weight 0, the schedule alone) and, at the headline setting with ``hfc.adaptive``, the
    adaptive set (``typical`` mode, its weight calibrated the same way)."""
    model_cell, hfc = given["model_cell"], config["hfc"]
    sets = {PLAIN: cell("attack", config, [model_cell], hint, **given, label=setting)}
    cells = [sets[PLAIN]]
    if gmm_cell is None:
        return cells, sets
    deps = [model_cell, gmm_cell.key]

    def hfc_set(variant: str, mode: str, lam: Any, label: str) -> None:
        inputs = {**given, "hfc": True, "variant": variant, "gmms_cell": gmm_cell.key, "mode": mode}
        needs = deps
        if lam == "auto":
            calibrate = cell("calibrate", config, deps, hint, **inputs, label=f"{label} weight")
            cells.append(calibrate)
            inputs.update(calibrate_cell=calibrate.key)
            needs = [*deps, calibrate.key]
        else:
            inputs.update(lam=lam)
        sets[variant or HFC_SET] = cell("attack", config, needs, hint, **inputs, label=label)
        cells.append(sets[variant or HFC_SET])

    hfc_set("", hfc["mode"], hfc["lam"], f"{setting} +HFC")
    for weight in hfc["fixed_weights"]:
        hfc_set(f"w{float(weight):g}", hfc["mode"], float(weight), f"{setting} +HFC weight {weight:g}")
    if hfc["adaptive"] and (given["attack"], given["eps"]) == headline(config):
        hfc_set(ADAPTIVE, "typical", hfc["lam"], f"{setting} +adaptive HFC")
    return cells, sets


def transfer_sets(
    settings: Mapping[tuple[str, str | None], Mapping[str, Cell]], attack: str, eps: str | None
) -> dict[str, Cell]:
    """The other attacks' plain and HFC sets at the same budget, named ``transfer:<attack>`` and
    ``transfer:<attack>+hfc``: the detectors fitted on ``attack`` score them too (the cross-attack transfer
    matrix)."""
    out = {}
    for (other, other_eps), sets in settings.items():
        if other != attack and other_eps == eps:
            out[f"{TRANSFER}{other}"] = sets[PLAIN]
            if HFC_SET in sets:
                out[f"{TRANSFER}{other}+hfc"] = sets[HFC_SET]
    return out


def detector_arms(config: Mapping[str, Any]) -> dict[str | None, dict[str, Any]]:
    """The detector layer arms of the run: ``detector.arms`` (name -> ``layers`` / ``raw_layers``, each defaulting
    to ``detector.layers`` / ``detector.raw_layers``), without the arms reading the constrained layers when HFC is
    off; no arms (or none left): one unnamed arm of ``detector.layers``."""
    detector = config["detector"]
    arms = {
        name: {k: arm.get(k, detector[k]) for k in ("layers", "raw_layers")}
        for name, arm in (detector["arms"] or {}).items()
    }
    if not config["hfc"]["enabled"]:
        arms = {name: arm for name, arm in arms.items() if CONSTRAINED not in (arm["layers"], arm["raw_layers"])}
    return arms or {None: {k: detector[k] for k in ("layers", "raw_layers")}}


def _detect_cells(
    config: Mapping[str, Any],
    given: Mapping[str, Any],
    setting: str,
    sets: Mapping[str, Cell],
    gmm_cell: Cell | None,
    hint: Mapping[str, Any],
) -> list[Cell]:
    """One cell per (layer arm, detector): fitted on the plain set, scoring every set of (attack, eps); a detector
    whose class requires training features (engine.detectors.Requirements) gets them. In each arm the detectors
    that read raw maps (DNN) come first: their feature pass also fills the pooled features the others share."""
    gmms = gmm_cell.key if gmm_cell is not None else None
    scored = {name: c.key for name, c in sets.items() if name != PLAIN}
    deps = [given["model_cell"], *(c.key for c in sets.values()), *([gmms] if gmms else [])]
    cells = []
    for arm, layers in detector_arms(config).items():
        for detector in sorted(config["detectors"], key=lambda name: not DETECTORS[name].requires.raw_maps):
            label = f"{setting} {detector}" + ("" if arm is None else f" [{arm} layers]")
            cells.append(cell(
                "detect", config, deps, hint, **given, **layers, detector=detector, arm=arm, label=label,
                plain_cell=sets[PLAIN].key, sets=scored, gmms_cell=gmms,
                train_features=DETECTORS[detector].requires.training_features,
            ))  # fmt: skip
    return cells


__all__ = [
    "ADAPTIVE",
    "GENERATOR_SEED_OFFSET",
    "HFC_SET",
    "PLAIN",
    "TRANSFER",
    "build_cells",
    "cell",
    "detector_arms",
    "headline",
    "model_configs",
    "model_label",
    "noise_budget",
    "run_seeds",
    "seeded",
    "set_identity",
    "transfer_sets",
]
