"""The ``detect`` stage: fit a detector on plain AEs, score plain and HFC AEs of the same images (the HFC paper's
protocol, with a paired comparison).

Features are extracted once per process and image set (one forward pass per batch for every hooked layer) and
memoised in the run context, so the seven detectors of one (attack, eps) share them. Data too small for the protocol
(``TooFewExamples``: e.g. a model that resists the budget leaves no successful AE) makes the cell a
``not_measurable`` row, not an error.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.data import as_tensors
from engine.detectors import DETECTORS, Detector, FeatureCache, Features, TooFewExamples, run_protocol
from engine.models import CONSTRAINED, STAGE_OUTPUTS, resolve_layers, spatial_layers, stage_outputs
from engine.runs.artifacts import save_scores
from engine.runs.cells import Cell, CellOutput, Payload, reads
from engine.runs.context import RunContext, noise_images, noise_key, pool_key, train_key
from engine.runs.schema import Metric, Subset, fingerprint, row
from engine.runs.stages.attack import HFC_SET, PLAIN, AttackPayload, set_identity
from engine.runs.stages.model import GmmsPayload, ModelPayload, OnModel

PAIRED_METRICS = (Metric.AUROC, Metric.TPR_AT_TNR90)
log = logging.getLogger("engine.runs")


@dataclass(frozen=True, kw_only=True)
class DetectInputs(OnModel):
    """One detector on one layer arm at one (attack, eps): fitted on the plain set of ``plain_cell``, scoring it and
    the other ``sets`` (set name -> attack cell)."""

    attack: str
    eps: str | None
    detector: str
    arm: str | None  # the layer arm's name (None: the one unnamed arm)
    layers: Any  # the arm's selections: detector.arms.<arm>.layers / raw_layers, else detector.layers / raw_layers
    raw_layers: Any
    noise_eps: str  # the noise control's budget (engine.runs.plan.noise_budget)
    label: str
    plain_cell: str
    sets: dict[str, str]
    gmms_cell: str | None  # HFC's mixtures: the layers HFC constrains, typicality's reference
    train_features: bool = False  # the detector class requires training features (Requirements.training_features)
    pool: int | None = reads("attack.pool")
    fit_fraction: float = reads("detector.fit_fraction")
    bootstrap: int = reads("detector.bootstrap")
    noise: str = reads("detector.noise")
    options: dict[str, Any] = reads("detector.{detector}", absent={})
    train_limit: int | None = reads("detector.train_limit", when="train_features")


@dataclass(frozen=True, kw_only=True)
class DetectPayload(Payload):
    """Where the detector's scores are, and the fitted detector (what engine.runs.catalog finds)."""

    directory: str
    fitted: str


@dataclass(frozen=True, kw_only=True)
class Skipped(Payload):
    """A detector that cannot run on this model and run, and why (a report note, not an error)."""

    skipped: str


@dataclass(frozen=True, kw_only=True)
class NotMeasurable(Payload):
    """A detect or features cell whose data is too small to measure (e.g. a model that resists the budget leaves
    no successful AE to fit on): why, and the successful AEs there were (a result, not an error)."""

    not_measurable: str
    successful: int


def feature_layers(
    model: nn.Module, inputs: DetectInputs, input_shape: Sequence[int], constrained: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """(pooled layers, raw-map layers) of the detectors: the arm's ``layers``, and ``raw_layers`` (patterns; a
    count: the deepest of those layers; null: all of them), keeping those whose outputs are spatial maps (a dense
    head's activations are pooled features only); ``constrained`` stands for the layers HFC constrains."""
    resolve = lambda sel: resolve_layers(model, list(constrained) if sel == CONSTRAINED else sel)  # noqa: E731
    layers = resolve(inputs.layers)
    raw = inputs.raw_layers
    if isinstance(raw, (str, list)):
        return layers, spatial_layers(model, resolve(raw), input_shape)
    maps = spatial_layers(model, layers, input_shape)
    return layers, maps if raw is None else (maps[len(maps) - raw :] if raw > 0 else [])


class _Source:
    """The features a detect cell reads: from the run context's shared pass per image set (RunContext.features:
    every arm and stage reading a set shares it); a detector that needs raw maps (DNN) gets them from that pass
    for itself, released with its cell (raw maps of a 224 px model are large: engine.models.cap_raw_map).
    ``cache`` hooks the arm's own layers: the detectors' source."""

    def __init__(
        self, ctx: RunContext, checkpoint: str, inputs: DetectInputs, shape: Sequence[int], constrained: Sequence[str]
    ) -> None:
        model = ctx.model(checkpoint)
        self.layers, raw_layers = feature_layers(model, inputs, shape, constrained)
        self.raw_layers = raw_layers if DETECTORS[inputs.detector].requires.raw_maps else []
        self.ctx, self.checkpoint = ctx, checkpoint
        self.cache = ctx.feature_cache(checkpoint, self.layers)

    def features(self, key: Sequence[Any], x: torch.Tensor, y: torch.Tensor, keep_images: bool = True) -> Features:
        return self.ctx.features(self.checkpoint, key, x, y, self.layers, keep_images, self.raw_layers)


def _train_sample(train: Any, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``limit`` training images, a seeded random subset in index order."""
    index = np.arange(len(train))
    if len(train) > limit:
        index = np.sort(np.random.default_rng(seed).choice(len(train), limit, replace=False))
    return as_tensors(torch.utils.data.Subset(train, index.tolist()), name="the training split")


def make_detector(name: str, options: Mapping[str, Any], seed: int, model: nn.Module, cache: FeatureCache,
                  input_shape: Sequence[int]) -> Detector:  # fmt: skip
    """Detector ``name`` with its ``detector.<name>`` options; ``layers: stage_outputs`` becomes the deepest
    extracted layer at each spatial resolution."""
    options = dict(options)
    if options.get("layers") == STAGE_OUTPUTS:
        options["layers"] = stage_outputs(model, cache.extractor.layers, input_shape)
    return DETECTORS[name](seed=seed, **options)


def run_detect(ctx: RunContext, inputs: DetectInputs, deps: Mapping[str, Any]) -> CellOutput:
    """Fit one detector on plain AEs (``fit_fraction`` of the pool) and score plain and HFC AEs on the rest. A cell
    whose fit reads the same layers of the same sets as an earlier cell of this process (another layer arm, e.g.
    DNN's raw maps when both arms' spatial layers are the same) is that fit: its detector and scores are reused."""
    checkpoint = ModelPayload(**deps[inputs.model_cell]).checkpoint
    model, cls = ctx.model(checkpoint), DETECTORS[inputs.detector]
    reason = cls.unmet(model, mixtures=inputs.gmms_cell is not None)
    if reason:
        log.warning("%s %s: %s skipped: %s", inputs.dataset_label, inputs.model_label, inputs.detector, reason)
        return CellOutput(Skipped(skipped=reason))
    x, y = ctx.pool(inputs.dataset, inputs.split, inputs.seed, inputs.pool)
    gmms = GmmsPayload(**deps[inputs.gmms_cell]) if inputs.gmms_cell else None
    source = _Source(ctx, checkpoint, inputs, tuple(x.shape[1:]), gmms.layers if gmms else [])
    detector = make_detector(inputs.detector, inputs.options, inputs.seed, model, source.cache, tuple(x.shape[1:]))
    base = {"attack": inputs.attack, "eps": inputs.eps, "detector": inputs.detector, "arm": inputs.arm}
    base.update(dataset=inputs.dataset_label, model=inputs.model_label)
    fit = ctx.memo(("detect fit", checkpoint, _fit_identity(inputs, detector, source)), dict)
    if fit:
        log.info("%s: reads the same layers of the same sets as %s: its fit is reused", inputs.label, fit["label"])
    else:
        fit.update(label=inputs.label, **_fit(ctx, inputs, deps, detector, source, (x, y), gmms))
    if "not_measurable" in fit:
        reason, successful = fit["not_measurable"], fit["successful"]
        log.warning("%s: not measurable: %s", inputs.label, reason)
        not_measurable = row(Metric.NOT_MEASURABLE, successful, n_pos=successful, hfc=False, variant="", **base)
        return CellOutput(NotMeasurable(not_measurable=reason, successful=successful), [not_measurable])
    directory = ctx.artifacts.directory("detectors", inputs.label, fingerprint(inputs.to_json()))
    if "detector" in fit:  # fitted here: saved, and then only its directory is kept (a later cell copies it)
        fit.pop("detector").save(directory / "fitted", model=model, checkpoint=ctx.artifacts.path(checkpoint))
        save_scores(directory, fit.pop("scores"))
        fit["directory"] = directory
    else:
        shutil.copytree(fit["directory"], directory, dirs_exist_ok=True)
    rows = [row(**r, **base) for r in fit["rows"]]
    payload = DetectPayload(directory=ctx.artifacts.ref(directory), fitted=ctx.artifacts.ref(directory / "fitted"))
    return CellOutput(payload, rows)


def _fit_identity(inputs: DetectInputs, detector: Detector, source: _Source) -> str:
    """What a detect cell's fit depends on: its inputs but the arm (its name, label and layer selections), and the
    extracted layers the detector reads (Detector.reads)."""
    identity = {k: v for k, v in inputs.to_json().items() if k not in ("arm", "label", "layers", "raw_layers")}
    return fingerprint({**identity, "reads": detector.reads(source.layers, source.raw_layers)})


def _fit(
    ctx: RunContext, inputs: DetectInputs, deps: Mapping[str, Any], detector: Detector, source: _Source,
    pool: tuple[torch.Tensor, torch.Tensor], gmms: GmmsPayload | None,
) -> dict[str, Any]:  # fmt: skip
    """Run the protocol on the ``pool`` (images, labels): the fitted ``detector`` (thresholds set on the evaluation
    split's clean images), its scores and detection rows; or why it is not measurable (``TooFewExamples``: too few
    successful AEs or clean images, a result) and the successful AEs there were."""
    (x, y), spec, split, seed = pool, inputs.dataset, inputs.split, inputs.seed
    clean = source.features(("clean", pool_key(inputs)), x, y)
    noise = source.features(noise_key(inputs), noise_images(inputs, x), y)
    plain, plain_success = _adversarial_features(ctx, source, AttackPayload(**deps[inputs.plain_cell]).directory, y)
    transfer = {
        name: _adversarial_features(ctx, source, AttackPayload(**deps[key]).directory, y)
        for name, key in inputs.sets.items()
    }
    train = None
    if inputs.train_features:  # a class-conditional detector: labelled clean training images
        train_x, train_y = _train_sample(ctx.splits(spec, split, seed).train, inputs.train_limit, seed)
        train = source.features(train_key(inputs, len(train_x)), train_x, train_y, keep_images=False)
    if detector.requires.mixtures:  # HFC's mixtures, clean validation images as the reference
        val_x, val_y = as_tensors(ctx.splits(spec, split, seed).val, name="the validation split")
        reference = source.features(("val", pool_key(inputs)), val_x, val_y)
        detector.set_reference(ctx.artifacts.gmms(gmms.directory), reference)
    protocol = {"fit_fraction": inputs.fit_fraction, "seed": seed, "n_boot": inputs.bootstrap}
    try:
        result = run_protocol(
            [detector], clean, plain, plain_success, noise=noise, labels=y.numpy(), source=source.cache,
            transfer=transfer, train=train, attack_name=PLAIN, **protocol,
        )  # fmt: skip
    except TooFewExamples as exc:
        pool_size = inputs.pool or "the whole test split"
        return {
            "not_measurable": f"{exc} (a pool of {len(x)} test images; attack.pool: {pool_size})",
            "successful": int((plain_success & (clean.preds == y.numpy())).sum()),
        }
    scores = result.scores[detector.name]
    detector.set_thresholds(scores.negatives[:, 0])  # clean images of the evaluation split: flags at FPRS
    return {"detector": detector, "scores": scores, "rows": detection_rows(result.to_rows())}


def detection_rows(protocol_rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The columns of the result rows of the protocol's rows: each metric with its ``subset`` (the set's own
    successful, failed or all AEs) and its counts; the paired comparison of plain and each other set (auroc and TPR
    at 90% TNR) in subset ``paired`` for both sets and ``change`` (that set minus plain, on its row; the plain side
    only for the pair with the HFC set, so each row is unique). Each set's rows carry its ``hfc`` and ``variant``
    columns (:func:`engine.runs.stages.attack.set_identity`)."""
    out = []
    for r in protocol_rows:
        subset = Subset(r["subset"])
        if subset in (Subset.PAIRED, Subset.CHANGE) and r["metric"] not in PAIRED_METRICS:
            continue
        if subset == Subset.PAIRED and r["attack"] == PLAIN and r["versus"] != HFC_SET:
            continue  # the plain side of another pair: that set's paired value minus its change
        hfc, variant = set_identity(r["attack"])
        values = {k: r[k] for k in ("metric", "value", "ci_low", "ci_high", "n_neg", "n_pos")}
        out.append({"hfc": hfc, "variant": variant, "subset": subset, **values})
    return out


def _adversarial_features(ctx: RunContext, source: _Source, ref: str, y: torch.Tensor) -> tuple[Features, np.ndarray]:
    adversarial = ctx.artifacts.adversarial(ref)
    return source.features(("adversarial", ref), adversarial.images, y), adversarial.success


def detect_cost(cell: Cell, machine: Any) -> tuple[str, float]:
    """Feature passes over the pool's sets plus the detector's own work and model passes (its class's
    :class:`engine.detectors.Cost`)."""
    name, pool = DetectInputs(**cell.inputs).detector, cell.hint["pool"]
    cost = DETECTORS[name].cost
    model_s = machine.seconds(pool * machine.model_flops(**cell.hint["model"]) * cost.model_passes)
    return f"detect/{name}", model_s + pool * cost.seconds_per_image
