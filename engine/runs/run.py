"""Run (or resume) a config: plan the cells, execute them, write the tables and the run card.

``execute(config)`` is what ``hfc-engine run`` and ``engine.audit`` call; it returns a :class:`RunResult` with the
rows and payloads of this config's cells, from which engine.report builds the HTML page. Outputs in
``<output_dir>/<name>/``: ``store.sqlite`` (the results store), ``artifacts/``, ``results.csv`` and
``results.parquet`` (long format, :data:`engine.runs.schema.ROW_COLUMNS`) and ``run_card.json``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from engine import __version__, build_commit, git_commit
from engine.fileio import atomic_write
from engine.ops import OPS, available
from engine.runs.artifacts import Artifacts
from engine.runs.cells import Cell
from engine.runs.cluster import RayExecutor
from engine.runs.config import validate
from engine.runs.context import RunContext
from engine.runs.executor import Executor, LocalExecutor
from engine.runs.plan import build_cells, run_seeds
from engine.runs.preflight import preflight
from engine.runs.progress import CostModel, Machine
from engine.runs.schema import ROW_COLUMNS, dataset_label, fingerprint
from engine.runs.stages import STAGES
from engine.runs.staging import is_url, open_artifacts
from engine.runs.store import STORE_FILE, ResultStore

log = logging.getLogger("engine.runs")
CARD_FILE = "run_card.json"
DEPENDENCIES = (  # distributions whose versions the run card records (None when not installed)
    "torch", "numpy", "scipy", "scikit-learn", "pandas", "onnx", "onnxruntime", "onnxruntime-gpu", "onnx2torch",
    "onnx2fx", "ray", "pydicom", "triton", "pybind11",
)  # fmt: skip


@dataclass
class RunResult:
    """A finished run: its rows, the (cell, payload) pairs per stage, the run card and where it all lives."""

    config: dict[str, Any]
    run_dir: Path
    artifacts: Artifacts
    rows: list[dict[str, Any]]
    payloads: dict[str, list[tuple[Cell, dict[str, Any]]]] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)

    def frame(self) -> pd.DataFrame:
        """All rows as a long-format DataFrame."""
        return pd.DataFrame(self.rows, columns=list(ROW_COLUMNS))


def run_dir(config: Mapping[str, Any]) -> Path:
    return Path(config["output_dir"]) / config["name"]


def execute(config: dict[str, Any], progress: bool = True, context: RunContext | None = None) -> RunResult:
    """Run (or resume) the run described by ``config``; write results.csv/.parquet and run_card.json."""
    validate(config)
    directory = run_dir(config)
    ctx = context or RunContext(open_artifacts(artifact_location(config)), device=config["device"], progress=progress)
    artifacts = ctx.artifacts
    started = time.perf_counter()
    preflight(config, ctx)
    cells = build_cells(config)
    machine = Machine()
    costs = CostModel({c.key: STAGES[c.stage].cost(c, machine) for c in cells})
    executor = make_executor(config, progress)
    if (directory / CARD_FILE).is_file() and not (directory / STORE_FILE).is_file():
        log.warning("%s: %s is missing (removed or moved aside): every cell runs again", directory, STORE_FILE)
    local = None if is_url(artifact_location(config)) else artifacts.root
    with ResultStore(directory, artifact_root=local) as store:
        recompute(store, cells)
        store.set_plan([c.key for c in cells])
        timings = executor.run(cells, store, ctx, STAGES, costs)
        rows = store.rows([c.key for c in cells])
        payloads: dict[str, list[tuple[Cell, dict[str, Any]]]] = {}
        for cell in cells:
            payloads.setdefault(cell.stage, []).append((cell, store.payload(cell.key)))
        seconds = {key: s for key, _, s in store.cells()}
    stage_seconds: dict[str, float] = {}
    for cell in cells:
        stage_seconds[cell.stage] = stage_seconds.get(cell.stage, 0.0) + seconds[cell.key]
    wall = time.perf_counter() - started
    card = run_card(config, stage_seconds, timings, wall, executor.trace, costs, payloads.get("calibrate", []))
    card["inputs"] = input_identities(cells)
    result = RunResult(dict(config), directory, artifacts, rows, payloads, card)
    write_tables(result)
    atomic_write(directory / CARD_FILE, lambda p: p.write_text(json.dumps(card, indent=2, default=str)))
    return result


def recompute(store: ResultStore, cells: Sequence[Cell]) -> None:
    """Forget the finished cells whose artifact files are gone (deleted, or lost with a disk), so they run again."""
    stale = [(cell, missing) for cell in cells if (missing := store.missing(cell.key))]
    for cell, missing in stale:
        log.warning(
            "%s: %d artifact file(s) missing (e.g. %s): the cell runs again", cell.label, len(missing), missing[0]
        )
    store.forget(cell.key for cell, _ in stale)


def input_identities(cells: Sequence[Cell]) -> dict[str, Any]:
    """What the run read, by content: each user model file's path and sha256, and each dataset's content
    fingerprint (engine.data.content_fingerprint; None for data its spec determines) and spec fingerprint."""
    models, datasets = {}, {}
    for cell in cells:
        if cell.stage != "model":
            continue
        model, spec = cell.inputs["model"], cell.inputs["dataset"]
        if model.get("checkpoint_sha256"):
            models[cell.inputs["model_label"]] = {
                "checkpoint": model["checkpoint"],
                "sha256": model["checkpoint_sha256"],
            }
        datasets[dataset_label(spec)] = {"content": spec.get("content"), "spec": fingerprint(dict(spec))}
    return {"models": models, "datasets": datasets}


def artifact_location(config: Mapping[str, Any]) -> str:
    """Where the run's artifacts live: ``artifacts`` (a directory or an fsspec URL), else ``<run dir>/artifacts``;
    a directory as an absolute path, so that workers started elsewhere find it."""
    location = str(config["artifacts"] or run_dir(config) / "artifacts")
    return location if is_url(location) else str(Path(location).expanduser().resolve())


def make_executor(config: Mapping[str, Any], progress: bool = True) -> Executor:
    """The executor ``config["executor"]`` names."""
    if config["executor"] == "ray":
        return RayExecutor(config, artifact_location(config), progress=progress)
    return LocalExecutor(progress=progress, threads=config["threads"])


def write_tables(result: RunResult) -> None:
    """results.csv and results.parquet (long format, one row per cell and metric)."""
    frame = result.frame()
    atomic_write(result.run_dir / "results.csv", lambda p: frame.to_csv(p, index=False))
    atomic_write(result.run_dir / "results.parquet", lambda p: frame.to_parquet(p, index=False))


def run_card(
    config: Mapping[str, Any],
    stage_seconds: Mapping[str, float],
    new_timings: Mapping[str, float],
    wall_seconds: float,
    trace: list[tuple[float, float]],
    costs: CostModel,
    calibrations: Sequence[tuple[Cell, Mapping[str, Any]]],
) -> dict[str, Any]:
    """Config, seeds, versions, git commit, machine, timings and peak memory of a run, how good its ETA was, and
    the HFC weights its ``calibrations`` (calibrate cells and their payloads) chose on validation images."""
    return {
        "version": __version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "seed": config["seed"],
        "seeds": run_seeds(config),
        "git_commit": git_commit(),
        "build_commit": build_commit(),
        "versions": {"python": platform.python_version(), **dependency_versions()},
        "kernels": {op: available(op) for op in OPS},
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "machine": {
            "node": platform.node(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": config["threads"] or torch.get_num_threads(),  # a local run's; Ray cells': their cpus
            "system": platform.platform(),
        },
        "seconds_per_stage": {k: round(v, 2) for k, v in stage_seconds.items()},
        "seconds_this_invocation": {k: round(v, 2) for k, v in new_timings.items()},
        "wall_seconds_this_invocation": round(wall_seconds, 2),
        "peak_rss_gib": peak_memory_gib(),
        "eta": eta_quality(trace, wall_seconds, costs),
        "hfc_calibration": [  # with every trial
            {k: cell.inputs[k] for k in ("dataset_label", "model_label", "seed", "attack", "eps", "variant")}
            | dict(payload)
            for cell, payload in calibrations
        ],
    }


def peak_memory_gib() -> float:
    """Peak resident memory (GiB) of this process so far (a run in a fresh ``hfc-engine run`` process: the run's
    peak; Ray workers are separate processes and not counted)."""
    scale = 2**20 if sys.platform != "darwin" else 2**30  # ru_maxrss: KiB on Linux, bytes on macOS
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 3)


def eta_quality(trace: list[tuple[float, float]], wall_seconds: float, costs: CostModel) -> dict[str, Any]:
    """The predicted total at the first finished cell after 10% of the wall time, as a ratio to the truth."""
    after = [(t, total) for t, total in trace if t >= 0.1 * wall_seconds]
    at_10 = after[0] if after else None
    return {
        "initial_estimate_seconds": round(sum(est for _, est in costs.estimates.values()), 1),
        "predicted_total_after_10pct": None if at_10 is None else round(at_10[1], 1),
        "ratio_to_actual_after_10pct": None if at_10 is None else round(at_10[1] / max(wall_seconds, 1e-9), 3),
        "trace": [[round(t, 1), round(total, 1)] for t, total in trace],
    }


def dependency_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`DEPENDENCIES` (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in DEPENDENCIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
