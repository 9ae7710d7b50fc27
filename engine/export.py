"""ONNX export (logits, optionally hooked features as extra outputs) verified with onnxruntime, and batch inference.

``export_onnx`` traces the model with a dynamic batch axis, then runs the file in onnxruntime on real inputs
(two batch sizes) and raises if any logit differs from PyTorch by more than ``atol`` (1e-4) -- the file is only
moved into place after it passed. Exporters: ``"torchscript"`` (default: torch.onnx's tracing exporter, fast and
offline) or ``"dynamo"`` (torch.export-based, needs onnxscript; slower). Both pass the parity check on the
models here; the tracing exporter is the default because it takes ~0.5 s instead of several seconds.

Fitted detectors say what they need (:meth:`engine.detectors.Detector.needs`); ``export_onnx(...,
detectors=[...])`` adds it: pooled features and raw maps of their layers, and for MC-dropout detectors (BU) an
output marking each dropout layer's input (``dropout:<layer>``, its rate in the metadata) so the converted graph
can get its dropout back. The metadata carries the source model's fingerprint, which detectors fitted on that model
recorded.

An export is read back by :class:`OnnxModel` (onnxruntime) and by :func:`converted_export` (a differentiable torch
module, for gradients and MC-dropout passes: the graph converted by engine.models.onnx, its dropout put back);
:func:`is_export` tells an export from a foreign ONNX file.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from engine.data import iter_batches
from engine.detectors import Detector, FeatureCache, Needs
from engine.errors import UserError, UserTypeError
from engine.models import (
    FeatureExtractor,
    ImageClassifier,
    backbone,
    load_model,
    model_fingerprint,
    pool_feature,
    resolve_layers,
)
from engine.models.onnx import FirstOutput, restore_dropout

EXPORTERS = ("torchscript", "dynamo")
INPUT_NAME = "input"
LOGITS_NAME = "logits"
FEATURE_PREFIX = "feature:"  # output name of hooked layer L: "feature:L"
RAW_PREFIX = "raw:"  # output name of the raw map of a raw_layers layer L (beside its pooled "feature:L")
DROPOUT_PREFIX = "dropout:"  # output name of dropout layer L's input (= its eval-mode output): "dropout:L"


class _Outputs(nn.Module):
    """Flattens ``FeatureExtractor`` output (raw maps) to a tuple (logits, output_1, ...) for export: one output
    per (layer, keep the raw map) of ``outputs``, pooled unless kept raw."""

    def __init__(self, extractor: FeatureExtractor, outputs: list[tuple[str, bool]]) -> None:
        super().__init__()
        self.extractor = extractor
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, feats = self.extractor(x)
        return (logits, *(feats[name] if raw else pool_feature(feats[name]) for name, raw in self.outputs))


def _patterns(layers: str | Sequence[str] | None) -> list[str]:
    return [] if layers is None else [layers] if isinstance(layers, str) else list(layers)


def dropout_layers(model: nn.Module) -> dict[str, float]:
    """Dropout layers of ``model`` by module name (relative to its backbone) and their rates."""
    return {
        name: float(m.p) for name, m in backbone(model).named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)
    }


def _example_inputs(model: nn.Module, example: Any, input_shape: Sequence[int] | None) -> torch.Tensor:
    if example is not None:
        batches = iter_batches(example, 8, name="example")
        x = next(batches, None)
        if x is None:
            raise UserError("example must hold at least one image")
        return x
    if input_shape is None and isinstance(model, ImageClassifier) and "input_size" in model.config:
        size = int(model.config["input_size"])
        input_shape = (int(model.config.get("in_channels", 3)), size, size)
    if input_shape is None or len(input_shape) != 3:
        raise UserError(f"input_shape must be (C, H, W) when no example inputs are given, got {input_shape!r}")
    return torch.rand(4, *input_shape, generator=torch.Generator().manual_seed(0))


def _metadata(model: nn.Module, layers: list[str], raw: list[str], dropout: dict[str, float]) -> dict[str, str]:
    meta = {"producer": "hfc-engine", "layers": json.dumps(layers), "fingerprint": json.dumps(model_fingerprint(model))}
    meta.update({"raw_layers": json.dumps(raw)} if raw else {})
    meta.update({"dropout": json.dumps(dropout)} if dropout else {})
    if isinstance(model, ImageClassifier):
        meta["config"] = json.dumps(model.config)
        extra = getattr(model, "meta", {}) or {}
        meta.update({k: json.dumps(extra[k]) for k in ("classes", "input_size", "dataset") if k in extra})
    return meta


def export_onnx(
    model: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    *,
    example: Dataset | np.ndarray | torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    layers: str | Sequence[str] | None = None,
    pooled: bool = True,
    raw_layers: str | Sequence[str] | None = None,
    dropout: bool = False,
    detectors: Sequence[Detector] = (),
    opset: int = 18,
    atol: float = 1e-4,
    exporter: str = "torchscript",
) -> Path:
    """Export ``model`` (module or any file :func:`load_model` reads) to ONNX at ``path`` and verify it.

    Outputs: ``logits`` (N,K), then one output per hooked layer (named ``feature:<layer>``): pooled (N,C) for
    ``layers`` and ``raw_layers`` (names/globs, see FeatureExtractor), raw maps with ``pooled=False``; then the raw
    map of each ``raw_layers`` layer as ``raw:<layer>`` (pooled in the graph too: ONNX Runtime pools faster);
    with ``dropout`` one ``dropout:<layer>`` output per dropout layer (for MC-dropout passes on the converted
    graph). ``detectors`` (fitted) add what they need (:meth:`Detector.needs`). The batch axis is dynamic.
    ``example`` supplies real verification inputs (up to 8 images are used); without it, uniform [0,1] images of
    ``input_shape`` (C,H,W) -- or the model's recorded input size -- are used. Raises RuntimeError when
    onnxruntime's logits differ from PyTorch's by more than ``atol``.
    """
    if exporter not in EXPORTERS:
        raise UserError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    model = load_model(model)
    needs = Needs.union(d.needs() for d in detectors)
    requested = [*_patterns(layers), *needs.pooled, *_patterns(raw_layers), *needs.raw]
    dropout = dropout or needs.dropout
    if isinstance(model, torch.jit.ScriptModule) and (requested or dropout):
        raise UserTypeError("layers cannot be hooked on a TorchScript model; pass the nn.Module")
    feature_layers = resolve_layers(model, requested) if requested else []
    raw_patterns = [*_patterns(raw_layers), *needs.raw]
    raw = set(resolve_layers(model, raw_patterns) if raw_patterns else [])
    drops = dropout_layers(model) if dropout else {}
    if dropout and not drops:
        raise UserError("dropout: the model has no dropout layer (BU needs one: build it with dropout > 0)")
    outputs = [(FEATURE_PREFIX + n, n, not pooled) for n in feature_layers]
    outputs += [(RAW_PREFIX + n, n, True) for n in feature_layers if n in raw and pooled]
    outputs += [(DROPOUT_PREFIX + n, n, True) for n in drops]
    x = _example_inputs(model, example, input_shape)
    was_training = model.training
    model.eval()
    hooks = list(dict.fromkeys(n for _, n, _ in outputs))
    extractor = FeatureExtractor(model, hooks, pooled=False) if hooks else None
    try:
        wrapped = _Outputs(extractor, [(n, keep) for _, n, keep in outputs]) if extractor is not None else model
        names = [LOGITS_NAME] + [name for name, _, _ in outputs]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.onnx")
        try:
            wrapped.eval()
            with torch.no_grad():
                expected = wrapped(x)
            expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
            _run_exporter(wrapped, x, tmp, names, opset, exporter)
            _attach_metadata(tmp, _metadata(model, feature_layers, [n for n in feature_layers if n in raw], drops))
            _verify(tmp, x, [e.numpy() for e in expected], names, atol)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        if extractor is not None:
            extractor.remove()
        model.train(was_training)
    return path


def _run_exporter(module: nn.Module, x: torch.Tensor, path: Path, names: list[str], opset: int, exporter: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if exporter == "torchscript":
            axes = {name: {0: "batch"} for name in [INPUT_NAME, *names]}
            torch.onnx.export(
                module,
                (x,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=names,
                opset_version=opset,
                dynamic_axes=axes,
                dynamo=False,
            )
        else:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(
                module,
                (x,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=names,
                opset_version=opset,
                dynamic_shapes=({0: batch},),
                dynamo=True,
                external_data=False,
                verbose=False,
            )


def _attach_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def _verify(path: Path, x: torch.Tensor, expected: list[np.ndarray], names: list[str], atol: float) -> None:
    onnx_model = OnnxModel(path, providers=["CPUExecutionProvider"])
    batch_sizes = sorted({x.shape[0], 1})  # two batch sizes when possible: exercises the dynamic axis
    for n in batch_sizes:
        got = onnx_model.run(x[:n].numpy())
        for name, want in zip(names, expected, strict=True):
            diff = float(np.max(np.abs(got[name] - want[:n]))) if want.size else 0.0
            limit = atol if name == LOGITS_NAME else atol * max(1.0, float(np.max(np.abs(want))))
            if not diff <= limit:
                raise RuntimeError(
                    f"ONNX output {name!r} differs from PyTorch by {diff:.3g} > {limit:.3g} "
                    f"(batch {n}); the file was not written"
                )


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ONNX file written by :func:`export_onnx` (its metadata names the producer); not for a
    file that does not parse (the model loader then says it is not a readable ONNX file)."""
    path = Path(path)
    if path.suffix.lower() != ".onnx" or not path.is_file():
        return False
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except DecodeError:
        return False
    return any(p.key == "producer" and p.value == "hfc-engine" for p in proto.metadata_props)


def converted_export(
    path: str | os.PathLike, raw_layers: Sequence[str] = (), batch_size: int = 128, device: str = "cpu"
) -> FeatureCache:
    """An export converted to a differentiable torch module, as a :class:`FeatureCache` whose features are the
    file's feature outputs (raw maps kept for ``raw_layers``), with its dropout layers put back."""
    foreign, onnx_model = load_model(path), OnnxModel(path)
    graph, names = foreign.net, onnx_model.output_names
    rates = onnx_model.metadata.get("dropout", {})
    restore_dropout(graph, names, {DROPOUT_PREFIX + layer: rate for layer, rate in rates.items()})

    def extract(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = dict(zip(names, graph(x), strict=True))
        feats = {n.removeprefix(FEATURE_PREFIX): v for n, v in out.items() if n.startswith(FEATURE_PREFIX)}
        feats.update({n.removeprefix(RAW_PREFIX): v for n, v in out.items() if n.startswith(RAW_PREFIX)})
        return out[LOGITS_NAME], feats

    module = FirstOutput(graph, foreign.meta)
    return FeatureCache(module, raw_layers=raw_layers, batch_size=batch_size, device=device, extractor=extract)


def default_providers() -> list[str]:
    """CUDA (when onnxruntime-gpu and a GPU are present) then CPU. Warns when torch sees a GPU but onnxruntime has no
    CUDA provider: onnxruntime-gpu is missing, or shadowed by onnxruntime installed beside it (README, GPU install)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available and torch.cuda.is_available():
        warnings.warn(
            f"a CUDA GPU is visible but onnxruntime {ort.__version__} has no CUDA provider (it has {available}), so "
            "ONNX models run on the CPU; onnxruntime and onnxruntime-gpu installed together lose it: pip uninstall "
            "-y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu",
            RuntimeWarning,
            stacklevel=2,
        )
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxModel:
    """An exported model in onnxruntime: ``run`` one batch, ``predict``/``iter_batches`` over whole datasets."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise UserError(f"path {str(path)!r} is not a file")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), providers=list(providers or default_providers()))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k: json.loads(v) if k != "producer" else v for k, v in props.items()}

    def run(self, x: np.ndarray | torch.Tensor, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """All (or the named) outputs for one float32 batch (N,C,H,W)."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.ndim != 4:
            raise UserError(f"x must be a batch of images (N,C,H,W), got shape {arr.shape}")
        names = list(outputs) if outputs is not None else self.output_names
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise UserError(f"outputs {unknown} are not in the model; available: {self.output_names}")
        values = self.session.run(names, {self.input_name: np.ascontiguousarray(arr, dtype=np.float32)})
        return dict(zip(names, values, strict=True))

    def iter_batches(
        self, data: Dataset | np.ndarray | torch.Tensor, batch_size: int = 256, outputs: Sequence[str] | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream output dicts batch by batch; only one batch of images is in memory at a time."""
        for x in iter_batches(data, batch_size):
            yield self.run(x, outputs)

    def predict(
        self, data: Dataset | np.ndarray | torch.Tensor, batch_size: int = 256, output: str = LOGITS_NAME
    ) -> np.ndarray:
        """One output (default: logits) for every image of ``data``, concatenated: (N, ...)."""
        parts = [out[output] for out in self.iter_batches(data, batch_size, [output])]
        if not parts:
            raise UserError("data is empty")
        return np.concatenate(parts)
