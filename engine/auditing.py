"""Audits from Python: ``engine.audit(model, data, ...)`` and ``run_audit(config)`` (what ``hfc-engine run`` calls).

report = engine.audit(model, (x, y), attacks=["pgd"], detectors=["lid", "maha"], attack={"pool": 100})
report.table(); report.to_csv("results.csv"); report.save_html("report.html")

The function is ``engine.audit`` (this module is ``engine.auditing``, so the name is never shadowed by a module).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from engine.data import ArrayDataset, ImageDataset, as_tensors
from engine.errors import UserError, UserTypeError
from engine.models import label_with_model, load_model
from engine.report import build_report, detection_table, write_report
from engine.runs import ROW_COLUMNS, Artifacts, ConfigError, RunContext, RunResult, execute, load_config, validate
from engine.runs.config import MEMORY_DATASET, check_device

# engine.audit's own defaults over the run defaults: a short audit of the model alone (no studies)
API_DEFAULTS: dict[str, Any] = {
    "attacks": ["pgd"],
    "detectors": ["lid", "maha", "kd"],
    "eps": ["2/256"],
    "attack": {"pool": 200},
    "studies": [],
}
API_SET = ("name", "output_dir", "datasets")  # config keys engine.audit sets itself (from run_dir and data)
API_MODEL_SET = ("checkpoint", "input", "output")  # model.* keys it sets (from model, input= and output=)


@dataclass
class AuditReport:
    """The outcome of an audit: long-format metric rows, the run directory, its run card and the HTML report."""

    result: RunResult
    html: str

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.result.rows

    @property
    def run_dir(self) -> Path:
        return self.result.run_dir

    @property
    def card(self) -> dict[str, Any]:
        return self.result.card

    def table(self) -> pd.DataFrame:
        """The paper-style detection table (AUROC and TPR@90%TNR, plain vs HFC, with attack success rates)."""
        return detection_table(self.rows)

    def frame(self) -> pd.DataFrame:
        """All rows as a long-format DataFrame."""
        return pd.DataFrame(self.rows, columns=list(ROW_COLUMNS))

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        self.frame().to_csv(path, index=False)
        return Path(path)

    def save_html(self, path: str | os.PathLike[str]) -> Path:
        Path(path).write_text(self.html)
        return Path(path)


def run_audit(config: dict[str, Any], progress: bool = True, context: RunContext | None = None) -> AuditReport:
    """Run (or resume) the audit described by ``config``; write results, run card and report into its run dir."""
    result = execute(config, progress=progress, context=context)
    html = build_report(result)  # once: written to the run directory and kept on the report
    write_report(result, html)
    return AuditReport(result, html)


def audit(
    model: nn.Module | str | os.PathLike[str],
    data: Any,
    /,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    input: Mapping[str, Any] | None = None,
    output: str = "logits",
    progress: bool = False,
    **config: Any,
) -> AuditReport:
    """Audit a trained ``model`` on ``data`` (both positional); keyword arguments are run config keys (docs/runs.md).

    ``model``: an nn.Module or TorchScript module taking [0,1] NCHW images, or a model file (ONNX, TorchScript,
    checkpoint); ``input`` and ``output`` declare other conventions (see engine.models.load_model). ``data``: an
    engine dataset, an ``(images, labels)`` pair of tensors or arrays, a torch Dataset of ``(image, label)``, or a
    DataLoader of such batches (read once, in its order). Data without labels is labelled with the model's
    predictions, and its name says so. ``config``: top-level config keys with nested ones as dicts, e.g.
    ``attacks=["pgd"], attack={"steps": 20, "pool": 100}, hfc={"layers": "blocks"}, device="cpu"``
    (``hfc=False`` is short for ``hfc={"enabled": False}``); unknown keys and bad values raise ConfigError before
    any work. Defaults: the run defaults with :data:`API_DEFAULTS` over them. ``device``: the model's own device
    unless given. The model is never changed: the audit runs on a deep copy (the caller's module keeps its device,
    mode, requires_grad flags, gradients and buffers; the copy costs one model's memory). The data is split as in
    every run (seeded, stratified 70/15/15): HFC mixtures are fitted on its train split, attacks and detectors use
    up to ``attack.pool`` images of its test split. Rows name the model by ``model={"name": ...}`` (default: the
    model's name, an engine model's architecture, else its class name). Results go to ``run_dir`` (default: a
    directory under runs/ named by the model's weights); re-running with the same arguments resumes.
    """
    if not isinstance(model, (nn.Module, str, os.PathLike)):
        raise UserTypeError(f"model must be a torch.nn.Module or a model file, got {type(model).__name__}")
    dataset = as_dataset(data)
    model_keys = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    taken = sorted({*(set(config) & set(API_SET)), *(f"model.{k}" for k in set(model_keys) & set(API_MODEL_SET))})
    if taken:
        raise ConfigError(f"engine.audit sets config keys {taken} itself (from model, input=, output=, run_dir= and "
                          "data); the rows' model name is model={'name': ...}")  # fmt: skip
    if isinstance(config.get("hfc"), bool):
        config["hfc"] = {"enabled": config["hfc"]}
    if "device" not in config and isinstance(model, nn.Module):
        config["device"] = str(_own_device(model))
    spec = _memory_spec(dataset)
    settings = load_config(settings=[API_DEFAULTS, config, {"datasets": [spec]}])  # refuses bad keys before work
    check_device(settings["device"], "engine.audit: device")  # also with executor: ray (the model is in memory)
    convention = dict(input or {})
    convention.setdefault("size", list(dataset[0][0].shape) if isinstance(model, torch.jit.ScriptModule) else None)
    source = copy.deepcopy(model) if isinstance(model, nn.Module) else model  # the caller's module stays as it is
    loaded = load_model(source, input=convention, output=output)
    if not dataset.labelled:
        dataset = label_with_model(loaded, dataset)
    weights = _module_fingerprint(loaded)
    directory = Path(run_dir) if run_dir is not None else Path("runs") / f"audit-{weights[:8]}"
    spec = _memory_spec(dataset)
    settings.update(name=directory.name, output_dir=str(directory.parent), datasets=[spec])
    context = RunContext(Artifacts(directory / "artifacts"), device=settings["device"], progress=progress)
    context.register_dataset(spec, dataset)
    engine_config = getattr(loaded, "config", None)
    arch = engine_config.get("name") if isinstance(engine_config, dict) else None
    label = settings["model"]["name"] or getattr(loaded, "name", None) or arch or type(loaded).__name__
    settings["model"].update(checkpoint=context.register_model(loaded, weights), name=label)
    return run_audit(validate(settings), progress=progress, context=context)


def as_dataset(data: Any) -> ImageDataset:
    """``data`` as an engine dataset: an engine dataset as it is; an ``(images, labels)`` pair, a torch Dataset
    of ``(image, label)`` or a DataLoader of such batches as an in-memory ArrayDataset."""
    if isinstance(data, ImageDataset):
        return data
    if isinstance(data, DataLoader):
        batches = [_pair(batch, "data (a DataLoader)") for batch in data]
        if not batches:
            raise UserError("data: the DataLoader yielded no batches")
        x, y = (torch.cat([torch.as_tensor(b[i]) for b in batches]) for i in (0, 1))
        return ArrayDataset(x, y, name="dataloader")
    if isinstance(data, Dataset):
        x, y = as_tensors(data, name="data (a torch Dataset of (image, label))")
        return ArrayDataset(x, y, name=type(data).__name__)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return ArrayDataset(*_pair(data, "data (an (images, labels) pair)"), name="tensors")
    raise UserTypeError(
        "data must be an engine dataset (engine.data), an (images, labels) pair of tensors or arrays, a torch "
        f"Dataset of (image, label) or a DataLoader of such batches, got {type(data).__name__}"
    )


def _pair(batch: Any, name: str) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise UserTypeError(f"{name} must give (images, labels) pairs, got {type(batch).__name__}")
    return batch[0], batch[1]


def _own_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (or buffers); the CPU for a model without any."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _memory_spec(dataset: ImageDataset) -> dict[str, Any]:
    source = dataset.labels_source
    label = dataset.name if source == "dataset" else f"{dataset.name} (labels: {source})"
    return {"name": MEMORY_DATASET, "fingerprint": dataset.fingerprint, "label": label}


def _module_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha1()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
