"""Batch scoring: one model, any number of fitted detectors, one forward pass per batch for all of them.

:class:`Scorer` holds the model (an hfc-engine checkpoint, a TorchScript or an ONNX file, or a module) and the
detectors. Before the first batch it checks that the model is the one the detectors were fitted on (the
fingerprint they recorded) and that it can give what each detector needs (:meth:`Detector.needs`: pooled
features and raw maps of named layers, MC-dropout passes, input gradients), each failure one line saying what to
do. Per batch, one forward pass (onnxruntime for an ONNX export carrying the detectors' feature outputs, else
torch) gives the logits and every feature; only MAHA's input preprocessing (gradients) and BU's MC-dropout
heads run the model again, in torch (an ONNX export is converted to a differentiable torch module for that).

:func:`score_dataset` streams a dataset through a :class:`Scorer` into CSV or Parquet: one row per image (index,
label, prediction, logits, each detector's score and its flag at the threshold recorded for a clean
false-positive rate). Rows are written in parts as they finish; a killed job rerun with the same arguments
continues after the last finished part and produces the same file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import fx, nn
from tqdm.auto import tqdm

from engine.data import check_batch_size
from engine.detectors import Detector, FeatureCache, Features, Needs
from engine.export import DROPOUT_PREFIX, FEATURE_PREFIX, LOGITS_NAME, RAW_PREFIX, OnnxModel, export_onnx
from engine.models import dropout_modules, input_shape, load_model, model_fingerprint, pool_feature, resolve_layers

RUNTIMES = ("auto", "torch", "onnxruntime")
PART_ROWS = 4096  # rows per output part at least (a killed job loses at most one part)


@dataclass
class ScoreSummary:
    """What a scoring job did: rows written (``resumed`` of them by an earlier run), seconds (model and
    detectors, per detector), the runtime of the forward passes and the output file."""

    rows: int
    seconds: float
    model_seconds: float
    detector_seconds: float
    output: Path
    runtime: str = "torch"
    resumed: int = 0
    per_detector: dict[str, float] = field(default_factory=dict)

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
        raw = {name: out[self.raw[name]] for name in self.needs.raw}
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
    networks (DNN) run in onnxruntime too. ``names`` labels the detectors' columns
    (default: the detector kind, made unique). Raises ValueError, in one line, when a detector was fitted on
    another model (unless ``allow_model_mismatch``) or needs what the model cannot give.
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
        device: str = "cpu",
    ) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        check_batch_size(batch_size)
        if not detectors:
            raise ValueError("detectors: give at least one fitted detector")
        self.detectors = [d if isinstance(d, Detector) else Detector.load(d) for d in detectors]
        self.names = list(names) if names is not None else unique_names([d.name for d in self.detectors])
        if len(self.names) != len(self.detectors) or len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be {len(self.detectors)} distinct column names, got {self.names}")
        self.batch_size = batch_size
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
                raise ValueError(
                    f"detector {name} was fitted on model {fitted}, but {self.model.label} is model "
                    f"{self.model.fingerprint}: score with the model it was fitted on, or pass "
                    "allow_model_mismatch=True (--allow-model-mismatch)"
                )
            problem = self.model.missing(det.needs())
            if problem:
                raise ValueError(f"detector {name}: {problem}")

    def thresholds(self, fpr: float) -> dict[str, float]:
        """The recorded threshold for clean false-positive rate ``fpr`` of each detector that records thresholds
        (detectors saved before they were recorded have none; a warning names them), by column name."""
        pairs = list(zip(self.names, self.detectors, strict=True))
        unrecorded = [name for name, det in pairs if not det.thresholds_]
        if unrecorded:
            warnings.warn(f"detectors {unrecorded} record no thresholds: their rows get no flag", stacklevel=2)
        return {name: det.threshold(fpr) for name, det in pairs if det.thresholds_}

    def score(self, images: torch.Tensor, labels: np.ndarray | None = None) -> Batch:
        """Scores of one batch of (N, C, H, W) images in [0, 1]: one forward pass serves every detector."""
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
    if isinstance(model, (str, os.PathLike)) and _is_export(Path(model)):
        return _ExportModel(Path(model), label, runtime, batch_size, device)
    torch_model = _TorchModel(load_model(model), label, batch_size, device)
    if runtime != "onnxruntime":
        return torch_model
    shape = input_shape(torch_model.module)
    if shape is None:
        raise ValueError(f"runtime: onnxruntime needs {label}'s input size to export it; use runtime='torch'")
    path = export_onnx(torch_model.module, tmp / "model.onnx", input_shape=shape, detectors=detectors)
    return _ExportModel(path, label, runtime, batch_size, device, source=torch_model)


def _is_export(path: Path) -> bool:
    """An ONNX file written by ``hfc-engine export`` (its metadata names the producer)."""
    if path.suffix.lower() != ".onnx" or not path.is_file():
        return False
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(p.key == "producer" and p.value == "hfc-engine" for p in proto.metadata_props)


def converted_export(
    path: Path, raw_layers: Sequence[str] = (), batch_size: int = 128, device: str = "cpu"
) -> FeatureCache:
    """An ``hfc-engine export`` file converted to a differentiable torch module, as a :class:`FeatureCache` whose
    features are the file's feature outputs (raw maps kept for ``raw_layers``); its dropout layers
    (``dropout:<layer>`` outputs) are put back."""
    foreign, onnx_model = load_model(path), OnnxModel(path)
    graph, names = foreign.net, onnx_model.output_names
    _restore_dropout(graph, names, onnx_model.metadata.get("dropout", {}))

    def extract(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = dict(zip(names, graph(x), strict=True))
        feats = {n.removeprefix(FEATURE_PREFIX): v for n, v in out.items() if n.startswith(FEATURE_PREFIX)}
        feats.update({n.removeprefix(RAW_PREFIX): v for n, v in out.items() if n.startswith(RAW_PREFIX)})
        return out[LOGITS_NAME], feats

    module = _FirstOutput(graph, foreign.meta)
    return FeatureCache(module, raw_layers=raw_layers, batch_size=batch_size, device=device, extractor=extract)


class _FirstOutput(nn.Module):
    """A converted export's graph returning only its logits (its first output)."""

    def __init__(self, graph: fx.GraphModule, meta: Mapping[str, Any]) -> None:
        super().__init__()
        self.graph = graph
        self.meta = dict(meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)[0]


def _restore_dropout(graph: fx.GraphModule, names: Sequence[str], rates: Mapping[str, float]) -> None:
    """Insert ``nn.Dropout(rate)`` after the node behind each ``dropout:<layer>`` output, for its other users."""
    output = next(n for n in graph.graph.nodes if n.op == "output")
    for i, (name, node) in enumerate(zip(names, output.args[0], strict=True)):
        if not name.startswith(DROPOUT_PREFIX):
            continue
        target = f"restored_dropout{i}"
        graph.add_submodule(target, nn.Dropout(float(rates[name.removeprefix(DROPOUT_PREFIX)])))
        with graph.graph.inserting_after(node):
            drop = graph.graph.call_module(target, (node,))
        node.replace_all_uses_with(drop, delete_user_cb=lambda user, drop=drop: user not in (drop, output))
        if not drop.users:
            raise ValueError(f"{name}: nothing in the converted graph reads this dropout layer's output")
    graph.recompile()


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with repeats numbered: kd, kd_2, ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def find_detectors(path: str | os.PathLike[str]) -> list[Path]:
    """Fitted detector directories (holding config.json) at or under ``path``."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"detectors: {str(root)!r} does not exist")
    found = [root] if (root / "config.json").is_file() else sorted(p.parent for p in root.rglob("config.json"))
    if not found:
        raise ValueError(f"detectors: no fitted detector (a directory with config.json) under {str(root)!r}")
    return found


def column_names(directories: Sequence[Path]) -> list[str]:
    """Column names of saved detectors: the detector kind when it is unique among them, else the directory's
    label (an audit's ``<label>-<hash>/fitted`` gives the label: dataset, model, attack, eps, detector)."""
    kinds = [json.loads((d / "config.json").read_text())["detector"].lower() for d in directories]
    labels = [(d.parent if d.name == "fitted" else d).name.rsplit("-", 1)[0] for d in directories]
    return unique_names([k if kinds.count(k) == 1 else label for k, label in zip(kinds, labels, strict=True)])


def score_dataset(
    model_path: str | os.PathLike[str] | nn.Module,
    detector_paths: Sequence[str | os.PathLike[str]],
    dataset: torch.utils.data.Dataset,
    output: str | os.PathLike[str],
    batch_size: int = 128,
    progress: bool = True,
    *,
    fpr: float = 0.05,
    runtime: str = "auto",
    allow_model_mismatch: bool = False,
    device: str = "cpu",
) -> ScoreSummary:
    """Score every image of ``dataset`` (of (image, label) pairs) with the detectors saved at or under
    ``detector_paths``; write one row per image to ``output`` (.csv or .parquet), flagging scores above each
    detector's threshold for clean false-positive rate ``fpr``. Resumes an interrupted job with the same
    arguments (see :class:`Scorer` for the rest)."""
    output = Path(output)
    if output.suffix not in (".csv", ".parquet"):
        raise ValueError(f"output must end in .csv or .parquet, got {str(output)!r}")
    if len(dataset) == 0:
        raise ValueError("data is empty: no images to score")
    dirs = [d for p in detector_paths for d in find_detectors(p)]
    scorer = Scorer(
        model_path, dirs, names=column_names(dirs), batch_size=batch_size, runtime=runtime,
        allow_model_mismatch=allow_model_mismatch, device=device,
    )  # fmt: skip
    thresholds = scorer.thresholds(fpr)
    job = {
        "model": scorer.model.fingerprint,
        "detectors": [str(d.resolve()) for d in dirs],
        "columns": scorer.names,
        "images": len(dataset),
        "batch_size": batch_size,
        "fpr": fpr,
        "runtime": scorer.runtime,
    }
    parts = _Parts(output, job)
    resumed = parts.rows
    rest = torch.utils.data.Subset(dataset, range(resumed, len(dataset)))
    loader = torch.utils.data.DataLoader(rest, batch_size=batch_size, shuffle=False)
    start, n, pending = time.perf_counter(), resumed, []
    bar = tqdm(total=len(dataset), initial=resumed, desc="score", unit="image", disable=not progress)
    with bar:
        for images, labels in loader:
            batch = scorer.score(images.float(), labels.numpy())
            pending.append(_rows(batch, n, labels.numpy(), thresholds))
            n += len(labels)
            if sum(len(f) for f in pending) >= PART_ROWS:
                parts.write(pd.concat(pending, ignore_index=True))
                pending = []
            bar.update(len(labels))
    if pending:
        parts.write(pd.concat(pending, ignore_index=True))
    parts.finish()
    per_detector = {name: scorer.seconds[name] for name in scorer.names}
    return ScoreSummary(
        rows=n, seconds=time.perf_counter() - start, model_seconds=scorer.seconds["model"],
        detector_seconds=sum(per_detector.values()), output=output, runtime=scorer.runtime, resumed=resumed,
        per_detector=per_detector,
    )  # fmt: skip


def _rows(batch: Batch, first: int, labels: np.ndarray, thresholds: Mapping[str, float]) -> pd.DataFrame:
    """One row per image: index, label, prediction, logits, and per detector its score and flag (if thresholded)."""
    logits = batch.features.logits
    columns: dict[str, Any] = {"index": np.arange(first, first + len(logits)), "label": labels}
    columns["prediction"] = logits.argmax(1)
    columns.update({f"logit_{j}": logits[:, j] for j in range(logits.shape[1])})
    for name, scores in batch.scores.items():
        columns[f"score_{name}"] = np.asarray(scores, dtype=np.float64)
        if name in thresholds:
            columns[f"flag_{name}"] = columns[f"score_{name}"] > thresholds[name]
    return pd.DataFrame(columns)


class _Parts:
    """The rows of one scoring job as numbered Parquet parts in ``.<output name>.parts/`` (each written to a
    temporary file and renamed, so a killed job leaves only whole parts), joined into ``output`` at the end.
    ``job.json`` holds the job's settings: a rerun with the same settings continues after the parts present."""

    def __init__(self, output: Path, job: Mapping[str, Any]) -> None:
        self.output, self.dir = output, output.with_name(f".{output.name}.parts")
        self.paths: list[Path] = []
        if self.dir.exists():
            recorded = json.loads((self.dir / "job.json").read_text())
            if recorded != dict(job):
                raise ValueError(
                    f"output {str(output)!r} has an unfinished job with other settings in {self.dir}: rerun that "
                    "job, delete the directory or choose another output"
                )
            self.paths = sorted(self.dir.glob("part-*.parquet"))
        else:
            self.dir.mkdir(parents=True)
            (self.dir / "job.json").write_text(json.dumps(dict(job)))

    @property
    def rows(self) -> int:
        """Rows in the finished parts."""
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(p).num_rows for p in self.paths)

    def write(self, frame: pd.DataFrame) -> None:
        path = self.dir / f"part-{len(self.paths):06d}.parquet"
        tmp = path.with_suffix(".tmp")
        frame.to_parquet(tmp, index=False)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        self.paths.append(path)

    def finish(self) -> None:
        """Join the parts into the output (written to a temporary file, then renamed) and remove them."""
        import pyarrow.parquet as pq

        tmp = self.output.with_name(f".{self.output.name}.tmp")
        if self.output.suffix == ".csv":
            with open(tmp, "w", newline="") as fh:
                for i, path in enumerate(self.paths):
                    pq.read_table(path).to_pandas().to_csv(fh, header=i == 0, index=False)
        else:
            writer = None
            for path in self.paths:
                table = pq.read_table(path)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
            if writer is not None:
                writer.close()
        os.replace(tmp, self.output)
        shutil.rmtree(self.dir)
