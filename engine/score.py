"""Batch scoring: one model, any number of fitted detectors, one forward pass per batch for all of them.

:class:`Scorer` holds the model (an hfc-engine checkpoint, a TorchScript or an ONNX file, or a module) and the
detectors. Before the first batch it checks that the model is the one the detectors were fitted on (the
fingerprint they recorded), that it can give what each detector needs (:meth:`Detector.needs`: pooled features and
raw maps of named layers, MC-dropout passes, input gradients) and that the images have the size the detectors were
fitted on, each failure one line saying what to do. Per batch, one forward pass (onnxruntime for an ONNX export
carrying the detectors' feature outputs, else torch) gives the logits and every feature; only MAHA's input
preprocessing (gradients) and BU's MC-dropout heads run the model again, in torch (an ONNX export is converted to a
differentiable torch module for that, engine.export.converted_export).

:func:`score_dataset` streams a dataset through a :class:`Scorer` into CSV or Parquet: one row per image (index,
file path, label and prediction with their class names, logits, each detector's score and its flag at each
threshold asked for), and the thresholds with their realised clean false-positive rates beside it
(engine.detectors.thresholds). Rows are written in parts as they finish (engine.fileio.ResumableTable); a killed
job rerun with the same arguments continues after the last finished part and produces the same file, and a rerun
on other data or another model file is refused. :func:`calibrate` scores a site's own clean images and saves them
beside each detector as a new calibration, from which later thresholds are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from engine.data import ImageDataset, check_batch_size
from engine.detectors import FPRS, Detector, FeatureCache, Features, Needs, fitted_checkpoint
from engine.detectors.thresholds import LATEST, Threshold, check_fprs, reference, save_calibration
from engine.errors import UserError
from engine.export import (
    DROPOUT_PREFIX,
    FEATURE_PREFIX,
    LOGITS_NAME,
    RAW_PREFIX,
    OnnxModel,
    converted_export,
    export_onnx,
    is_export,
)
from engine.fileio import ResumableTable, atomic_write, file_sha256
from engine.models import (
    cap_raw_map,
    dropout_modules,
    input_shape,
    load_model,
    model_fingerprint,
    pool_feature,
    resolve_layers,
)
from engine.runs.catalog import locate

RUNTIMES = ("auto", "torch", "onnxruntime")
OUTPUT_SUFFIXES = (".csv", ".parquet")
PART_ROWS = 4096  # rows per output part at least (a killed job loses at most one part)


class ScoreError(UserError):
    """A scoring or calibration job refused before work: a model, detector, data set or output that does not fit."""


@dataclass
class ScoreSummary:
    """What a scoring job did: rows written (``resumed`` of them by an earlier run), seconds (model and
    detectors, per detector), the runtime of the forward passes, the output file, the thresholds its flags used
    and the file recording them."""

    rows: int
    seconds: float
    model_seconds: float
    detector_seconds: float
    output: Path
    runtime: str = "torch"
    resumed: int = 0
    per_detector: dict[str, float] = field(default_factory=dict)
    thresholds: list[Threshold] = field(default_factory=list)
    thresholds_file: Path | None = None

    @property
    def images_per_second(self) -> float:
        scored = self.rows - self.resumed
        return scored / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Batch:
    """One scored batch: its features (logits, ...) and each detector's (N,) scores by column name."""

    features: Features
    scores: dict[str, np.ndarray]


class _TorchModel:
    """A torch module (from a checkpoint, TorchScript, a foreign ONNX file or memory) as the scorer's model."""

    runtime = "torch"

    def __init__(self, model: nn.Module, label: str, batch_size: int, device: str) -> None:
        self.module, self.label, self.batch_size, self.device = model, label, batch_size, device
        self.fingerprint = model_fingerprint(model)
        self.classes: list[str] | None = getattr(model, "meta", {}).get("classes")
        self.input_size = input_shape(model)
        self.cache: FeatureCache | None = None

    def missing(self, needs: Needs) -> str | None:
        for name in needs.pooled + needs.raw:
            try:
                resolve_layers(self.module, [name])
            except ValueError:
                return f"needs layer {name!r}, which {self.label} does not have; its layers: " + ", ".join(
                    resolve_layers(self.module, "all")
                )
        if needs.dropout and not dropout_modules(self.module):
            return (
                f"needs MC-dropout passes but {self.label} has no dropout layer (a TorchScript or foreign ONNX model "
                "is converted without them): score with the hfc-engine checkpoint (.pt) or its ONNX export"
            )
        return None

    def prepare(self, needs: Needs) -> None:
        layers = list(dict.fromkeys(needs.pooled + needs.raw))
        self.cache = FeatureCache(
            self.module, layers=layers or None, raw_layers=needs.raw, batch_size=self.batch_size, device=self.device
        )

    def features(self, images: torch.Tensor, labels: np.ndarray | None) -> Features:
        return self.cache.extract(images, labels)

    def torch_source(self) -> FeatureCache:
        return self.cache


class _ExportModel:
    """An ONNX export with feature outputs (``hfc-engine export``): the forward pass in onnxruntime (or, with
    ``runtime="torch"``, in the file converted to torch); gradients and MC-dropout passes in torch: the model it
    was exported from when given (``source``), else the converted file, built on first use."""

    def __init__(self, path: Path, label: str, runtime: str, batch_size: int, device: str,
                 source: _TorchModel | None = None) -> None:  # fmt: skip
        self.onnx = OnnxModel(path)
        self.path, self.label, self.batch_size, self.device, self.source = path, label, batch_size, device, source
        self.runtime = "torch" if runtime == "torch" else "onnxruntime"
        shapes = {o.name: o.shape for o in self.onnx.session.get_outputs()}
        self.layers = [n.removeprefix(FEATURE_PREFIX) for n in shapes if n.startswith(FEATURE_PREFIX)]
        self.raw = {n: RAW_PREFIX + n for n in self.layers if RAW_PREFIX + n in shapes}  # layer -> its raw map
        self.raw.update({n: FEATURE_PREFIX + n for n in self.layers if len(shapes[FEATURE_PREFIX + n]) == 4})
        self.dropout = any(n.startswith(DROPOUT_PREFIX) for n in shapes)
        self.needs, self.outputs, self._converted = Needs(), [LOGITS_NAME], None
        self.classes: list[str] | None = self.onnx.metadata.get("classes")
        size = self.onnx.metadata.get("input_size")
        self.input_size = tuple(size) if isinstance(size, list) and len(size) == 3 else None
        self.fingerprint = source.fingerprint if source else self.onnx.metadata.get("fingerprint")
        if self.fingerprint is None:  # exported before fingerprints were recorded: the converted weights'
            self.fingerprint = model_fingerprint(self.torch_source().model)

    def missing(self, needs: Needs) -> str | None:
        for name, raw in [(n, False) for n in needs.pooled] + [(n, True) for n in needs.raw]:
            if name not in self.layers or (raw and name not in self.raw):  # a raw map serves pooled features too
                what = "raw map" if raw else "features"
                return (
                    f"needs the {what} of layer {name!r}, which {self.label} does not output: re-export it with "
                    f"`hfc-engine export --model <source model> --out {self.label} --detectors <detector dirs>` "
                    f"(or --layers {name}{' --raw-features' if raw else ''})"
                )
        if needs.dropout and not self.dropout and self.source is None:
            return (
                f"needs MC-dropout passes, which {self.label} cannot give (an ONNX export drops dropout layers): "
                f"re-export it with `hfc-engine export --model <source model> --out {self.label} --detectors "
                "<detector dirs>` (or --dropout)"
            )
        return None

    def prepare(self, needs: Needs) -> None:
        """Ask for the outputs ``needs`` uses only."""
        self.needs = needs
        if self.source is not None:
            self.source.prepare(needs)
        pooled = [FEATURE_PREFIX + n for n in needs.pooled]
        self.outputs = list(dict.fromkeys([LOGITS_NAME, *pooled, *(self.raw[n] for n in needs.raw)]))

    def features(self, images: torch.Tensor, labels: np.ndarray | None) -> Features:
        if self.runtime == "torch":
            return self.torch_source().extract(images, labels)
        out = {name: torch.from_numpy(v) for name, v in self.onnx.run(images, self.outputs).items()}
        raw = {name: cap_raw_map(out[self.raw[name]]) for name in self.needs.raw}
        return Features(
            logits=out[LOGITS_NAME].numpy(),
            pooled={n: pool_feature(out[FEATURE_PREFIX + n]).numpy() for n in self.needs.pooled},
            raw=raw,
            images=images,
            labels=labels,
        )

    def torch_source(self) -> FeatureCache:
        if self.source is not None:
            return self.source.cache
        if self._converted is None:
            self._converted = converted_export(self.path, self.needs.raw, self.batch_size, self.device)
        return self._converted


class Scorer:
    """The model once and fitted ``detectors`` (instances or saved directories): :meth:`score` a batch of images.

    ``model``: a module or a file :func:`engine.models.load_model` reads. ``runtime``: ``"auto"`` (onnxruntime
    for an ONNX export with feature outputs, torch otherwise), ``"torch"``, or ``"onnxruntime"`` (a torch model is
    exported to a temporary ONNX file with what the detectors need); except with ``"torch"``, detectors' own
    networks (DNN) run in onnxruntime too. ``names`` labels the detectors' columns (default: the detector kind,
    made unique). Raises ScoreError, in one line, when a detector was fitted on another model (unless
    ``allow_model_mismatch``) or needs what the model cannot give, and when images of another size than the
    detectors were fitted on are scored (unless ``allow_size_mismatch``).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | nn.Module,
        detectors: Sequence[Detector | str | os.PathLike[str]],
        *,
        names: Sequence[str] | None = None,
        batch_size: int = 128,
        runtime: str = "auto",
        allow_model_mismatch: bool = False,
        allow_size_mismatch: bool = False,
        device: str = "cpu",
    ) -> None:
        if runtime not in RUNTIMES:
            raise ScoreError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        check_batch_size(batch_size)
        if not detectors:
            raise ScoreError("detectors: give at least one fitted detector")
        self.directories = [None if isinstance(d, Detector) else Path(d) for d in detectors]
        self.detectors = [d if isinstance(d, Detector) else Detector.load(d) for d in detectors]
        self.names = list(names) if names is not None else unique_names([d.name for d in self.detectors])
        if len(self.names) != len(self.detectors) or len(set(self.names)) != len(self.names):
            raise ScoreError(f"names must be {len(self.detectors)} distinct column names, got {self.names}")
        self.batch_size, self.allow_size_mismatch = batch_size, allow_size_mismatch
        self.needs = Needs.union(d.needs() for d in self.detectors)
        self._tmp = tempfile.TemporaryDirectory(prefix="hfc-score-") if runtime == "onnxruntime" else None
        tmp = Path(self._tmp.name) if self._tmp else None  # where a torch model is exported for onnxruntime
        self.model = _open_model(model, self.detectors, runtime, batch_size, device, tmp)
        self._check(allow_model_mismatch)
        self.model.prepare(self.needs)
        for det in self.detectors:
            needs = det.needs()
            if needs.dropout or needs.gradients:
                det.attach(self.model.torch_source())
            if runtime != "torch":
                det.use_onnxruntime()
        self.seconds = {"model": 0.0, **{name: 0.0 for name in self.names}}

    @property
    def runtime(self) -> str:
        """The runtime of the shared forward pass: ``"torch"`` or ``"onnxruntime"``."""
        return self.model.runtime

    def _check(self, allow_model_mismatch: bool) -> None:
        for name, det in zip(self.names, self.detectors, strict=True):
            fitted = det.model_.get("fingerprint")
            if fitted is None:
                warnings.warn(
                    f"detector {name} records no model fingerprint; the model cannot be checked", stacklevel=3
                )
            elif fitted != self.model.fingerprint and not allow_model_mismatch:
                raise ScoreError(
                    f"detector {name} was fitted on model {fitted}, but {self.model.label} is model "
                    f"{self.model.fingerprint}: score with the model it was fitted on, or pass "
                    "allow_model_mismatch=True (--allow-model-mismatch)"
                )
            problem = self.model.missing(det.needs())
            if problem:
                raise ScoreError(f"detector {name}: {problem}")

    def fit_sizes(self) -> dict[str, tuple[int, ...]]:
        """The (C, H, W) of the images each detector was fitted on (else the model's recorded input size), by
        column name; detectors with neither are left out."""
        pairs = zip(self.names, self.detectors, strict=True)
        sizes = {name: det.input_size_ or self.model.input_size for name, det in pairs}
        return {name: tuple(size) for name, size in sizes.items() if size is not None}

    def check_images(self, shape: Sequence[int]) -> None:
        """Refuse (C, H, W) images of another size than the detectors were fitted on, unless allowed."""
        shape = tuple(int(s) for s in shape)
        other = {name: size for name, size in self.fit_sizes().items() if size != shape}
        if other and not self.allow_size_mismatch:
            size = next(iter(other.values()))
            resize = f"--image-size {size[1]}" if size[1] == size[2] else f"images resized to {size[1]}x{size[2]}"
            raise ScoreError(
                f"data: images are (C, H, W) = {shape}, but detectors {sorted(other)} were fitted on {size}: score "
                f"{resize}, or pass allow_size_mismatch=True (--allow-size-mismatch) to score them as they are"
            )

    def thresholds(self, fprs: Sequence[float], calibration: str = LATEST) -> list[Threshold]:
        """Each detector's threshold at each of ``fprs``, read from its clean scores ``calibration`` (see
        engine.detectors.thresholds.reference); detectors without any (fitted outside an audit) are left out and
        named in a warning, as is each threshold set on too few clean images."""
        fprs, found, unrecorded = check_fprs(fprs), [], []
        for name, det, directory in zip(self.names, self.detectors, self.directories, strict=True):
            clean = reference(det, directory, calibration)
            if clean is None:
                unrecorded.append(name)
                continue
            found += [clean.threshold(name, fpr) for fpr in fprs]
        if unrecorded:
            warnings.warn(f"detectors {unrecorded} record no thresholds: their rows get no flag", stacklevel=2)
        for threshold in found:
            if threshold.warning:
                warnings.warn(threshold.warning, stacklevel=2)
        return found

    def score(self, images: torch.Tensor, labels: np.ndarray | None = None) -> Batch:
        """Scores of one batch of (N, C, H, W) images in [0, 1]: one forward pass serves every detector."""
        self.check_images(images.shape[1:])
        start = time.perf_counter()
        features = self.model.features(images, labels)
        self.seconds["model"] += time.perf_counter() - start
        scores = {}
        for name, det in zip(self.names, self.detectors, strict=True):
            start = time.perf_counter()
            scores[name] = det.score(features)
            self.seconds[name] += time.perf_counter() - start
        return Batch(features, scores)


def _open_model(
    model: str | os.PathLike[str] | nn.Module,
    detectors: Sequence[Detector],
    runtime: str,
    batch_size: int,
    device: str,
    tmp: Path | None,
) -> _TorchModel | _ExportModel:
    label = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)) and is_export(model):
        return _ExportModel(Path(model), label, runtime, batch_size, device)
    torch_model = _TorchModel(load_model(model), label, batch_size, device)
    if runtime != "onnxruntime":
        return torch_model
    shape = input_shape(torch_model.module)
    if shape is None:
        raise ScoreError(f"runtime: onnxruntime needs {label}'s input size to export it; use runtime='torch'")
    path = export_onnx(torch_model.module, tmp / "model.onnx", input_shape=shape, detectors=detectors)
    return _ExportModel(path, label, runtime, batch_size, device, source=torch_model)


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with repeats numbered: kd, kd_2, ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def column_names(kinds: Sequence[str], keys: Sequence[str | None]) -> list[str]:
    """Column names of detectors of ``kinds`` with catalog ``keys`` (engine.runs.catalog.locate): the kind when
    it is unique among them, else the key (``/`` as ``_``) when it has one, numbered where still repeated."""
    pairs = zip(kinds, keys, strict=True)
    return unique_names([k if kinds.count(k) == 1 or key is None else key.replace("/", "_") for k, key in pairs])


def check_output(output: str | os.PathLike[str]) -> Path:
    """``output`` as a path where a .csv or .parquet file can be written; ScoreError, before any work, when it
    has another suffix, is an existing directory or lies where nothing can be written."""
    output = Path(output)
    if output.suffix not in OUTPUT_SUFFIXES or output.is_dir():
        what = "is an existing directory" if output.is_dir() else "has another suffix"
        raise ScoreError(f"out: {str(output)!r} {what}; give a file path ending in {' or '.join(OUTPUT_SUFFIXES)}")
    folder = next(p for p in output.absolute().parents if p.exists())  # the directory it would be created in
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ScoreError(f"out: {str(output)!r} cannot be written: {str(folder)!r} is not a writable directory")
    return output


def data_fingerprint(dataset: torch.utils.data.Dataset) -> str:
    """What ``dataset`` holds, as 16 hex digits: an engine dataset's fingerprint (class names, labels, and pixels or
    file names and bytes); for any other dataset a hash of its images and labels, read once."""
    if isinstance(dataset, ImageDataset):
        return dataset.fingerprint
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        image, label = dataset[i]
        digest.update(torch.as_tensor(image).numpy().tobytes() + str(int(label)).encode())
    return digest.hexdigest()[:16]


def _scorer(
    model: str | os.PathLike[str] | nn.Module | None, detector_paths: Sequence[str | os.PathLike[str]],
    select: str | None, **options: Any,
) -> Scorer:  # fmt: skip
    """A Scorer of the saved detectors ``detector_paths`` name (engine.runs.catalog.locate), their columns named by
    :func:`column_names`; ``model`` None: the model they were fitted on."""
    located = locate(detector_paths, select)
    dirs = [entry.path for entry in located]
    detectors = [Detector.load(d) for d in dirs]
    names = column_names([d.name for d in detectors], [entry.key for entry in located])
    return Scorer(model or fitted_checkpoint(dirs), dirs, names=names, **options)


def _check_data(scorer: Scorer, dataset: torch.utils.data.Dataset) -> None:
    """Refuse an empty data set, or images of another size than the detectors were fitted on, before work."""
    if len(dataset) == 0:
        raise ScoreError("data is empty: no images to score")
    scorer.check_images(dataset[0][0].shape)


def _batches(
    scorer: Scorer, dataset: torch.utils.data.Dataset, start: int, progress: bool, what: str
) -> Iterator[tuple[int, np.ndarray, Batch]]:
    """(first index, labels, scored batch) for the images of ``dataset`` from ``start`` on."""
    rest = torch.utils.data.Subset(dataset, range(start, len(dataset)))
    loader = torch.utils.data.DataLoader(rest, batch_size=scorer.batch_size, shuffle=False)
    with tqdm(total=len(dataset), initial=start, desc=what, unit="image", disable=not progress) as bar:
        for images, labels in loader:
            yield start, labels.numpy(), scorer.score(images.float(), labels.numpy())
            start += len(labels)
            bar.update(len(labels))


def score_dataset(
    model_path: str | os.PathLike[str] | nn.Module,
    detector_paths: Sequence[str | os.PathLike[str]],
    dataset: torch.utils.data.Dataset,
    output: str | os.PathLike[str],
    batch_size: int = 128,
    progress: bool = True,
    *,
    fpr: float | Sequence[float] = 0.05,
    calibration: str = LATEST,
    select: str | None = None,
    runtime: str = "auto",
    allow_model_mismatch: bool = False,
    allow_size_mismatch: bool = False,
    device: str = "cpu",
) -> ScoreSummary:
    """Score every image of ``dataset`` (of (image, label) pairs) with the detectors saved at or under
    ``detector_paths`` (or a run's, picked by ``select``: engine.runs.catalog.locate); write one row per image to
    ``output`` (.csv or .parquet), flagging scores above each detector's threshold for each clean false-positive
    rate ``fpr``, read from its clean scores ``calibration``; the thresholds go to ``<output stem>.thresholds.json``.
    Resumes an interrupted job with the same arguments and refuses one on other data or another model file (see
    :class:`Scorer` for the rest)."""
    output, fprs = check_output(output), check_fprs(fpr)
    scorer = _scorer(
        model_path, detector_paths, select, batch_size=batch_size, runtime=runtime,
        allow_model_mismatch=allow_model_mismatch, allow_size_mismatch=allow_size_mismatch, device=device,
    )  # fmt: skip
    _check_data(scorer, dataset)
    thresholds = scorer.thresholds(fprs, calibration)
    model_file = model_path if isinstance(model_path, (str, os.PathLike)) else None
    job = {
        "model_sha256": file_sha256(model_file) if model_file is not None else None,
        "model_fingerprint": scorer.model.fingerprint,
        "data_fingerprint": data_fingerprint(dataset),
        "images": len(dataset),
        "detectors": [str(d.resolve()) for d in scorer.directories],
        "columns": scorer.names,
        "batch_size": batch_size,
        "thresholds": [[t.detector, t.fpr, t.calibration] for t in thresholds],
        "runtime": scorer.runtime,
    }
    table = ResumableTable(output, job)
    resumed = table.rows
    start, pending, n = time.perf_counter(), [], resumed
    label_names = getattr(dataset, "classes", None)
    classes = scorer.model.classes or label_names  # the model's class names, else the data's
    paths = getattr(dataset, "paths", None)
    for first, labels, batch in _batches(scorer, dataset, resumed, progress, "score"):
        pending.append(_rows(batch, first, labels, thresholds, paths, label_names, classes))
        n += len(labels)
        if sum(len(f) for f in pending) >= PART_ROWS:
            table.write(pd.concat(pending, ignore_index=True))
            pending = []
    if pending:
        table.write(pd.concat(pending, ignore_index=True))
    record = {"model": job["model_sha256"] or job["model_fingerprint"], "data": job["data_fingerprint"],
              "thresholds": [t.record() for t in thresholds]}  # fmt: skip
    thresholds_file = atomic_write(
        output.with_suffix(".thresholds.json"), lambda tmp: tmp.write_text(json.dumps(record, indent=1))
    )
    table.finish()
    per_detector = {name: scorer.seconds[name] for name in scorer.names}
    return ScoreSummary(
        rows=n, seconds=time.perf_counter() - start, model_seconds=scorer.seconds["model"],
        detector_seconds=sum(per_detector.values()), output=output, runtime=scorer.runtime, resumed=resumed,
        per_detector=per_detector, thresholds=thresholds, thresholds_file=thresholds_file,
    )  # fmt: skip


def _rows(
    batch: Batch, first: int, labels: np.ndarray, thresholds: Sequence[Threshold], paths: Sequence[str] | None,
    label_names: Sequence[str] | None, classes: Sequence[str] | None,
) -> pd.DataFrame:  # fmt: skip
    """One row per image: index, path, label, prediction (with class names), logits, and per detector its score
    and its flag at each threshold."""
    logits = batch.features.logits
    index = np.arange(first, first + len(logits))
    columns: dict[str, Any] = {"index": index}
    if paths is not None:
        columns["path"] = [paths[i] for i in index]
    columns["label"] = labels
    if label_names is not None:
        columns["label_name"] = [label_names[k] for k in labels]
    columns["prediction"] = logits.argmax(1)
    if classes is not None and len(classes) == logits.shape[1]:
        columns["prediction_name"] = [classes[k] for k in columns["prediction"]]
    columns.update({f"logit_{j}": logits[:, j] for j in range(logits.shape[1])})
    for name, scores in batch.scores.items():
        columns[f"score_{name}"] = np.asarray(scores, dtype=np.float64)
        for t in (t for t in thresholds if t.detector == name):
            columns[f"flag_{name}@{t.fpr:g}"] = columns[f"score_{name}"] > t.value
    return pd.DataFrame(columns)


def calibrate(
    model: str | os.PathLike[str] | nn.Module | None,
    detector_paths: Sequence[str | os.PathLike[str]],
    dataset: torch.utils.data.Dataset,
    *,
    source: str,
    fpr: float | Sequence[float] = FPRS,
    select: str | None = None,
    batch_size: int = 128,
    progress: bool = True,
    runtime: str = "auto",
    allow_model_mismatch: bool = False,
    allow_size_mismatch: bool = False,
    device: str = "cpu",
) -> list[Threshold]:
    """Score the clean images of ``dataset`` (a site's own, e.g. after a scanner change) with the detectors saved
    at or under ``detector_paths`` and save their scores beside each as a new calibration recording ``source``
    (the data spec), the data's and the model's fingerprints and the date (engine.detectors.thresholds); returns
    the new thresholds at each rate ``fpr``. ``model`` None: the model the detectors were fitted on."""
    fprs = check_fprs(fpr)
    scorer = _scorer(
        model, detector_paths, select, batch_size=batch_size, runtime=runtime,
        allow_model_mismatch=allow_model_mismatch, allow_size_mismatch=allow_size_mismatch, device=device,
    )  # fmt: skip
    _check_data(scorer, dataset)
    scores: dict[str, list[np.ndarray]] = {name: [] for name in scorer.names}
    for _, _, batch in _batches(scorer, dataset, 0, progress, "calibrate"):
        for name, values in batch.scores.items():
            scores[name].append(np.asarray(values, dtype=np.float64))
    model_file = model if isinstance(model, (str, os.PathLike)) else None
    provenance = {
        "source": source, "data": data_fingerprint(dataset), "model": scorer.model.fingerprint,
        "model_sha256": file_sha256(model_file) if model_file is not None else None,
    }  # fmt: skip
    for name, directory in zip(scorer.names, scorer.directories, strict=True):
        save_calibration(directory, np.concatenate(scores[name]), **provenance)
    return scorer.thresholds(fprs, LATEST)
