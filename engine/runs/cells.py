"""Cells and stages: a run is a graph of pure cells, each an instance of a registered stage.

A :class:`Stage` is a named pure function ``run(context, inputs, deps) -> CellOutput``: ``inputs`` are the cell's
JSON-able parameters, ``deps`` maps each dependency key to that cell's payload, and ``context`` gives the live
objects of this process (:class:`engine.runs.context.RunContext`: datasets, models, the artifact location). A stage
also estimates its cost (seconds on this machine, see engine.runs.progress). A :class:`Cell` names its stage by
string, so it can be shipped to any worker; its key is a stable hash of (stage, inputs, deps), so re-running the
same config finds finished cells and skips them (``hint`` carries what the cost estimate needs and is not part of
the key).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CellOutput:
    """What a cell returns: a JSON-able payload (passed to dependants) and long-format metric rows."""

    payload: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Cell:
    """One unit of work: a stage applied to JSON-able inputs, after the cells whose keys are in ``deps``."""

    stage: str
    inputs: Mapping[str, Any]
    deps: tuple[str, ...] = ()
    label: str = ""
    hint: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)  # for cost estimates only

    @property
    def key(self) -> str:
        blob = json.dumps({"stage": self.stage, "inputs": self.inputs, "deps": self.deps}, sort_keys=True)
        return f"{self.stage}:{hashlib.sha1(blob.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class Stage:
    """A kind of cell: its pure function and its cost estimate ``cost(cell, machine) -> (cost class, seconds)``."""

    name: str
    run: Callable[[Any, Mapping[str, Any], Mapping[str, dict[str, Any]]], CellOutput]
    cost: Callable[[Cell, Any], tuple[str, float]]


def topological(cells: Sequence[Cell]) -> list[Cell]:
    """Cells ordered so every dependency comes first (otherwise in the given order); unknown dependencies or
    cycles raise ValueError."""
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
