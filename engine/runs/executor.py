"""Executors decide where cells run; :class:`LocalExecutor` runs them in this process, in dependency order.

Contract for every executor: run each unfinished cell after its dependencies, commit each result to the store
as it arrives (the driver alone writes the store), report progress, and return the seconds spent per stage.
A cell that raises stops the run with :class:`CellFailed`, which names the cell; finished cells stay committed,
so rerunning the same command resumes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from engine.runs.cells import Cell, Stage, topological
from engine.runs.progress import CostModel, Progress
from engine.runs.store import ResultStore


class CellFailed(Exception):
    """A cell raised; ``label`` names the cell and ``error`` is what it raised (also the ``__cause__``)."""

    def __init__(self, label: str, error: BaseException) -> None:
        super().__init__(f"{label}: {error}")
        self.label, self.error = label, error


class Executor(Protocol):
    def run(
        self, cells: Sequence[Cell], store: ResultStore, context: Any, stages: Mapping[str, Stage], costs: CostModel
    ) -> dict[str, float]:
        """Run every unfinished cell (dependencies first); return seconds spent per stage in this invocation."""
        ...


class LocalExecutor:
    """Runs cells one after another in this process, committing each to the store as it finishes."""

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress
        self.trace: list[tuple[float, float]] = []  # (elapsed, predicted total) at every finished cell

    def run(
        self, cells: Sequence[Cell], store: ResultStore, context: Any, stages: Mapping[str, Stage], costs: CostModel
    ) -> dict[str, float]:
        order = topological(cells)
        finished = {key: seconds for key, _, seconds in store.cells()}
        for key, seconds in finished.items():
            costs.finished(key, seconds)
        progress = Progress(order, set(finished), costs, enabled=self.progress)
        timings: dict[str, float] = {}
        try:
            for cell in order:
                if cell.key in finished:
                    continue
                deps = {key: store.payload(key) for key in cell.deps}
                progress.begin(cell.key)
                start = time.perf_counter()
                try:
                    out = stages[cell.stage].run(context, cell.inputs, deps)
                except Exception as exc:
                    raise CellFailed(cell.label or cell.key, exc) from exc
                seconds = time.perf_counter() - start
                store.commit(cell.key, cell.stage, out.payload, out.rows, seconds)
                progress.end(cell.key, seconds)
                timings[cell.stage] = timings.get(cell.stage, 0.0) + seconds
        finally:
            progress.close()
            self.trace = progress.trace
        return timings
