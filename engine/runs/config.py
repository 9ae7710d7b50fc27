"""Run configuration: the typed schema and its defaults, YAML files, dotted command-line overrides, validation.

A config is a nested dict. :class:`RunConfig` is its schema: a tree of dataclasses, one per section, whose
fields give each key's type, default and allowed range (engine.runs.overrides.key); :data:`DEFAULTS` is the
plain dict of those defaults (every key is documented in docs/runs.md, and tests/test_config_schema.py checks the
table against the schema). A YAML file is merged over the defaults, then ``key.sub=value`` overrides (values
parsed as YAML), then :func:`validate` checks every key before any work: unknown keys at any depth, wrong types,
NaN/inf, out-of-range values and names missing from the registries raise a one-line :class:`ConfigError` naming
the dotted key, the value and what is allowed. Allowed names (attacks, detectors, architectures, studies, dataset
kinds, stages, HFC modes, executors) are read from the registries of the packages that implement them
(:func:`choices`), so registering a new attack makes it runnable with no edit here; a method's options are
checked against its class's constructor (names, annotated types, and the class's own rules).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import math
import typing
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import torch
import yaml
from torch import nn

from engine.attacks import ATTACKS, HFC_MODES, NOISE_KINDS, TARGET_MODES, Attack, parse_eps
from engine.data import LOADERS, SYNTHETIC, FileDataset, synthetic
from engine.detectors import DETECTORS
from engine.models import CONSTRAINED, OUTPUT_KINDS, STAGE_OUTPUTS, InputConvention, train_model
from engine.models.classifier import ARCHITECTURES
from engine.models.train import train
from engine.runs.cluster import INSTALL_HINT
from engine.runs.overrides import ConfigError, conform, defaults, describe, in_range, key, merge, set_dotted, show
from engine.runs.schema import dataset_label
from engine.runs.stages import STAGES
from engine.runs.studies import STUDIES

EXECUTORS = ("local", "ray")
MEMORY_DATASET = "memory"  # an in-memory dataset handed to engine.audit(); not loadable from a config file
SEED_MAX = 2**31 - 1  # every generator (numpy, torch, sklearn's 32-bit one) takes it, with room for seed offsets
METHOD_RESERVED = ("self", "model", "seed", "constraint", "eps")  # a method's arguments the run sets itself
MODEL_RESERVED = ("model", "train_ds", "val_ds", "out_dir", "seed", "progress", "device", "test_ds", "split_hash",
                  "in_channels", "arch", "width", "dropout", "epochs", "lr", "batch_size")  # fmt: skip
FILE_DATASET_OPTIONS = ("cache_mb", "workers")  # engine.data.FileDataset options the file loaders pass on
SPEC_RULES: dict[str, dict[str, Any]] = {  # ranges of dataset-spec options (their types come from the loaders)
    "n": {"ge": 1},
    "image_size": {"ge": 1},
    "seed": {"ge": 0, "le": SEED_MAX},
    "channels": {"choices": (1, 3)},
    "contrast": {"gt": 0},
    "workers": {"ge": 1},
    "cache_mb": {"ge": 0},
    "crop_threshold": {"ge": 0},
}

class Names:
    """The names of several registries, read live."""

    def __init__(self, *registries: Collection[str]) -> None:
        self.registries = registries

    def __contains__(self, name: object) -> bool:
        return any(name in registry for registry in self.registries)

    def __iter__(self) -> Iterator[str]:
        return (name for registry in self.registries for name in registry)


# key -> the registry (or tuple) its values come from; read live, so a registered name is allowed at once
CHOICES: dict[str, Any] = {
    "attacks": ATTACKS,
    "detectors": DETECTORS,
    "studies": STUDIES,
    "model.arch": ARCHITECTURES,
    "models.arch": ARCHITECTURES,
    "model.output": OUTPUT_KINDS,
    "hfc.mode": HFC_MODES,
    "detector.noise": NOISE_KINDS,
    "datasets.name": Names(SYNTHETIC, LOADERS, (MEMORY_DATASET,)),
    "resources": STAGES,
    "executor": EXECUTORS,
}


def choices() -> dict[str, list[str]]:
    """Allowed values per config key, read from the live registries (also the CLI's choices)."""
    return {name: list(allowed) for name, allowed in CHOICES.items()}


# -- values with rules of their own ------------------------------------------------------------------------------


class Budget:
    """An L-inf budget, a fraction of the [0, 1] input range: a fraction string (kept as written, e.g. '8/256') or
    a number (written with repr, e.g. 0.03 -> '0.03'); so a budget is always one canonical string."""

    @classmethod
    def describe(cls, rules: Mapping[str, Any]) -> str:
        low = f"> {rules['gt']}" if "gt" in rules else f">= {rules.get('ge', 0)}"
        return f"a budget {low} and <= {rules.get('le', 1)} (a fraction of the [0, 1] range) such as '8/255' or 0.03"

    @classmethod
    def conform(cls, value: Any, dotted: str, rules: Mapping[str, Any]) -> str:
        try:
            number = parse_eps(value)
        except (TypeError, ValueError):
            number = math.nan
        if not in_range(number, {"le": 1, **rules}):
            raise ConfigError(f"config key {dotted!r} must be {cls.describe(rules)}, got {show(value)}")
        return value.strip() if isinstance(value, str) else repr(value)


class PlainName:
    """A run name: one path component (no separator, not '.' or '..', not absolute, not empty)."""

    @classmethod
    def describe(cls, rules: Mapping[str, Any]) -> str:
        return "a plain name (no '/' or '\\', not '.' or '..', not empty)"

    @classmethod
    def conform(cls, value: Any, dotted: str, rules: Mapping[str, Any]) -> str:
        plain = isinstance(value, str) and value.strip() not in ("", ".", "..") and "\0" not in value
        if not plain or len(PurePosixPath(value).parts) != 1 or len(PureWindowsPath(value).parts) != 1:
            raise ConfigError(f"config key {dotted!r} must be {cls.describe(rules)}, got {show(value)}")
        return value


class Device:
    """A torch device: cpu, cuda, cuda:<index> or mps (whether this machine has it: :func:`check_device`)."""

    @classmethod
    def describe(cls, rules: Mapping[str, Any]) -> str:
        return "a torch device: cpu, cuda, cuda:<index> or mps"

    @classmethod
    def conform(cls, value: Any, dotted: str, rules: Mapping[str, Any]) -> str:
        try:
            device = torch.device(value) if isinstance(value, str) else None
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"config key {dotted!r} must be {cls.describe(rules)}, got {show(value)}")
        return value


def check_device(device: str, key: str = "config key 'device'") -> None:
    """Refuse a device this machine does not have, naming the ones it has."""
    parsed = torch.device(device)
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    present = parsed.type == "cpu" or (parsed.type == "cuda" and (parsed.index or 0) < cuda) or (
        parsed.type == "mps" and torch.backends.mps.is_available())  # fmt: skip
    if not present:
        here = ["cpu", *(f"cuda:{i}" for i in range(cuda)), *(["mps"] if torch.backends.mps.is_available() else [])]
        build = "" if torch.backends.cuda.is_built() else " (this torch is a CPU build)"
        raise ConfigError(f"{key} is {device!r}, which this machine does not have{build}; devices here: {here}")


class ModelInput:
    """What a model file takes (engine.models.InputConvention: layout, range, mean, std, size)."""

    @classmethod
    def describe(cls, rules: Mapping[str, Any]) -> str:
        return "a mapping of layout, range, mean, std, size (engine.models.InputConvention) with finite numbers"

    @classmethod
    def conform(cls, value: Any, dotted: str, rules: Mapping[str, Any]) -> Any:
        if not _finite(value):
            raise ConfigError(f"config key {dotted!r} must be {cls.describe(rules)}, got {show(value)}")
        allowed = [f.name for f in dataclasses.fields(InputConvention)]
        unknown = sorted(set(value) - set(allowed)) if isinstance(value, Mapping) else []
        if unknown:
            where = f"{dotted}.{unknown[0]}"
            raise ConfigError(f"unknown config key {where!r}; allowed: {allowed}", where)
        if rules.get("partial") and isinstance(value, Mapping):
            return value  # a `models` entry's part: checked once merged over `model`
        try:
            InputConvention.parse(value, key=f"config key {dotted!r}")
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        return value


class DatasetSpec:
    """A dataset spec: ``name`` (a synthetic set or a loader kind), the options its generator or loader accepts
    (``path`` for a loader's file or folder), ``label`` (the rows' name) and ``labels: model``."""

    @classmethod
    def describe(cls, rules: Mapping[str, Any]) -> str:
        return f"a mapping with a 'name' among {sorted(CHOICES['datasets.name'])} and that kind's options"

    @classmethod
    def conform(cls, value: Any, dotted: str, rules: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(value, Mapping) or "name" not in value:
            raise ConfigError(f"config key {dotted!r} must be {cls.describe(rules)}, got {show(value)}")
        name = conform(str, value["name"], f"{dotted}.name", {"choices": CHOICES["datasets.name"]})
        options = dataset_options(name)
        out = {}
        for option, item in value.items():
            where = f"{dotted}.{option}"
            if option not in options:
                allowed = sorted(options)
                raise ConfigError(f"unknown config key {where!r} for dataset {name!r}; allowed: {allowed}", where)
            task_rules = {"choices": SYNTHETIC[name].tasks} if option == "task" and name in SYNTHETIC else {}
            out[option] = conform(options[option], item, where, {**SPEC_RULES.get(option, {}), **task_rules})
        return out


class Labels:
    """``labels`` of a dataset spec: ``model`` (the data is labelled with ``model.checkpoint``'s predictions), or
    the model settings that names once the config is loaded."""

    KEYS = ("checkpoint", "input", "output", "parity_tolerance")

    @classmethod
    def describe(cls, rules: Mapping[str, Any]) -> str:
        return "'model' (label the data with model.checkpoint's predictions)"

    @classmethod
    def conform(cls, value: Any, dotted: str, rules: Mapping[str, Any]) -> Any:
        if value == "model" or (isinstance(value, Mapping) and set(value) == set(cls.KEYS)):
            return value
        raise ConfigError(f"config key {dotted!r} must be {cls.describe(rules)}, got {show(value)}")


class HfcOptions:
    """``hfc.options``: per attack, options of its HFC sets (that attack's keyword arguments)."""

    @classmethod
    def describe(cls, rules: Mapping[str, Any]) -> str:
        return f"a mapping of attacks {list(ATTACKS)} to their options"

    @classmethod
    def conform(cls, value: Any, dotted: str, rules: Mapping[str, Any]) -> dict[str, Any]:
        attacks = conform(dict[str, Any], value, dotted, {"choices": ATTACKS})
        return {name: method_options(ATTACKS[name], options, f"{dotted}.{name}") for name, options in attacks.items()}


class StudySettings:
    """``study``: per study, settings merged over its defaults (unknown keys refused here, values by the study)."""

    @classmethod
    def describe(cls, rules: Mapping[str, Any]) -> str:
        return f"a mapping of studies {list(STUDIES)} to settings"

    @classmethod
    def conform(cls, value: Any, dotted: str, rules: Mapping[str, Any]) -> dict[str, Any]:
        studies = conform(dict[str, Any], value, dotted, {"choices": STUDIES})
        for name, settings in studies.items():
            merge(STUDIES[name].defaults, settings, f"{dotted}.{name}.")
        return studies


Layers = str | list[str]  # layer names, glob patterns or a selection such as 'activations' (engine.models.features)

# -- the schema ------------------------------------------------------------------------------------------------


@dataclass
class RaySettings:
    address: str | None = key(None)
    cpus: int | None = key(None, ge=1)
    retries: int = key(3, ge=0)


@dataclass
class Claim:
    cpus: float = key(1, gt=0)
    gpus: float = key(0, ge=0)
    memory_gb: float = key(0, ge=0)


@dataclass
class Split:
    val: float = key(0.15, ge=0, lt=1)
    test: float = key(0.15, ge=0, lt=1)


@dataclass
class ModelSettings:
    arch: str = key("resnet18", choices=ARCHITECTURES)
    width: float = key(0.25, gt=0)
    dropout: float = key(0.3, ge=0, lt=1)
    epochs: int = key(15, ge=1)
    batch_size: int = key(64, ge=1)
    lr: float = key(0.001, gt=0)
    options: dict[str, Any] = key({})
    checkpoint: str | None = key(None)
    name: str | None = key(None)
    # what a model file takes and returns (engine.models.InputConvention); converted files must match their
    # reference runtime (onnxruntime, or the TorchScript module) within parity_tolerance (null: report only)
    input: ModelInput = key({"layout": "NCHW", "range": [0, 1], "mean": None, "std": None, "size": None})
    output: str = key("logits", choices=OUTPUT_KINDS)
    parity_tolerance: float | None = key(1e-4, ge=0)


@dataclass
class AttackSettings:
    """As the HFC reference code (gen_base_adv.py): 10 steps of 2 eps / steps, targeted; its CW margin has
    confidence 100 and its MI-FGSM momentum 0.5. Beside these keys, ``attack.<attack>``: that attack's options."""

    steps: int = key(10, ge=1)
    travel: float | None = key(2.0, gt=0)
    targeted: bool | Literal[TARGET_MODES] = key(True)  # type: ignore[valid-type]
    pool: int | None = key(300, ge=1)
    batch_size: int = key(100, ge=1)

    @classmethod
    def extra_names(cls) -> list[str]:
        return list(ATTACKS)

    @classmethod
    def extra_defaults(cls) -> dict[str, Any]:
        return {**{name: {} for name in ATTACKS}, "cw_linf": {"kappa": 100.0}, "mifgsm": {"momentum": 0.5}}

    @classmethod
    def extra(cls, name: str, value: Any, dotted: str) -> dict[str, Any]:
        return method_options(ATTACKS[name], value, dotted)


@dataclass
class Calibration:
    target: float = key(0.9, gt=0, le=1)
    grid: list[float] = key([1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001], ge=0, nonempty=True, scalar=True)
    images: int = key(100, ge=1)
    # its trials cost at most this many HFC attacks on the pool: images <= max_cost x pool / trials (at least 10)
    max_cost: float = key(2.0, gt=0)


@dataclass
class MixtureFit:
    bayesian: bool = key(False)
    n_init: int = key(1, ge=1)
    max_iter: int = key(100, ge=1)
    augment: int = key(0, ge=0)


@dataclass
class HfcSettings:
    """The reference's HFC: nearest-component term normalised per layer, weight 1; here the weight is the largest of
    the grid (from 1 down) keeping 90% HFC success on validation images, and HFC runs twice the plain steps. It
    constrains the early and middle stages (every resolution but the last: the reference's width rule leaves a
    ResNet-50's last stages free), so the "unconstrained" detector arm reads layers HFC never touches; the
    weight-0 set (fixed_weights) runs HFC's schedule without the constraint, to attribute the drop."""

    enabled: bool = key(True)
    layers: Layers = key("early_stages")
    max_channels: int | None = key(None, ge=1)
    mode: str = key("nearest", choices=HFC_MODES)
    lam: float | Literal["auto"] = key("auto", ge=0)
    calibration: Calibration = field(default_factory=Calibration)
    steps: int | None = key(20, ge=1)
    step_size: Budget | None = key(None, gt=0)
    fixed_weights: list[float] = key([0.0], ge=0, scalar=True)
    adaptive: bool = key(True)  # one more HFC set at the headline setting, in typical mode
    options: HfcOptions = key({})  # per attack, options of its HFC sets merged over attack.<attack>
    n_components: int = key(2, ge=1)
    reg_covar: float = key(1e-4, gt=0)
    fit: MixtureFit = field(default_factory=MixtureFit)


@dataclass
class Arm:
    """A detector layer arm; a key it does not give is ``detector.layers`` / ``detector.raw_layers``."""

    layers: Layers = key("activations")
    raw_layers: int | Layers | None = key(None, ge=0)


@dataclass
class DetectorSettings:
    """Per-detector settings (a detector's own keyword arguments, ``detector.<detector>``) sit beside the
    protocol's. DNN: Metzen's subnetworks on every constrained layer, trained to convergence (early stopping), at a
    quarter width (full width costs 16x: not within a CPU budget); DNR: C and gamma by cross-validation on clean
    training data, as Sotgiu et al.; MAHA on the stage outputs, magnitude selection (and the combiner) on 100
    examples per set. The arms: the same detectors on two layer sets, those HFC constrains and every layer (KD
    and SVM then read the final pooled feature, DNR the last three layers: all unconstrained)."""

    fit_fraction: float = key(0.7, gt=0, lt=1)
    bootstrap: int = key(1000, ge=0)
    train_limit: int = key(1000, ge=1)
    layers: Layers = key("activations")
    raw_layers: int | Layers | None = key(None, ge=0)
    noise: str = key("uniform", choices=NOISE_KINDS)
    noise_eps: Budget | None = key(None, ge=0)
    arms: dict[str, Arm] | None = key({"same": {"layers": CONSTRAINED}, "unconstrained": {"layers": "activations"}})

    @classmethod
    def extra_names(cls) -> list[str]:
        return list(DETECTORS)

    @classmethod
    def extra_defaults(cls) -> dict[str, Any]:
        return {
            **{name: {} for name in DETECTORS},
            "dnn": {"width": 0.25, "epochs": 50, "patience": 3},
            "dnr": {"C": "cv", "gamma": "cv"},
            "maha": {"select_max": 100, "layers": STAGE_OUTPUTS},
        }

    @classmethod
    def extra(cls, name: str, value: Any, dotted: str) -> dict[str, Any]:
        return method_options(DETECTORS[name], value, dotted)


@dataclass
class Headline:
    attack: str | None = key(None, choices=ATTACKS)
    eps: Budget | None = key(None, gt=0)


@dataclass
class Projection:
    layers: Layers | None = key(None)


@dataclass
class RunConfig:
    """The run config. The headline grid (docs/runs.md, "The default regime"): PGD at 8/256, the top of the HFC
    paper's budgets, where these small from-scratch models' plain AEs are as detectable as the paper's; CW-Linf
    beside it, so detectors fitted on one attack score the other (the transfer matrix). The other budgets and
    attacks are in configs/full-grid.yaml."""

    name: PlainName = key("default")
    output_dir: str = key("runs")
    seed: int = key(0, ge=0, le=SEED_MAX)
    seeds: list[int] | None = key(None, ge=0, le=SEED_MAX, nonempty=True, distinct=True)  # the audit once per seed
    threads: int | None = key(2, ge=1)  # fixed, so results do not move with the machine's core count
    device: Device = key("cpu")
    executor: str = key("local", choices=EXECUTORS)
    artifacts: str | None = key(None)  # None is <run dir>/artifacts; a directory or an fsspec URL
    ray: RaySettings = field(default_factory=RaySettings)  # executor: ray (docs/clusters.md)
    resources: dict[str, Claim] = key({}, choices=STAGES)  # what a cell of each stage claims on Ray
    datasets: list[DatasetSpec] = key(
        [
            {"name": "fundus-synth", "task": "binary", "n": 3000, "image_size": 64},
            {"name": "cxr-synth", "n": 3000, "image_size": 64},
        ]
    )
    split: Split = field(default_factory=Split)
    model: ModelSettings = field(default_factory=ModelSettings)
    models: list[ModelSettings] = key([], partial=True)  # several models: entries merged over `model`
    attacks: list[str] = key(["pgd", "cw_linf"], choices=ATTACKS, distinct=True, scalar=True)
    eps: list[Budget] = key(["8/256"], gt=0, nonempty=True, distinct=True, scalar=True)
    attack: AttackSettings = field(default_factory=AttackSettings)
    hfc: HfcSettings = field(default_factory=HfcSettings)
    detectors: list[str] = key(
        ["kd", "bu", "lid", "maha", "svm", "dnn", "dnr", "typicality"], choices=DETECTORS, distinct=True, scalar=True
    )
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    headline: Headline = field(default_factory=Headline)
    projection: Projection = field(default_factory=Projection)
    studies: list[str] = key(["stress", "uap"], choices=STUDIES, distinct=True, scalar=True)
    # overrides merged over each study's defaults, which are sized to this audit's budget (docs/studies.md)
    study: StudySettings = key({"stress": {}, "uap": {}})


DEFAULTS: dict[str, Any] = defaults(RunConfig())

QUICK: dict[str, Any] = {
    "name": "quick",
    "datasets": [{"name": "fundus-synth", "task": "binary", "n": 1500, "image_size": 64}],
    "model": {"epochs": 10},
    "attacks": ["pgd"],
    "attack": {"pool": 160},
    "studies": [],
}


# -- loading and validation -------------------------------------------------------------------------------------


def load_config(
    path: str | Path | Sequence[str | Path] | None = None,
    overrides: Sequence[str] = (),
    quick: bool = False,
    settings: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Defaults, then ``--quick`` settings, then the YAML file(s) at ``path`` (several: merged in order), then
    ``settings`` (mappings, e.g. engine.audit's keywords), then ``key=value`` overrides; validated (see
    :func:`validate`)."""
    layers: list[Mapping[str, Any]] = [QUICK] if quick else []
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    layers += [_read_yaml(Path(p)) for p in paths]
    config = copy.deepcopy(DEFAULTS)
    for layer in [*layers, *settings]:
        config = merge(config, layer, free_form=lambda dotted: True)  # unknown keys: refused by validate
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        set_dotted(config, name.strip(), value)
    return validate(config)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    return loaded


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check ``config`` against :class:`RunConfig` and the rules between keys; raise a one-line ConfigError naming
    the offending key. Normalises ``config`` in place (budgets to canonical strings, a scalar where a list is meant
    to a one-item list, ``labels: model`` to the model's settings) and returns it."""
    checked = conform(RunConfig, config, "")
    config.clear()
    config.update(checked)
    if not (config["datasets"] or config["studies"]):
        raise ConfigError("config key 'datasets' must be a non-empty list of dataset specs (or run a study)")
    split = config["split"]
    if not split["val"] + split["test"] < 1:
        raise ConfigError(f"config keys 'split.val' + 'split.test' must be < 1 (a train split), got {split}")
    models = [("model", config["model"])]
    for i, entry in enumerate(config["models"]):  # each entry merged over `model`, as the plan does
        merged = merge(config["model"], entry, free_form=lambda dotted: True)
        models.append((f"models.{i}", conform(ModelSettings, merged, f"models.{i}")))
    for where, model in models:
        model_options(model, f"{where}.options")
    _headline(config)
    if config["executor"] == "local":  # a Ray cluster's workers may have devices the driver lacks
        check_device(config["device"])
    if config["executor"] == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(f"config key 'executor' is 'ray', which needs Ray, not installed: {INSTALL_HINT}")
    _model_labels(config)
    return config


def _headline(config: dict[str, Any]) -> None:
    """``headline.attack`` must be one of the run's attacks, ``headline.eps`` one of its budgets (by value; the
    run's spelling is kept)."""
    attack, eps = config["headline"]["attack"], config["headline"]["eps"]
    if attack is not None and attack not in config["attacks"]:
        raise ConfigError(f"config key 'headline.attack' must be one of the attacks {config['attacks']}: {attack!r}")
    if eps is not None:
        same = [e for e in config["eps"] if parse_eps(e) == parse_eps(eps)]
        if not same:
            raise ConfigError(f"config key 'headline.eps' must be one of the run's eps {config['eps']}, got {eps!r}")
        config["headline"]["eps"] = same[0]


def _model_labels(config: dict[str, Any]) -> None:
    """A dataset spec with ``labels: model`` (data without labels) is labelled with the predictions of
    ``model.checkpoint``: the spec gets that model's settings, and a ``label`` saying where its labels come from."""
    for i, spec in enumerate(config["datasets"]):
        if spec.get("labels") != "model":
            continue
        if not config["model"]["checkpoint"]:
            raise ConfigError(f"config key 'datasets.{i}.labels' is 'model', which needs model.checkpoint")
        settings = {k: config["model"][k] for k in Labels.KEYS}
        settings["checkpoint"] = str(Path(settings["checkpoint"]).expanduser().resolve())
        spec["labels"] = settings
        spec.setdefault("label", f"{dataset_label(spec)} (labels: model predictions)")


# -- options checked against the callables that take them -------------------------------------------------------


def dataset_options(name: str) -> dict[str, Any]:
    """The keys a dataset spec named ``name`` takes, with their types: the generator's or loader's keyword
    arguments (a loader's file or folder as ``path``), ``label`` and ``labels``."""
    spec_keys: dict[str, Any] = {"name": str, "label": str, "labels": Labels}
    if name == MEMORY_DATASET:
        return {**spec_keys, "fingerprint": str}
    loader = synthetic if name in SYNTHETIC else LOADERS[name]
    params = list(inspect.signature(loader).parameters.values())
    options = _hints(loader, [p.name for p in params[1:] if p.kind is not p.VAR_KEYWORD and p.name != "name"])
    if any(p.kind is p.VAR_KEYWORD for p in params):
        options.update(_hints(FileDataset.__init__, FILE_DATASET_OPTIONS))
    if name not in SYNTHETIC:  # the loader's file or folder (load_dataset takes `path` or `root`)
        options["path"] = options["root"] = typing.get_type_hints(loader)[params[0].name]
    return {**options, **spec_keys}


def method_options(cls: type, options: Any, dotted: str) -> dict[str, Any]:
    """``options`` for the attack or detector class ``cls``: keyword arguments its constructor takes (besides what
    the run sets), of the annotated types, and accepted by the class itself (a trial construction, no work)."""
    hints = _constructor_hints(cls)
    accepted = {name: hint for name, hint in hints.items() if name not in METHOD_RESERVED}
    checked = _options(options, accepted, dotted)
    try:
        cls(nn.Identity(), **checked) if issubclass(cls, Attack) else cls(**checked)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {dotted!r} has options the {cls.__name__} class refuses: {exc}") from None
    return checked


def model_options(model: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    """``model.options``: the architecture's build options (typed by the class its factory returns) and training
    options the run does not set itself."""
    factory, build = ARCHITECTURES[model["arch"]]
    built = typing.get_type_hints(factory).get("return")
    typed = _constructor_hints(built) if isinstance(built, type) else {}
    names = {name: typed.get(name, Any) for name in build}
    names.update(_hints(train_model, ["normalization", "pretrained"]))
    names.update(_hints(train, list(inspect.signature(train).parameters)))
    return _options(model["options"], {k: v for k, v in names.items() if k not in MODEL_RESERVED}, dotted)


def _options(options: Any, accepted: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    if not isinstance(options, Mapping):
        raise ConfigError(f"config key {dotted!r} must be a mapping of options among {sorted(accepted)}")
    out = {}
    for name, value in options.items():
        if name not in accepted:
            where = f"{dotted}.{name}"
            raise ConfigError(f"unknown config key {where!r}; allowed: {sorted(accepted)}", where)
        budget = name == "step_size"  # an absolute step: a budget's forms and range
        conform(Budget if budget else accepted[name], value, f"{dotted}.{name}", {"gt": 0} if budget else {})
        out[name] = value  # checked, kept as written (it is part of the cells' keys)
    return out


def _constructor_hints(cls: type) -> dict[str, Any]:
    """Annotated keyword arguments of ``cls``'s constructor, following ``**kwargs`` up the class hierarchy."""
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        init = vars(klass)["__init__"]
        params = inspect.signature(init).parameters.values()
        names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        hints = {**_hints(init, names), **hints}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return hints


def _hints(function: Callable[..., Any], names: Sequence[str]) -> dict[str, Any]:
    """The annotation of each of ``names`` among ``function``'s parameters (Any where there is none)."""
    annotations = typing.get_type_hints(function)
    known = inspect.signature(function).parameters
    return {name: annotations.get(name, Any) for name in names if name in known}


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere inside ``value``."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


__all__ = ["CHOICES", "DEFAULTS", "QUICK", "RunConfig", "choices", "describe", "load_config", "validate"]
