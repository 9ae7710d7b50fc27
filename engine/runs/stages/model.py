"""The ``model`` stage (train or load the model, clean metrics) and the ``gmms`` stage (HFC's mixtures)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.attacks import fit_class_mixtures, fit_hfc_gmms, mixture_classes, save_hfc_gmms
from engine.data import as_tensors
from engine.errors import UserError
from engine.models import EARLY_STAGES, early_stages, evaluate, layer_shapes, resolve_layers
from engine.runs.cells import Cell, CellOutput, Payload, reads
from engine.runs.context import MEMORY, RunContext, train_key
from engine.runs.schema import Metric, dataset_label, fingerprint, row
from engine.runs.stages.data import DataInputs

EM_SECONDS = 3e-3  # sklearn EM over every hooked layer per dataset image (measured: 1-14 s per default-audit cell)
TRAINING_KEYS = ("arch", "width", "dropout", "epochs", "lr", "batch_size")  # model.* keys that shape training


def training_settings(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What determines a trained model: arch, build options and training hyper-parameters (cache key too)."""
    return {**{k: model_cfg[k] for k in TRAINING_KEYS}, **model_cfg.get("options", {})}


@dataclass(frozen=True, kw_only=True)
class ModelInputs(DataInputs):
    """The model of a dataset: its settings (a ``models`` entry merged over ``model``; a model file as a
    reference to what it holds) and the row names."""

    dataset_label: str
    model_label: str
    model: dict[str, Any] = reads("model")


@dataclass(frozen=True, kw_only=True)
class ModelPayload(Payload):
    """The model's checkpoint reference, its classes, its clean test metrics and, for an imported model file, how
    it was converted."""

    checkpoint: str
    classes: list[str]
    metrics: dict[str, float]
    conversion: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class OnModel(DataInputs):
    """Inputs of a cell that runs the model of its ``model_cell`` (every stage after ``model``)."""

    dataset_label: str
    model_label: str
    model_cell: str


@dataclass(frozen=True, kw_only=True)
class GmmsInputs(OnModel):
    """HFC's mixtures: which layers, how many components, how they are fitted."""

    layers: str | list[str] = reads("hfc.layers")
    max_channels: int | None = reads("hfc.max_channels")
    n_components: int = reads("hfc.n_components")
    reg_covar: float = reads("hfc.reg_covar")
    fit: dict[str, Any] = reads("hfc.fit")


@dataclass(frozen=True, kw_only=True)
class GmmsPayload(Payload):
    """Where the mixtures are, and the layers they cover (the layers HFC constrains)."""

    directory: str
    layers: list[str]


def run_model(ctx: RunContext, inputs: ModelInputs, deps: Mapping[str, Any]) -> CellOutput:
    """Train the model on the dataset's train split (or take the given checkpoint) and report clean test metrics."""
    spec, cfg, seed = inputs.dataset, inputs.model, inputs.seed
    splits = ctx.splits(spec, inputs.split, seed)
    if not cfg["checkpoint"]:
        checkpoint = ctx.trained(splits, training_settings(cfg), seed)
    elif str(cfg["checkpoint"]).startswith(MEMORY):
        checkpoint = cfg["checkpoint"]
    else:
        checkpoint = ctx.user_model(cfg, inputs.model_label, tuple(splits.dataset[0][0].shape))
    model = ctx.model(checkpoint)
    metrics = {k: v for k, v in evaluate(model, splits.test).items() if _is_number(v)}
    base = {"dataset": dataset_label(spec), "model": inputs.model_label}
    rows = [row(f"clean_{k}", v, **base) for k, v in metrics.items()]
    conversion = getattr(model, "meta", {}).get("conversion")
    if conversion:  # an imported model file: how it was converted and how close it is to its reference runtime
        rows += [row(Metric.CONVERSION_MAX_ABS_DIFF, conversion["max_abs_diff"], **base),
                 row(Metric.CONVERSION_GRADIENT_REL_ERROR, conversion["gradient_rel_error"], **base)]  # fmt: skip
    payload = ModelPayload(
        checkpoint=checkpoint, classes=list(splits.train.classes), metrics=metrics, conversion=conversion or None
    )
    return CellOutput(payload, rows)


def constrained_layers(model: nn.Module, inputs: GmmsInputs, input_shape: Sequence[int]) -> list[str]:
    """The layers HFC constrains: ``hfc.layers`` (names, globs, ``activations`` or ``early_stages``), keeping those
    of at most ``hfc.max_channels`` channels when set (the reference's width rule)."""
    layers = inputs.layers
    if layers == EARLY_STAGES:
        layers = early_stages(model, resolve_layers(model, "activations"), input_shape)
    layers = resolve_layers(model, layers)
    if inputs.max_channels is not None:
        shapes = layer_shapes(model, layers, input_shape)
        layers = [name for name in layers if shapes[name][0] <= inputs.max_channels]
    if not layers:
        raise UserError(
            f"no layer left for HFC to constrain: hfc.layers {inputs.layers!r} with hfc.max_channels "
            f"{inputs.max_channels} (raise it or choose other layers)"
        )
    return layers


def run_gmms(ctx: RunContext, inputs: GmmsInputs, deps: Mapping[str, Any]) -> CellOutput:
    """Fit the per-(layer, class) mixtures of HFC on training features (``hfc.fit``: sklearn's Bayesian or plain
    mixture, its n_init and max_iter, and augmented copies of the training images). Without augmentation the
    features come from the run context's shared pass over the training images, which the detectors read too."""
    checkpoint = ModelPayload(**deps[inputs.model_cell]).checkpoint
    model, splits, fit = ctx.model(checkpoint), ctx.splits(inputs.dataset, inputs.split, inputs.seed), inputs.fit
    layers = constrained_layers(model, inputs, tuple(splits.dataset[0][0].shape))
    options = {"n_components": inputs.n_components, "bayesian": fit["bayesian"], "seed": inputs.seed,
               "reg_covar": inputs.reg_covar, "n_init": fit["n_init"], "max_iter": fit["max_iter"]}  # fmt: skip
    if fit["augment"]:
        gmms = fit_hfc_gmms(model, splits.train, layers, augment=fit["augment"], **options)
    else:
        x, y = as_tensors(splits.train, name="the training split")
        found = ctx.features(checkpoint, train_key(inputs, len(x)), x, y, layers, keep_images=False)
        feats = {name: torch.from_numpy(found.pooled[name]) for name in layers}
        num_classes = mixture_classes(found.logits.shape[1])
        gmms = fit_class_mixtures(feats, y, num_classes, classes=splits.train.classes, **options)
    label = f"{dataset_label(inputs.dataset)}-{inputs.model_label}"
    directory = save_hfc_gmms(gmms, ctx.artifacts.directory("gmms", label, fingerprint(inputs.to_json())))
    return CellOutput(GmmsPayload(directory=ctx.artifacts.ref(directory), layers=list(gmms)))


def model_cost(cell: Cell, machine: Any) -> tuple[str, float]:
    """Training: 3x forward FLOPs per training image per epoch, plus the validation and test passes (the data
    loading is the ``data`` cell's)."""
    cfg, n = ModelInputs(**cell.inputs).model, cell.hint["n"]
    flops = machine.model_flops(**cell.hint["model"])
    epochs = 0 if cfg["checkpoint"] else cfg["epochs"]
    return "model", machine.seconds((epochs * (3 * 0.7 + 0.15) + 0.3) * n * flops)


def gmms_cost(cell: Cell, machine: Any) -> tuple[str, float]:
    """One feature pass over the training split (and its augmented copies), plus sklearn's EM per (layer, class) on
    those features, once per ``n_init``."""
    fit = GmmsInputs(**cell.inputs).fit
    images = 0.7 * cell.hint["n"] * (1 + fit["augment"])
    flops = machine.model_flops(**cell.hint["model"])
    return "gmms", machine.seconds(images * flops) + EM_SECONDS * images * fit["n_init"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
