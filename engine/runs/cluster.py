"""Run a run's cells as Ray tasks: on a cluster (``ray.address``) or on a local Ray instance of several worker
processes (no address: the one-big-machine mode). See docs/clusters.md.

Every unfinished cell becomes one task whose arguments include the payload references of the cells it needs, so
Ray starts it when they are done and independent cells run at once. A task claims the resources of its stage
(``resources.<stage>``: cpus, gpus, memory_gb) and runs with as many torch / BLAS / OpenMP threads as CPUs it
claimed. Workers build their own run context from the artifact location (a directory every node sees, or an fsspec
URL) and never read the driver's disk; the driver alone writes the results store, committing each cell as its
result arrives. A worker that dies mid-cell (killed, out of memory, node lost) has its cell retried up to
``ray.retries`` times; a cell that raises stops the run with :class:`engine.runs.executor.CellFailed`.

Ray is an optional dependency, imported only when a Ray run starts (never for a local run).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from engine.runs.cells import Cell, Stage
from engine.runs.context import RunContext, threads
from engine.runs.executor import CellFailed, resume, run_cell
from engine.runs.overrides import ConfigError
from engine.runs.progress import CostModel
from engine.runs.staging import open_artifacts
from engine.runs.store import ResultStore

INSTALL_HINT = "pip install '.[ray]' in an hfc-engine checkout, or pip install 'ray==<your cluster's version>'"
HOST_STAGES = ("data",)  # stages that never use the run's device: no GPU claimed for them by default


def stage_resources(config: Mapping[str, Any], stage: str) -> dict[str, float]:
    """What one cell of ``stage`` claims: ``resources.<stage>`` over the defaults (1 CPU; on a CUDA device 1 GPU
    for every stage but ``data``; no memory reservation)."""
    gpus = 1 if str(config["device"]).startswith("cuda") and stage not in HOST_STAGES else 0
    return {"cpus": 1, "gpus": gpus, "memory_gb": 0, **config["resources"].get(stage, {})}


class RayExecutor:
    """Runs cells as Ray tasks (see the module docstring); the store is written here, in the driver."""

    def __init__(self, config: Mapping[str, Any], location: str, progress: bool = True) -> None:
        self.config = config
        self.location = location  # the artifact location workers open: an absolute directory or an fsspec URL
        self.progress = progress
        self.trace: list[tuple[float, float]] = []

    def run(
        self, cells: Sequence[Cell], store: ResultStore, context: Any, stages: Mapping[str, Stage], costs: CostModel
    ) -> dict[str, float]:
        """Run every unfinished cell on Ray (``context`` is the driver's and is not used: workers build theirs)."""
        import ray  # optional dependency: only a Ray run imports it

        order, finished, progress = resume(cells, store, costs, self.progress)
        connected_here, pending = False, []
        timings: dict[str, float] = {}
        try:
            connected_here = self._connect(ray)
            progress.parallel = max(1, int(ray.cluster_resources().get("CPU", 1)))  # one CPU per cell unless claimed
            self._check_fits(ray, {cell.stage for cell in order if cell.key not in finished})
            submitted = self._submit(ray, order, finished, store, stages)
            pending = list(submitted)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                cell, payload_ref = submitted[done[0]]
                payload, (rows, seconds) = _result(ray, cell, payload_ref, done[0])
                store.commit(cell.key, cell.stage, payload, rows, seconds)
                progress.end(cell.key, seconds)
                timings[cell.stage] = timings.get(cell.stage, 0.0) + seconds
        except BaseException:
            for ref in pending:  # a failed or interrupted run leaves no task behind on the cluster
                ray.cancel(ref)
            raise
        finally:
            progress.close()
            self.trace = progress.trace
            if connected_here:
                ray.shutdown()
        return timings

    def _connect(self, ray: Any) -> bool:
        """Join ``ray.address`` or start a local instance (``ray.cpus`` CPUs); reuse one this process already has.
        Returns whether this call connected (and so must disconnect)."""
        if ray.is_initialized():
            return False
        address, cpus = self.config["ray"]["address"], self.config["ray"]["cpus"]
        where = {"address": address} if address else {"num_cpus": cpus}
        try:
            ray.init(**where, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as exc:
            if not address:
                raise
            raise ConfigError(f"config key 'ray.address' is {address!r}: cannot reach a Ray cluster ({exc})") from exc
        return True

    def _check_fits(self, ray: Any, stages: set[str]) -> None:
        """Every claim must fit on some node (otherwise Ray would wait for one forever)."""
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        for stage in sorted(stages):
            claim = stage_resources(self.config, stage)
            need = {"CPU": claim["cpus"], "GPU": claim["gpus"], "memory": claim["memory_gb"] * 2**30}
            if not any(all(node.get(k, 0) >= v for k, v in need.items() if v) for node in nodes):
                largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
                raise ConfigError(
                    f"config key 'resources.{stage}' asks for {claim} per cell, but no node of the Ray cluster has "
                    f"that much (largest: {largest.get('CPU', 0):g} CPUs, {largest.get('GPU', 0):g} GPUs)"
                )

    def _submit(
        self, ray: Any, order: Sequence[Cell], finished: set[str], store: ResultStore, stages: Mapping[str, Stage]
    ) -> dict[Any, tuple[Cell, Any]]:
        """One task per unfinished cell, in dependency order; returns {results reference: (cell, payload
        reference)}."""
        task = ray.remote(_run_task)
        payloads: dict[str, Any] = {}  # cell key -> payload reference (unfinished) or payload (finished)
        submitted = {}
        for cell in order:
            if cell.key in finished:
                continue
            deps = [payloads[k] if k in payloads else store.payload(k) for k in cell.deps]
            claim = stage_resources(self.config, cell.stage)
            options = {
                "num_cpus": claim["cpus"],
                "num_gpus": claim["gpus"],
                "num_returns": 2,
                "max_retries": self.config["ray"]["retries"],
                "retry_exceptions": False,
                "name": cell.label or cell.key,
            }
            if claim["memory_gb"]:
                options["memory"] = int(claim["memory_gb"] * 2**30)
            worker = (self.location, self.config["device"], max(1, int(claim["cpus"])))
            payload, results = task.options(**options).remote(stages[cell.stage], cell.inputs, cell.deps, worker, *deps)
            payloads[cell.key], submitted[results] = payload, (cell, payload)
        return submitted


def _result(ray: Any, cell: Cell, payload: Any, results: Any) -> tuple[dict[str, Any], tuple[list[Any], float]]:
    """The (payload, (rows, seconds)) of a finished task; a cell that raised becomes CellFailed."""
    try:
        return ray.get(payload), ray.get(results)
    except ray.exceptions.RayTaskError as exc:
        cause: BaseException = exc
        while isinstance(cause, ray.exceptions.RayTaskError) and isinstance(getattr(cause, "cause", None), Exception):
            cause = cause.cause  # the cell's own exception (a UserError stays one), however often Ray wrapped it
        raise CellFailed(cell.label or cell.key, cause) from exc
    except ray.exceptions.RayError as exc:  # the worker died more than ray.retries times, or its node was lost
        raise CellFailed(cell.label or cell.key, exc) from exc


_WORKER: dict[str, Any] = {}  # this worker process's run context, kept for the cells of the run it last served


def _run_task(
    stage: Stage,
    inputs: Mapping[str, Any],
    dep_keys: Sequence[str],
    worker: tuple[str, str, int],
    *dep_payloads: dict[str, Any],
) -> tuple[dict[str, Any], tuple[list[dict[str, Any]], float]]:
    """A cell on a Ray worker: with the threads it claimed and this process's context for the artifact location;
    returns (payload, (rows, seconds)) as two objects, so dependants receive only the payload."""
    location, device, thread_count = worker
    if _WORKER.get("key") != (location, device):
        context = RunContext(open_artifacts(location), device=device, progress=False)
        _WORKER.update(key=(location, device), context=context)
    with threads(thread_count):
        out, seconds = run_cell(stage, _WORKER["context"], inputs, dict(zip(dep_keys, dep_payloads, strict=True)))
    return out.payload, (out.rows, seconds)
