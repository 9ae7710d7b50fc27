"""Cells and stages: a run is a graph of pure cells, each an instance of a registered stage.

A :class:`Stage` is a named pure function ``run(context, inputs, deps) -> CellOutput``: ``inputs`` are the cell's
parameters (an instance of the stage's :class:`Inputs` dataclass), ``deps`` maps each dependency key to that cell's
payload (a JSON dict; a stage reads it through the dependency stage's :class:`Payload` dataclass)
and ``context`` gives the live objects of this process (:class:`engine.runs.context.RunContext`: datasets, models,
the artifact location). A stage also estimates its cost (seconds on this machine, see engine.runs.progress).

A stage's inputs dataclass is its contract with the plan: every field that comes from the config names its config
key (:func:`reads`), so the plan fills those fields from the config and nothing else. A :class:`Cell` holds its
inputs as plain JSON data and names its stage by string, so it can be shipped to any worker; its key is a stable
hash of (stage, inputs, deps), so a config key changes the keys of exactly the cells that read it (and of their
dependants), and re-running the same config finds finished cells and skips them (``hint`` carries what the cost
estimate needs and is not part of the key).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def reads(key: str, *, when: str | None = None, absent: Any = dataclasses.MISSING) -> Any:
    """A field of a stage's inputs holding config key ``key`` (dotted, e.g. ``hfc.calibration.grid``; a ``{field}``
    part is the value of that field of the same inputs, e.g. ``detector.{detector}``). ``when`` names a boolean field:
    only cells where it is true read the key (the field is None in the others). ``absent`` is the value when the
    key's last part is missing from a free-form mapping (e.g. ``hfc.options.{attack}``)."""
    metadata = {"config": key, "when": when, "absent": absent}
    return field(metadata=metadata) if when is None else field(default=None, metadata=metadata)


def config_value(config: Mapping[str, Any], key: str, absent: Any = dataclasses.MISSING) -> Any:
    """The value of dotted ``key`` in ``config``; ``absent`` (when given) if its last part is missing."""
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    if last not in node and absent is not dataclasses.MISSING:
        return absent
    return node[last]


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """Base of a stage's inputs: fields declared with :func:`reads` come from the config; the plan gives the others
    (what the cell is: dataset, attack, eps, detector, the keys of the cells it reads, its label)."""

    @classmethod
    def from_config(cls: type[T], config: Mapping[str, Any], **given: Any) -> T:
        """The inputs of one cell: ``given`` fields, and every declared field read from ``config``."""
        values = dict(given)
        for f in dataclasses.fields(cls):
            if "config" not in f.metadata:
                continue
            if f.name in given:
                raise TypeError(f"{cls.__name__}.{f.name} reads config key {f.metadata['config']!r}; do not give it")
            when = f.metadata["when"]
            if when is None or given.get(when, getattr(cls, when, None)):
                key = f.metadata["config"].format(**given)
                values[f.name] = config_value(config, key, f.metadata["absent"])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class Payload:
    """Base of a stage's payload: what dependants read (``ModelPayload(**deps[key])``); stored as JSON."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CellOutput:
    """What a cell returns: a payload (passed to dependants; a :class:`Payload` or a JSON dict) and long-format
    metric rows."""

    payload: Payload | dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def payload_json(self) -> dict[str, Any]:
        return self.payload.to_json() if isinstance(self.payload, Payload) else self.payload


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
    """A kind of cell: its pure function, its cost estimate ``cost(cell, machine) -> (cost class, seconds)`` and its
    inputs type (a :class:`Inputs` dataclass, or ``dict`` for a stage of plain JSON inputs)."""

    name: str
    run: Callable[[Any, Any, Mapping[str, dict[str, Any]]], CellOutput]
    cost: Callable[[Cell, Any], tuple[str, float]]
    inputs: Callable[..., Any] = dict

    def __call__(self, context: Any, inputs: Mapping[str, Any], deps: Mapping[str, dict[str, Any]]) -> CellOutput:
        """Run the stage on a cell's JSON ``inputs`` (rebuilt as its inputs type)."""
        return self.run(context, self.inputs(**inputs), deps)


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
