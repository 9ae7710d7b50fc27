"""Audits from Python: ``run_audit(config)`` (what ``hfc-engine run`` calls) and ``audit(model, dataset, ...)``.

report = engine.audit(model, dataset, attacks=["pgd"], detectors=["lid", "maha"], hfc=True)
report.table(); report.to_csv("results.csv"); report.save_html("report.html")
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from engine.sweep.config import DEFAULTS, validate
from engine.sweep.executor import LocalExecutor
from engine.sweep.pipeline import Workspace, build_cells
from engine.sweep.store import ResultStore


@dataclass
class AuditReport:
    """The outcome of an audit: long-format metric rows, the run directory and its run card."""

    rows: list[dict[str, Any]]
    run_dir: Path
    card: dict[str, Any] = field(default_factory=dict)
    html: str = ""

    def table(self) -> pd.DataFrame:
        """The paper-style detection table (AUROC and TPR@90%TNR, plain vs HFC, with attack success rates)."""
        from engine.report.audit_report import detection_table

        return detection_table(self.rows)

    def frame(self) -> pd.DataFrame:
        """All rows as a long-format DataFrame."""
        from engine.sweep.store import ROW_COLUMNS

        return pd.DataFrame(self.rows, columns=list(ROW_COLUMNS))

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        self.frame().to_csv(path, index=False)
        return Path(path)

    def save_html(self, path: str | os.PathLike[str]) -> Path:
        Path(path).write_text(self.html)
        return Path(path)


def run_audit(config: dict[str, Any], progress: bool = True, workspace: Workspace | None = None) -> AuditReport:
    """Run (or resume) the audit described by ``config``; write results, run card and report into its run dir."""
    validate(config)
    run_dir = Path(config["output_dir"]) / config["name"]
    ws = workspace or Workspace(device=config["device"], progress=progress)
    started = time.time()
    with ResultStore(run_dir) as store:
        cells = build_cells(config, ws)
        new_timings = LocalExecutor(progress=progress).run(cells, store)
        rows = store.rows()
        done = {key: (stage, seconds) for key, stage, seconds in store.cells()}
        detect = [(c.inputs, store.payload(c.key)) for c in cells if c.stage == "detect"]
        projections = [store.payload(c.key) for c in cells if c.stage == "projection"]
        studies = [store.payload(c.key) for c in cells if c.stage == "study"]
    stage_seconds: dict[str, float] = {}
    for stage, seconds in done.values():
        stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
    card = run_card(config, stage_seconds, new_timings, time.time() - started)
    return _write_outputs(config, run_dir, rows, card, detect, projections, studies)


def _write_outputs(
    config: dict[str, Any],
    run_dir: Path,
    rows: list[dict[str, Any]],
    card: dict[str, Any],
    detect: Sequence[tuple[dict[str, Any], dict[str, Any]]],
    projections: Sequence[dict[str, Any]],
    studies: Sequence[dict[str, Any]] = (),
) -> AuditReport:
    from engine.fileio import atomic_write
    from engine.report.audit_report import build_report, write_tables

    write_tables(rows, run_dir)
    atomic_write(run_dir / "run_card.json", lambda p: p.write_text(json.dumps(card, indent=2, default=str)))
    from engine.studies import StudyResult

    extra = [section for s in studies for section in StudyResult(s["study"], [], s["payload"]).sections()]
    html = build_report(f"hfc-engine audit: {config['name']}", rows, card, detect, projections, extra)
    atomic_write(run_dir / "report.html", lambda p: p.write_text(html))
    return AuditReport(rows=rows, run_dir=run_dir, card=card, html=html)


def run_card(
    config: dict[str, Any], stage_seconds: dict[str, float], new_timings: dict[str, float], wall_seconds: float
) -> dict[str, Any]:
    """Config, seeds, versions, git commit, machine and timings of a run."""
    import numpy
    import sklearn
    import torch

    from engine import __version__

    return {
        "version": __version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "seed": config["seed"],
        "git_commit": _git_commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "machine": {
            "node": platform.node(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "system": platform.platform(),
        },
        "seconds_per_stage": {k: round(v, 2) for k, v in stage_seconds.items()},
        "seconds_this_invocation": {k: round(v, 2) for k, v in new_timings.items()},
        "wall_seconds_this_invocation": round(wall_seconds, 2),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def audit(
    model: Any,
    dataset: Any,
    attacks: Sequence[str] = ("pgd",),
    detectors: Sequence[str] = ("lid", "maha", "kd"),
    hfc: bool = True,
    eps: Sequence[str | float] = ("2/256",),
    steps: int = 10,
    pool: int = 200,
    run_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = False,
    **hfc_options: Any,
) -> AuditReport:
    """Audit a trained ``model`` (nn.Module taking [0,1] images) on ``dataset`` (an engine dataset).

    The dataset is split as in every run (seeded, stratified 70/15/15): HFC mixtures are fitted on its train
    split, attacks and detectors use up to ``pool`` images of its test split. Results go to ``run_dir``
    (default: a fresh directory under runs/); re-running with the same arguments resumes.
    """
    from engine.data.base import ImageDataset

    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an engine dataset (engine.data), got {type(dataset).__name__}")
    model_key = f"memory:{_module_fingerprint(model)}"
    spec = {"name": "memory", "fingerprint": dataset.fingerprint}
    ws = Workspace(progress=progress)
    ws.models[model_key] = model.eval()
    ws.datasets[_spec_key(spec)] = dataset
    config = copy.deepcopy(DEFAULTS)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / f"audit-{model_key[7:15]}"
    config.update(
        name=run_dir.name,
        output_dir=str(run_dir.parent),
        seed=seed,
        datasets=[spec],
        attacks=list(attacks),
        detectors=list(detectors),
        studies=[],
        eps=[str(e) for e in eps],
    )
    config["model"].update(checkpoint=model_key, arch=_arch(model))
    config["attack"].update(steps=steps, pool=pool)
    config["hfc"].update(enabled=bool(hfc), **hfc_options)
    return run_audit(config, progress=progress, workspace=ws)


def _spec_key(spec: dict[str, Any]) -> str:
    from engine.sweep.pipeline import _fingerprint

    return _fingerprint(spec)


def _arch(model: Any) -> str:
    arch = getattr(model, "config", {}).get("arch") if isinstance(getattr(model, "config", None), dict) else None
    return arch if arch in ("resnet18", "resnet50", "vgg16") else "resnet18"


def _module_fingerprint(model: Any) -> str:
    import hashlib

    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
