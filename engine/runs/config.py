"""Run configuration: defaults, YAML files, dotted command-line overrides, and validation against live registries.

A config is a nested dict. :data:`DEFAULTS` is the default audit (every key is documented in docs/runs.md); a YAML
file is merged over it and then ``key.sub=value`` overrides (values parsed as YAML scalars/lists). Allowed names
(attacks, detectors, architectures, studies, dataset kinds, HFC modes, executors) come from the registries of
the packages that implement them (:func:`choices`), so registering a new attack makes it runnable with no edit
here. Validation rejects unknown keys and values with a :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from engine.attacks import ATTACKS, HFC_MODES, NOISE_KINDS, TARGET_MODES, parse_eps
from engine.data import LOADERS, SYNTHETIC
from engine.detectors import DETECTORS
from engine.models import CONSTRAINED, STAGE_OUTPUTS, InputConvention
from engine.models.classifier import ARCHITECTURES
from engine.models.conventions import check_output
from engine.runs.cluster import check_executor_settings
from engine.runs.overrides import ConfigError, merge, set_dotted, values_at
from engine.runs.schema import dataset_label
from engine.runs.studies import STUDIES

EXECUTORS = ("local", "ray")
MEMORY_DATASET = "memory"  # an in-memory dataset handed to engine.audit(); not loadable from a config file

DEFAULTS: dict[str, Any] = {
    "name": "default",
    "output_dir": "runs",
    "seed": 0,
    "seeds": None,  # several seeds: the audit once per seed (data, split, training, mixtures, attacks, detectors)
    "threads": 2,  # threads of a local run's cells (fixed, so results do not move with the machine's core count)
    "device": "cpu",
    "executor": "local",
    "artifacts": None,  # the artifact location: None is <run dir>/artifacts; a directory or an fsspec URL
    # executor: ray (docs/clusters.md): which cluster, and what a cell of each stage claims there
    "ray": {"address": None, "cpus": None, "retries": 3},
    "resources": {},
    "datasets": [
        {"name": "fundus-synth", "task": "binary", "n": 3000, "image_size": 64},
        {"name": "cxr-synth", "n": 3000, "image_size": 64},
    ],
    "split": {"val": 0.15, "test": 0.15},
    "model": {
        "arch": "resnet18",
        "width": 0.25,
        "dropout": 0.3,
        "epochs": 15,
        "batch_size": 64,
        "lr": 0.001,
        "options": {},
        "checkpoint": None,
        "name": None,
        # what a model file takes and returns (engine.models.InputConvention); converted files must match their
        # reference runtime (onnxruntime, or the TorchScript module) within parity_tolerance (null: report only)
        "input": {"layout": "NCHW", "range": [0, 1], "mean": None, "std": None, "size": None},
        "output": "logits",
        "parity_tolerance": 1e-4,
    },
    # The headline grid (docs/runs.md, "The default regime"): PGD at 8/256, the top of the HFC paper's budgets, where
    # these small from-scratch models' plain AEs are as detectable as the paper's; CW-Linf beside it, so detectors
    # fitted on one attack score the other (the transfer matrix). The other budgets and attacks are in
    # configs/full-grid.yaml.
    "models": [],  # several models in one run: entries merged over `model` (configs/paper.yaml)
    "attacks": ["pgd", "cw_linf"],
    "eps": ["8/256"],
    # As the HFC reference code (gen_base_adv.py): 10 steps of 2 eps / steps, targeted; its CW margin has confidence
    # 100 and its MI-FGSM momentum 0.5.
    "attack": {
        "steps": 10,
        "travel": 2.0,
        "targeted": True,
        "pool": 300,
        "batch_size": 100,
        **{name: {} for name in ATTACKS},
        "cw_linf": {"kappa": 100.0},
        "mifgsm": {"momentum": 0.5},
    },
    # The reference's HFC: nearest-component term normalised per layer, weight 1; here the weight is the largest of
    # the grid (from 1 down) keeping 90% HFC success on validation images, and HFC runs twice the plain steps. It
    # constrains the early and middle stages (every resolution but the last: the reference's width rule leaves a
    # ResNet-50's last stages free), so the "unconstrained" detector arm reads layers HFC never touches; the
    # weight-0 set (fixed_weights) runs HFC's schedule without the constraint, to attribute the drop.
    "hfc": {
        "enabled": True,
        "layers": "early_stages",
        "max_channels": None,
        "mode": "nearest",
        "lam": "auto",
        "calibration": {"target": 0.9, "grid": [1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001], "images": 100},
        "steps": 20,
        "step_size": None,
        "fixed_weights": [0.0],
        "adaptive": True,  # one more HFC set at the headline setting, in typical mode (aims at the clean typical set)
        "options": {},  # per attack, options of its HFC sets merged over attack.<attack> (e.g. cw_linf: {kappa: 10})
        "n_components": 2,
        "reg_covar": 1e-4,
        "fit": {"bayesian": False, "n_init": 1, "max_iter": 100, "augment": 0},
    },
    "detectors": ["kd", "bu", "lid", "maha", "svm", "dnn", "dnr", "typicality"],
    # Per-detector settings (a detector's own keyword arguments) sit beside the protocol's. DNN: Metzen's subnetworks
    # on every constrained layer, trained to convergence (early stopping), at a quarter width (full width costs 16x:
    # not within a CPU budget); DNR: C and gamma by cross-validation on clean training data, as Sotgiu et al.; MAHA on
    # the stage outputs, magnitude selection (and the combiner) on 100 examples per set.
    "detector": {
        "fit_fraction": 0.7,
        "bootstrap": 1000,
        "train_limit": 1000,
        "layers": "activations",
        "raw_layers": None,
        "noise": "uniform",
        "noise_eps": None,
        # the same detectors on two layer sets: those HFC constrains, and every layer (KD and SVM then read the
        # final pooled feature, DNR the last three layers: all unconstrained)
        "arms": {
            "same": {"layers": CONSTRAINED},
            "unconstrained": {"layers": "activations"},
        },
        **{name: {} for name in DETECTORS},
        "dnn": {"width": 0.25, "epochs": 50, "patience": 3},
        "dnr": {"C": "cv", "gamma": "cv"},
        "maha": {"select_max": 100, "layers": STAGE_OUTPUTS},
    },
    "headline": {"attack": None, "eps": None},
    "projection": {"layers": None},
    "studies": ["stress", "uap"],
    # Overrides merged over each study's defaults, which are sized to this audit's budget (docs/studies.md);
    # configs/studies-full.yaml runs them at full strength.
    "study": {"stress": {}, "uap": {}},
}

QUICK: dict[str, Any] = {
    "name": "quick",
    "datasets": [{"name": "fundus-synth", "task": "binary", "n": 1500, "image_size": 64}],
    "model": {"epochs": 10},
    "attacks": ["pgd"],
    "attack": {"pool": 160},
    "studies": [],
}


def choices() -> dict[str, list[str]]:
    """Allowed values per config key, read from the live registries (also the CLI's choices)."""
    return {
        "attacks": list(ATTACKS),
        "detectors": list(DETECTORS),
        "studies": list(STUDIES),
        "model.arch": list(ARCHITECTURES),
        "models.arch": list(ARCHITECTURES),
        "hfc.mode": list(HFC_MODES),
        "detector.noise": list(NOISE_KINDS),
        "datasets.name": [*SYNTHETIC, *LOADERS, MEMORY_DATASET],
        "executor": list(EXECUTORS),
    }


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), quick: bool = False) -> dict[str, Any]:
    """Defaults, then ``--quick`` settings, then the YAML file at ``path``, then ``key=value`` overrides."""
    config = copy.deepcopy(DEFAULTS)
    if quick:
        config = merge(config, QUICK, free_form=_free_form)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
        config = merge(config, loaded, free_form=_free_form)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        set_dotted(config, key.strip(), value, free_form=_free_form)
    _model_labels(config)
    validate(config)
    return config


def _model_labels(config: dict[str, Any]) -> None:
    """A dataset spec with ``labels: model`` (data without labels) is labelled with the predictions of
    ``model.checkpoint``: the spec gets that model's settings, and a ``label`` saying where its labels come from."""
    for i, spec in enumerate(config["datasets"]):
        if not isinstance(spec, dict) or spec.get("labels") != "model":
            continue
        if not config["model"]["checkpoint"]:
            raise ConfigError(f"config key 'datasets.{i}.labels' is 'model', which needs model.checkpoint")
        settings = {k: config["model"][k] for k in ("checkpoint", "input", "output", "parity_tolerance")}
        settings["checkpoint"] = str(Path(settings["checkpoint"]).expanduser().resolve())
        spec["labels"] = settings
        spec.setdefault("label", f"{dataset_label(spec)} (labels: model predictions)")


def _free_form(dotted: str) -> bool:
    """Keys whose contents are not checked against DEFAULTS (dataset specs, study and per-method options)."""
    head, _, rest = dotted.partition(".")
    free = ("model.options", "detector.arms.", "hfc.options.")
    return head in ("datasets", "models", "study", "resources") or dotted.startswith(free) or (
        head in ("attack", "detector") and rest.split(".")[0] in (*ATTACKS, *DETECTORS) and "." in rest
    )


def validate(config: Mapping[str, Any]) -> None:
    """Check names against the registries, types and ranges; raise ConfigError naming the offending key."""
    for key, allowed in choices().items():
        for value in values_at(config, key):
            for item in value if isinstance(value, list) else [value]:
                if item not in allowed:
                    raise ConfigError(f"config key {key!r} has value {item!r}; allowed: {allowed}")
    if not isinstance(config["datasets"], list) or not (config["datasets"] or config["studies"]):
        raise ConfigError("config key 'datasets' must be a non-empty list of dataset specs (or run a study)")
    for i, spec in enumerate(config["datasets"]):
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigError(f"config key 'datasets.{i}' must be a mapping with a 'name'")
    if not config["eps"]:
        raise ConfigError("config key 'eps' must list at least one budget, e.g. ['2/256']")
    for key in ("attack.steps", "attack.batch_size", "model.epochs", "model.batch_size", "models.epochs"):
        _positive_int(config, key)
    if config["attack"]["pool"] is not None:
        _positive_int(config, "attack.pool")
    if not isinstance(config["models"], list) or not all(isinstance(m, Mapping) for m in config["models"]):
        raise ConfigError("config key 'models' must be a list of mappings, each merged over 'model'")
    _positive_int(config, "detector.train_limit")
    _positive_int(config, "hfc.calibration.images")
    raw = config["detector"]["raw_layers"]
    count = isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0
    if not (raw is None or isinstance(raw, (str, list)) or count):
        raise ConfigError(f"config key 'detector.raw_layers' must be null, a count >= 0 or layer patterns, got {raw!r}")
    for part in ("val", "test"):
        if not 0 <= config["split"][part] < 1:
            raise ConfigError(f"config key 'split.{part}' must be a fraction in [0, 1), got {config['split'][part]!r}")
    fraction = config["detector"]["fit_fraction"]
    if not 0 < fraction < 1:
        raise ConfigError(f"config key 'detector.fit_fraction' must be in (0, 1), got {fraction!r}")
    travel = config["attack"]["travel"]
    if travel is not None and (isinstance(travel, bool) or not isinstance(travel, (int, float)) or travel <= 0):
        raise ConfigError(f"config key 'attack.travel' must be a number > 0 or null, got {travel!r}")
    targeted = config["attack"]["targeted"]
    if not (isinstance(targeted, bool) or targeted in TARGET_MODES):
        raise ConfigError(f"config key 'attack.targeted' must be true, false or one of {TARGET_MODES}")
    _seeds(config)
    _hfc(config["hfc"])
    _arms(config["detector"]["arms"])
    _optional_eps(config, "detector.noise_eps", config["detector"]["noise_eps"])
    _model(config["model"])
    _headline(config)
    check_executor_settings(config)
    _method_options(config, "attack", ATTACKS, lambda cls: cls.parameters())
    hfc_options = config["hfc"]["options"]
    if not isinstance(hfc_options, Mapping) or set(hfc_options) - set(ATTACKS):
        raise ConfigError(f"config key 'hfc.options' must map attacks {list(ATTACKS)} to options, got {hfc_options!r}")
    _method_options(config["hfc"], "options", ATTACKS, lambda cls: cls.parameters(), "hfc.options")
    _method_options(config, "detector", DETECTORS, lambda cls: list(inspect.signature(cls.__init__).parameters))


def _hfc(hfc: Mapping[str, Any]) -> None:
    lam, calibration = hfc["lam"], hfc["calibration"]
    if lam != "auto" and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0):
        raise ConfigError(f"config key 'hfc.lam' must be 'auto' (calibrated) or a number >= 0, got {lam!r}")
    if not 0 < calibration["target"] <= 1:
        raise ConfigError(f"config key 'hfc.calibration.target' must be in (0, 1], got {calibration['target']!r}")
    grid = calibration["grid"]
    if not isinstance(grid, list) or not grid or not all(isinstance(v, (int, float)) and v >= 0 for v in grid):
        raise ConfigError(f"config key 'hfc.calibration.grid' must be a non-empty list of weights >= 0, got {grid!r}")
    steps = hfc["steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"config key 'hfc.steps' must be a positive integer or null (attack.steps), got {steps!r}")
    weights = hfc["fixed_weights"]
    if not isinstance(weights, list) or not all(_number(w) and w >= 0 for w in weights):
        raise ConfigError(f"config key 'hfc.fixed_weights' must be a list of weights >= 0, got {weights!r}")
    max_channels = hfc["max_channels"]
    if max_channels is not None and (not isinstance(max_channels, int) or isinstance(max_channels, bool)
                                     or max_channels < 1):  # fmt: skip
        raise ConfigError(f"config key 'hfc.max_channels' must be a positive integer or null, got {max_channels!r}")
    step = hfc["step_size"]
    if step is not None:
        try:
            ok = parse_eps(step) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"config key 'hfc.step_size' must be null or a step > 0 such as '1/1024', got {step!r}")
    if not isinstance(hfc["adaptive"], bool):
        raise ConfigError(f"config key 'hfc.adaptive' must be true or false, got {hfc['adaptive']!r}")
    fit = hfc["fit"]
    if not isinstance(fit["bayesian"], bool):
        raise ConfigError(f"config key 'hfc.fit.bayesian' must be true or false, got {fit['bayesian']!r}")
    for key in ("n_init", "max_iter"):
        if isinstance(fit[key], bool) or not isinstance(fit[key], int) or fit[key] < 1:
            raise ConfigError(f"config key 'hfc.fit.{key}' must be a positive integer, got {fit[key]!r}")
    if isinstance(fit["augment"], bool) or not isinstance(fit["augment"], int) or fit["augment"] < 0:
        raise ConfigError(f"config key 'hfc.fit.augment' must be an integer >= 0, got {fit['augment']!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seeds(config: Mapping[str, Any]) -> None:
    seeds, threads = config["seeds"], config["threads"]
    ints = isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if seeds is not None and not (ints and len(set(seeds)) == len(seeds)):
        raise ConfigError(f"config key 'seeds' must be null or a list of distinct integers, got {seeds!r}")
    if isinstance(config["seed"], bool) or not isinstance(config["seed"], int):
        raise ConfigError(f"config key 'seed' must be an integer, got {config['seed']!r}")
    if threads is not None:
        _positive_int(config, "threads")


def _arms(arms: Any) -> None:
    """``detector.arms``: null, or a mapping of arm names to ``layers`` / ``raw_layers`` selections."""
    if arms is None:
        return
    if not isinstance(arms, Mapping) or not all(isinstance(name, str) and name for name in arms):
        raise ConfigError(f"config key 'detector.arms' must be null or a mapping of arm names, got {arms!r}")
    for name, arm in arms.items():
        if not isinstance(arm, Mapping) or set(arm) - {"layers", "raw_layers"}:
            raise ConfigError(f"config key 'detector.arms.{name}' must be a mapping with 'layers' and/or 'raw_layers'")


def _optional_eps(config: Mapping[str, Any], key: str, value: Any) -> None:
    if value is None:
        return
    try:
        budget = parse_eps(value)
    except (TypeError, ValueError):
        budget = -1.0
    if not budget >= 0:
        raise ConfigError(f"config key {key!r} must be null or a budget >= 0 such as '2/255' or 0.01, got {value!r}")


def _model(model: Mapping[str, Any]) -> None:
    """The declared conventions of a model file (model.input, model.output, model.parity_tolerance)."""
    try:
        InputConvention.parse(model["input"], key="config key 'model.input'")
        check_output(model["output"], key="config key 'model.output'")
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    tolerance = model["parity_tolerance"]
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not tolerance >= 0):  # fmt: skip
        raise ConfigError(f"config key 'model.parity_tolerance' must be a number >= 0 or null, got {tolerance!r}")


def _headline(config: Mapping[str, Any]) -> None:
    attack, eps = config["headline"]["attack"], config["headline"]["eps"]
    if attack is not None and attack not in config["attacks"]:
        raise ConfigError(f"config key 'headline.attack' must be one of the attacks {config['attacks']}: {attack!r}")
    if eps is not None and str(eps) not in [str(e) for e in config["eps"]]:
        raise ConfigError(f"config key 'headline.eps' must be one of the run's eps {config['eps']}, got {eps!r}")


def _positive_int(config: Mapping[str, Any], key: str) -> None:
    for value in values_at(config, key):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config key {key!r} must be a positive integer, got {value!r}")


def _method_options(
    config: Mapping[str, Any], section: str, registry: Mapping[str, Any], params: Any, key: str | None = None
) -> None:
    """``<section>.<method>`` (named ``key`` in messages) must be a mapping of keyword arguments the method's class
    accepts."""
    key = key or section
    for method, cls in registry.items():
        options = config[section].get(method, {})
        if not isinstance(options, Mapping):
            raise ConfigError(f"config key '{key}.{method}' must be a mapping of {method} options")
        accepted = [p for p in params(cls) if p not in ("self", "model", "seed", "constraint", "eps")]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(f"config key '{key}.{method}' has unknown options {unknown}; allowed: {accepted}")
