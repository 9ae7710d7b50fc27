"""Checkpoints (weights + metadata, written atomically) and :func:`load_model` for every model source.

A checkpoint is a ``torch.save`` dict loadable with ``weights_only=True``::

    {"format": "hfc-engine.checkpoint", "format_version": 1,
     "config": {...},        # build_model(**config) rebuilds the architecture (name, num_classes, options, mean/std)
     "state_dict": {...},    # ImageClassifier.state_dict(): normalize.mean/std + net.<torchvision keys>
     "meta": {...},          # input_size, classes, dataset, split_hash, metrics, history, versions, created
     "train_state": {...}}   # optional: optimizer/scheduler/early-stopping state to resume training
"""

from __future__ import annotations

import os
import pickle
import platform
import time
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import engine
from engine.errors import UserError, UserTypeError
from engine.fileio import atomic_write
from engine.models.classifier import ImageClassifier, build_model, load_torchvision_state_dict
from engine.models.conventions import (
    ForeignModel,
    InputConvention,
    check_output,
    onnx_model,
    torchscript_model,
)

FORMAT = "hfc-engine.checkpoint"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    """Versions of the software that produced a result."""
    return {
        "engine": str(engine.__version__),
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same directory, then rename it over ``path``."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(
    path: str | os.PathLike,
    model: ImageClassifier,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (an :class:`ImageClassifier` from build_model) with ``meta`` to ``path`` atomically."""
    if not isinstance(model, ImageClassifier):
        raise UserTypeError(f"model must be an ImageClassifier from build_model, got {type(model).__name__}")
    meta = {"versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(meta or {})}
    meta.setdefault("normalization", {"mean": model.config["mean"], "std": model.config["std"]})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config, "state_dict": state}
    obj["meta"] = meta
    if train_state is not None:
        obj["train_state"] = train_state
    return atomic_save(obj, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (raises ValueError for any other file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint path {str(path)!r} is not a file")
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{str(path)!r} is not an hfc-engine checkpoint")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{str(path)!r} has format_version {obj['format_version']}; this engine reads <= 1")
    return obj


def model_from_checkpoint(ckpt: dict[str, Any]) -> ImageClassifier:
    """Rebuild the model of a loaded checkpoint dict and load its weights (strict)."""
    model = build_model(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.meta = ckpt.get("meta", {})
    return model


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in zf.namelist())


def _is_onnx(path: Path) -> bool:
    if path.suffix.lower() == ".onnx":
        return True
    with open(path, "rb") as fh:
        return fh.read(1) == b"\x08"  # an ONNX ModelProto starts with field 1 (ir_version), a varint


def load_model(
    source: str | os.PathLike | nn.Module,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
    input: InputConvention | Mapping[str, Any] | None = None,
    output: str = "logits",
    parity_tolerance: float | None = 1e-4,
    name: str | None = None,
    **options: Any,
) -> nn.Module:
    """A model in eval mode that takes [0, 1] NCHW images and returns logits, from any source.

    - an ``nn.Module``: returned as is, or behind ``input``/``output`` conventions when they are declared
      (a TorchScript module is converted as a TorchScript file is);
    - an ONNX file (``.onnx``): converted to a differentiable torch module (engine.models.onnx, the ``onnx``
      extra) whose outputs must match onnxruntime's within ``parity_tolerance`` (None: report only);
    - a TorchScript file: exported to ONNX in memory and converted, checked against the TorchScript module;
    - an hfc-engine checkpoint (metadata as ``model.meta``), or a bare state_dict with ``arch`` and
      ``num_classes`` (plus build_model ``options``), torchvision's keys or the ``net.``-prefixed wrapper's.

    ``input`` (:class:`InputConvention` or a mapping: ``layout`` NCHW/NHWC, value ``range`` such as [0, 255],
    ``mean``/``std`` in those units, ``size`` (C, H, W)) and ``output`` (logits, probabilities,
    log_probabilities) describe what the model takes and returns; converted models carry ``meta["conversion"]``
    (converter, seconds, max abs difference from the reference runtime) and ``name`` (default: the file stem).
    """
    convention, output = InputConvention.parse(input), check_output(output)
    foreign = replace(convention, size=None) != InputConvention() or output != "logits"  # a size alone: no wrapper
    if isinstance(source, torch.jit.ScriptModule):
        label = name or type(source).__name__
        return torchscript_model(source, label, convention, output, parity_tolerance, label)
    if isinstance(source, nn.Module):
        if not foreign:
            return source.eval()
        return ForeignModel(source, convention, output, name or type(source).__name__).eval()
    if not isinstance(source, (str, os.PathLike)):
        raise UserTypeError(f"source must be an nn.Module or a file path, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise UserError(f"model path {str(path)!r} is not a file")
    if _is_onnx(path):
        return onnx_model(path, convention, output, parity_tolerance, name)
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated but still the loader
            module = torch.jit.load(str(path), map_location=map_location)
        return torchscript_model(module, str(path), convention, output, parity_tolerance, name or path.stem)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise UserError(
            f"{str(path)!r} is neither an ONNX file, a TorchScript file, an hfc-engine checkpoint nor a state_dict "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    model = _from_torch_file(path, obj, arch, num_classes, options)
    return ForeignModel(model, convention, output, name or path.stem).eval() if foreign else model


def _from_torch_file(
    path: Path, obj: Any, arch: str | None, num_classes: int | None, options: Mapping[str, Any]
) -> nn.Module:
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return model_from_checkpoint(load_checkpoint(path)).eval()
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is None or num_classes is None:
            raise UserError(f"{str(path)!r} is a bare state_dict: pass arch= and num_classes= to rebuild the model")
        model = build_model(arch, num_classes, **options)
        if any(k.startswith("net.") for k in obj):
            model.load_state_dict(obj, strict=True)
        else:
            load_torchvision_state_dict(model, obj)
        return model.eval()
    raise UserError(f"{str(path)!r} is neither a TorchScript file, an hfc-engine checkpoint nor a state_dict")
