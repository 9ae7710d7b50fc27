"""Audits from Python: ``run_audit(config)`` (what ``hfc-engine run`` calls) and ``audit(model, dataset, ...)``.

report = engine.audit(model, dataset, attacks=["pgd"], detectors=["lid", "maha"], hfc=True)
report.table(); report.to_csv("results.csv"); report.save_html("report.html")
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from engine.data import ImageDataset
from engine.models import label_with_model, load_model
from engine.report import build_report, detection_table, write_report
from engine.runs import DEFAULTS, ROW_COLUMNS, Artifacts, RunContext, RunResult, execute


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
    model: nn.Module,
    dataset: ImageDataset,
    attacks: Sequence[str] = ("pgd",),
    detectors: Sequence[str] = ("lid", "maha", "kd"),
    hfc: bool = True,
    eps: Sequence[str | float] = ("2/256",),
    steps: int = 10,
    pool: int = 200,
    run_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    name: str | None = None,
    input: Mapping[str, Any] | None = None,
    output: str = "logits",
    **hfc_options: Any,
) -> AuditReport:
    """Audit a trained ``model`` on ``dataset`` (an engine dataset).

    ``model``: an nn.Module or TorchScript module taking [0,1] NCHW images, or a model file (ONNX, TorchScript,
    checkpoint); ``input`` and ``output`` declare other conventions (see engine.models.load_model). A dataset
    without labels is labelled with the model's predictions, and its name says so. The dataset is split as in
    every run (seeded, stratified 70/15/15): HFC mixtures are fitted on its train split, attacks and detectors
    use up to ``pool`` images of its test split. Rows carry ``name`` (default: the model's name, an engine model's
    architecture, else its class name) and the dataset's name. Results go to ``run_dir`` (default: a directory
    under runs/ named by the model's weights); re-running with the same arguments resumes. ``hfc_options`` set
    ``hfc.*``.
    """
    if not isinstance(model, (nn.Module, str, os.PathLike)):
        raise TypeError(f"model must be a torch.nn.Module or a model file, got {type(model).__name__}")
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an engine dataset (engine.data), got {type(dataset).__name__}")
    convention = dict(input or {})
    convention.setdefault("size", list(dataset[0][0].shape) if isinstance(model, torch.jit.ScriptModule) else None)
    model = load_model(model, input=convention, output=output)
    if not dataset.labelled:
        dataset = label_with_model(model, dataset)
    weights = _module_fingerprint(model)
    directory = Path(run_dir) if run_dir is not None else Path("runs") / f"audit-{weights[:8]}"
    config = copy.deepcopy(DEFAULTS)
    label = dataset.name if dataset.labels_source == "dataset" else f"{dataset.name} (labels: {dataset.labels_source})"
    spec = {"name": "memory", "fingerprint": dataset.fingerprint, "label": label}
    config.update(
        name=directory.name,
        output_dir=str(directory.parent),
        seed=seed,
        datasets=[spec],
        attacks=list(attacks),
        detectors=list(detectors),
        studies=[],
        eps=[str(e) for e in eps],
    )
    context = RunContext(Artifacts(directory / "artifacts"), device=config["device"], progress=progress)
    context.register_dataset(spec, dataset)
    engine_config = getattr(model, "config", None)
    arch = engine_config.get("name") if isinstance(engine_config, dict) else None
    label = name or getattr(model, "name", None) or arch or type(model).__name__
    config["model"].update(checkpoint=context.register_model(model, weights), name=label)
    config["attack"].update(steps=steps, pool=pool)
    config["hfc"].update(enabled=bool(hfc), **hfc_options)
    return run_audit(config, progress=progress, context=context)


def _module_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha1()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
