"""Executors decide where cells run; :class:`LocalExecutor` runs them in this process, in dependency order
(engine.runs.cluster.RayExecutor runs them as Ray tasks).

Contract for every executor: run each unfinished cell after its dependencies (through :func:`run_cell`, which
publishes the cell's artifacts before its result counts), commit each result to the store as it arrives (the
driver alone writes the store), report progress, and return the seconds spent per stage. A cell that raises stops
the run with :class:`CellFailed`, which names the cell; finished cells stay committed, so rerunning the same
command resumes.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from engine.models.memory import release_free_memory
from engine.runs.cells import Cell, CellOutput, Stage, topological
from engine.runs.context import threads
from engine.runs.progress import CostModel, Progress
from engine.runs.store import ResultStore


class CellFailed(Exception):
    """A cell raised; ``label`` names the cell and ``error`` is what it raised (also the ``__cause__``)."""

    def __init__(self, label: str, error: BaseException) -> None:
        super().__init__(f"{label}: {error}")
        self.label, self.error = label, error


def cell_error(exc: BaseException) -> tuple[str | None, BaseException]:
    """(the failed cell's label or None, what it raised) for an exception that may be a CellFailed; an executor's
    wrapping (a Ray task error) is already unwrapped into CellFailed.error."""
    label = None
    while isinstance(exc, CellFailed):
        label, exc = exc.label, exc.error
    return label, exc


class Executor(Protocol):
    trace: list[tuple[float, float]]  # (elapsed, predicted total) at every finished cell of the last run

    def run(
        self, cells: Sequence[Cell], store: ResultStore, context: Any, stages: Mapping[str, Stage], costs: CostModel
    ) -> dict[str, float]:
        """Run every unfinished cell (dependencies first); return seconds spent per stage in this invocation."""
        ...


def run_cell(
    stage: Stage, context: Any, inputs: Mapping[str, Any], deps: Mapping[str, dict[str, Any]]
) -> tuple[CellOutput, float]:
    """Run one cell on its JSON ``inputs`` (its rows get the cell's ``seed``), then publish the files it wrote
    (engine.runs.artifacts.Artifacts.publish); returns its output, with the payload as JSON, and seconds.
    ``context`` may be None for stages that need none."""
    start = time.perf_counter()
    try:
        out = stage(context, inputs, deps)
    finally:
        gc.collect()  # the cell's tensors (reference cycles included) go before the heap is trimmed
        release_free_memory()
    for row in out.rows:  # every row of a seeded cell carries its seed
        if row.get("seed") is None:
            row["seed"] = inputs.get("seed")
    if context is not None:
        context.artifacts.publish()
    return CellOutput(out.payload_json(), out.rows), time.perf_counter() - start


def resume(
    cells: Sequence[Cell], store: ResultStore, costs: CostModel, show: bool
) -> tuple[list[Cell], set[str], Progress]:
    """Where a run stands: its cells in dependency order, the keys of those already finished (their seconds go to
    the cost model) and the progress display."""
    order = topological(cells)
    finished = {key: seconds for key, _, seconds in store.cells()}
    for key, seconds in finished.items():
        costs.finished(key, seconds)
    return order, set(finished), Progress(order, set(finished), costs, enabled=show)


class LocalExecutor:
    """Runs cells one after another in this process, committing each to the store as it finishes, with ``threads``
    torch / BLAS / OpenMP threads (None: the process's own)."""

    def __init__(self, progress: bool = True, threads: int | None = None) -> None:
        self.progress = progress
        self.threads = threads
        self.trace: list[tuple[float, float]] = []  # (elapsed, predicted total) at every finished cell

    def run(
        self, cells: Sequence[Cell], store: ResultStore, context: Any, stages: Mapping[str, Stage], costs: CostModel
    ) -> dict[str, float]:
        order, finished, progress = resume(cells, store, costs, self.progress)
        timings: dict[str, float] = {}
        seed = None
        limit = threads(self.threads) if self.threads else contextlib.nullcontext()
        try:
            with limit:
                for cell in order:
                    if cell.key in finished:
                        continue
                    if context is not None and cell.inputs.get("seed", seed) != seed:
                        if seed is not None:  # a new seed's cells: what the last seed's held is not needed again
                            context.release()
                        seed = cell.inputs["seed"]
                    deps = {key: store.payload(key) for key in cell.deps}
                    progress.begin(cell.key)
                    try:
                        out, seconds = run_cell(stages[cell.stage], context, cell.inputs, deps)
                    except Exception as exc:
                        raise CellFailed(cell.label or cell.key, exc) from exc
                    store.commit(cell.key, cell.stage, out.payload, out.rows, seconds)
                    progress.end(cell.key, seconds)
                    timings[cell.stage] = timings.get(cell.stage, 0.0) + seconds
        finally:
            progress.close()
            self.trace = progress.trace
        return timings
