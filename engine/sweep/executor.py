"""Cells and executors: a run is a list of pure cells executed in dependency order against a ResultStore.

A :class:`Cell` names a pure function ``fn(inputs, deps, workdir) -> CellOutput``: ``inputs`` are its JSON-able
parameters, ``deps`` maps each dependency key to that cell's payload, and ``workdir`` is the run's artifact
directory where it may write files (with engine.fileio.atomic_write) referenced from its payload. The key is a
stable hash of (stage, inputs), so re-running the same config finds finished cells and skips them.
Executors decide *where* cells run; :class:`LocalExecutor` runs them in-process, in order. A distributed
executor only needs to implement :meth:`Executor.run` with the same contract.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from engine.sweep.store import ResultStore


@dataclass
class CellOutput:
    """What a cell returns: a JSON-able payload (passed to dependants) and long-format metric rows."""

    payload: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Cell:
    stage: str
    fn: Callable[[Mapping[str, Any], Mapping[str, dict[str, Any]], Path], CellOutput]
    inputs: Mapping[str, Any]
    deps: tuple[str, ...] = ()
    label: str = ""

    @property
    def key(self) -> str:
        blob = json.dumps({"stage": self.stage, "inputs": self.inputs, "deps": self.deps}, sort_keys=True)
        return f"{self.stage}:{hashlib.sha1(blob.encode()).hexdigest()[:16]}"


class Executor(Protocol):
    def run(self, cells: Sequence[Cell], store: ResultStore) -> dict[str, float]:
        """Run every unfinished cell (dependencies first); return seconds spent per stage."""
        ...


class LocalExecutor:
    """Runs cells one after another in this process, committing each to the store as it finishes."""

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def run(self, cells: Sequence[Cell], store: ResultStore) -> dict[str, float]:
        order = topological(cells)
        timings: dict[str, float] = {}
        todo = [c for c in order if not store.done(c.key)]
        bar = tqdm(
            total=len(order), initial=len(order) - len(todo), desc="audit", unit="cell", disable=not self.progress
        )
        for cell in todo:
            bar.set_postfix_str(cell.label or cell.stage, refresh=True)
            deps = {key: store.payload(key) for key in cell.deps}
            start = time.perf_counter()
            out = cell.fn(cell.inputs, deps, store.artifacts)
            seconds = time.perf_counter() - start
            store.commit(cell.key, cell.stage, out.payload, out.rows, seconds)
            timings[cell.stage] = timings.get(cell.stage, 0.0) + seconds
            bar.update(1)
        bar.close()
        return timings


def topological(cells: Sequence[Cell]) -> list[Cell]:
    """Cells ordered so every dependency comes first; unknown dependencies or cycles raise ValueError."""
    by_key = {c.key: c for c in cells}
    ordered: list[Cell] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(cell: Cell) -> None:
        if state.get(cell.key) == 2:
            return
        if state.get(cell.key) == 1:
            raise ValueError(f"dependency cycle through cell {cell.label or cell.key}")
        state[cell.key] = 1
        for dep in cell.deps:
            if dep not in by_key:
                raise ValueError(f"cell {cell.label or cell.key} depends on unknown cell {dep}")
            visit(by_key[dep])
        state[cell.key] = 2
        ordered.append(cell)

    for cell in cells:
        visit(cell)
    return ordered
