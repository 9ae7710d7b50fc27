"""From a validated config to the run's cells (engine.runs.config.DEFAULTS documents every key).

Per seed (``seeds``, else ``seed``), dataset and model: one ``data`` cell (load or generate, split), one ``model``
cell (train or take the checkpoint, clean metrics), one ``gmms`` cell (HFC's mixtures) when HFC is on; per
(attack, eps) -- per attack for attacks without a budget -- the attack sets: ``plain``, ``hfc`` (after its
``calibrate`` cell when the weight is auto), one per fixed HFC weight (``w0``: HFC's schedule alone) and, at the
headline setting, ``adaptive`` (HFC in typical mode); one ``detect`` cell per (attack, eps, detector layer arm,
detector) fitting on plain AEs and scoring every set of that setting and the other attacks' plain and HFC sets at
the same budget (the transfer matrix); one ``features`` cell at the headline setting (feature log-likelihoods,
diagnostics, PCA). Then one ``study`` cell per study. Cells carry only JSON-able inputs; labels name what they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.attacks import ATTACKS, parse_eps
from engine.data import SYNTHETIC
from engine.models import CONSTRAINED
from engine.models.classifier import ARCHITECTURES
from engine.runs.cells import Cell
from engine.runs.context import MEMORY, checkpoint_identity, content_keyed
from engine.runs.overrides import merge
from engine.runs.schema import dataset_label

PLAIN, HFC_SET = "plain", "hfc"  # the attack sets every HFC run has; fixed-weight sets are named w<weight>
ADAPTIVE = "adaptive"  # the adaptive HFC set (typical mode) at the headline setting
TRANSFER = "transfer:"  # prefix of another attack's sets scored by a detector (the transfer matrix)
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


def build_cells(config: Mapping[str, Any]) -> list[Cell]:
    """Every cell of the run described by ``config`` (dependencies before dependants): per seed, dataset and
    model the audit's cells, then one cell per study."""
    cells: list[Cell] = []
    for seed in run_seeds(config):
        one = seeded(config, seed)
        for spec in one["datasets"]:
            for model_cfg in model_configs(one):
                cells += _dataset_cells(one, spec, model_cfg)
    for name in config["studies"]:
        settings = {"seed": config["seed"], **config["study"].get(name, {})}
        cells.append(Cell("study", {"study": name, "config": settings}, label=f"{name} study"))
    return list({cell.key: cell for cell in cells}.values())  # the data cell is shared by a dataset's models


def _dataset_cells(config: Mapping[str, Any], spec: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> list[Cell]:
    spec, label, model = content_keyed(spec), dataset_label(spec), model_label(model_cfg)
    seed, split, attack_cfg = config["seed"], config["split"], config["attack"]
    n = int(spec.get("n", 1000))
    hint = {"model": _model_hint(model_cfg, spec), "n": n, "pool": attack_cfg["pool"] or int(n * split["test"])}
    common = {"dataset": spec, "dataset_label": label, "model_label": model, "seed": seed, "split": split}
    model_cfg = dict(model_cfg)
    if model_cfg["checkpoint"] and not str(model_cfg["checkpoint"]).startswith(MEMORY):
        model_cfg.update(checkpoint_identity(model_cfg["checkpoint"]))
    data_cell = Cell("data", {k: common[k] for k in ("dataset", "seed", "split")}, label=f"{label} data", hint=hint)
    model_cell = Cell(
        "model", {**common, "model": model_cfg}, (data_cell.key,), label=f"{label} {model} model", hint=hint
    )
    cells = [data_cell, model_cell]
    gmm_cell = None
    if config["hfc"]["enabled"]:
        hfc = {k: config["hfc"][k] for k in ("layers", "max_channels", "n_components", "reg_covar", "fit")}
        gmm_cell = Cell(
            "gmms",
            {**common, "hfc": hfc, "model_cell": model_cell.key},
            (model_cell.key,),
            label=f"{label} {model} HFC mixtures",
            hint=hint,
        )
        cells.append(gmm_cell)
    common = {**common, "pool": attack_cfg["pool"], "model_cell": model_cell.key}
    settings: dict[tuple[str, str | None], dict[str, Cell]] = {}
    for attack in config["attacks"]:
        for eps in config["eps"] if ATTACKS[attack].budgeted() else [None]:
            setting = f"{label} {model} {attack}" + ("" if eps is None else f" eps={eps}")
            attack_cells, settings[attack, eps] = _attack_cells(config, common, attack, eps, setting, gmm_cell, hint)
            cells += attack_cells
    for (attack, eps), sets in settings.items():
        setting = f"{label} {model} {attack}" + ("" if eps is None else f" eps={eps}")
        scored = {**sets, **transfer_sets(settings, attack, eps)}
        cells += _detect_cells(config, common, attack, eps, setting, scored, hint)
    if gmm_cell is not None and settings:
        attack, eps = headline(config)
        plain, hfc_set = settings[attack, eps][PLAIN], settings[attack, eps][HFC_SET]
        inputs = {
            **common,
            "attack": attack,
            "eps": eps,
            "layers": config["detector"]["layers"],
            "projection_layers": config["projection"]["layers"],
            "noise_eps": noise_budget(config, eps),
            "noise": config["detector"]["noise"],
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


def hfc_schedule(config: Mapping[str, Any], eps: str | None) -> dict[str, Any]:
    """HFC's steps (and absolute step size): ``hfc.step_size`` fixes the step and the steps follow as
    travel x eps / step_size (the reference's schedule); else ``hfc.steps`` (or ``attack.steps``) steps of
    travel x eps / steps."""
    attack_cfg, hfc = config["attack"], config["hfc"]
    if hfc["step_size"] is not None and eps is not None:
        steps = max(1, round((attack_cfg["travel"] or 2.0) * parse_eps(eps) / parse_eps(hfc["step_size"])))
        return {"steps": steps, "step_size": parse_eps(hfc["step_size"])}
    return {"steps": hfc["steps"] or attack_cfg["steps"]}


def noise_budget(config: Mapping[str, Any], eps: str | None) -> str:
    """The noise control's L-inf budget: ``detector.noise_eps``, else the attack's (for an attack without one, the
    largest budget of the run)."""
    chosen = config["detector"]["noise_eps"]
    return str(chosen) if chosen is not None else (eps if eps is not None else str(config["eps"][-1]))


def _attack_cells(
    config: Mapping[str, Any],
    common: Mapping[str, Any],
    attack: str,
    eps: str | None,
    setting: str,
    gmm_cell: Cell | None,
    hint: Mapping[str, Any],
) -> tuple[list[Cell], dict[str, Cell]]:
    """(cells in order, the attack cells by set name): the plain set; with HFC on, the HFC set (after the
    calibration cell of its weight when ``hfc.lam`` is auto), one set per ``hfc.fixed_weights`` entry at HFC's
    schedule (``w0``: weight 0, the schedule alone) and, at the headline setting with ``hfc.adaptive``, the
    adaptive set (``typical`` mode, its weight calibrated the same way)."""
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
        "hfc": False,
        "variant": "",
    }
    sets = {PLAIN: Cell("attack", {**base, "label": setting}, (common["model_cell"],), setting, hint)}
    cells = [sets[PLAIN]]
    if gmm_cell is None:
        return cells, sets
    schedule = hfc_schedule(config, eps)
    options = {**base["options"], **hfc["options"].get(attack, {}), **schedule}
    hfc_base = {**base, "hfc": True, **schedule, "options": options, "gmms_cell": gmm_cell.key}
    deps = (common["model_cell"], gmm_cell.key)

    def hfc_set(variant: str, mode: str, lam: Any, label: str) -> None:
        inputs = {**hfc_base, "variant": variant, "mode": mode, "lam": lam, "label": label}
        needs = deps
        if lam == "auto":
            calibration = {**inputs, "calibration": hfc["calibration"], "label": f"{label} weight"}
            calibrate = Cell("calibrate", calibration, deps, calibration["label"], hint)
            cells.append(calibrate)
            inputs.update(lam=None, calibrate_cell=calibrate.key)
            needs += (calibrate.key,)
        sets[variant or HFC_SET] = Cell("attack", inputs, needs, label=label, hint=hint)
        cells.append(sets[variant or HFC_SET])

    hfc_set("", hfc["mode"], hfc["lam"], f"{setting} +HFC")
    for weight in hfc["fixed_weights"]:
        hfc_set(f"w{float(weight):g}", hfc["mode"], float(weight), f"{setting} +HFC weight {weight:g}")
    if hfc["adaptive"] and (attack, eps) == headline(config):
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


def set_identity(name: str) -> tuple[bool, str]:
    """(the ``hfc`` column, the ``variant`` column) of the rows of an attack set named ``name``."""
    if name in (PLAIN, HFC_SET):
        return name == HFC_SET, ""
    if name.startswith(TRANSFER):
        return name.endswith("+hfc"), name
    return True, name


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
    common: Mapping[str, Any],
    attack: str,
    eps: str | None,
    setting: str,
    sets: Mapping[str, Cell],
    hint: Mapping[str, Any],
) -> list[Cell]:
    """One cell per (layer arm, detector): fitted on the plain set, scoring every set of (attack, eps)."""
    detector_cfg = config["detector"]
    settings = ("fit_fraction", "bootstrap", "train_limit", "noise")
    gmms = sets[HFC_SET].inputs["gmms_cell"] if HFC_SET in sets else None
    cells = []
    for arm, layers in detector_arms(config).items():
        for detector in config["detectors"]:
            label = f"{setting} {detector}" + ("" if arm is None else f" [{arm} layers]")
            inputs = {
                **common,
                "attack": attack,
                "eps": eps,
                "detector": detector,
                "arm": arm,
                **layers,
                **{k: detector_cfg[k] for k in settings},
                "noise_eps": noise_budget(config, eps),
                "options": dict(detector_cfg[detector]),
                "plain_cell": sets[PLAIN].key,
                "sets": {name: cell.key for name, cell in sets.items() if name != PLAIN},
                "gmms_cell": gmms,
                "label": label,
            }
            deps = (common["model_cell"], *(cell.key for cell in sets.values()), *([gmms] if gmms else []))
            cells.append(Cell("detect", inputs, tuple(dict.fromkeys(deps)), label=label, hint=hint))
    return cells
