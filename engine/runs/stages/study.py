"""The ``study`` stage: one of the registered studies (engine.runs.studies) as a cell of a run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.runs.cells import Cell, CellOutput
from engine.runs.context import RunContext
from engine.runs.overrides import merge
from engine.runs.studies import STUDIES


def run_study(ctx: RunContext, inputs: Mapping[str, Any], deps: Mapping[str, Any]) -> CellOutput:
    """Run the study named ``inputs["study"]`` with its settings; rows go to the store, the payload to the report."""
    name = inputs["study"]
    result = STUDIES[name].run(inputs["config"], ctx.artifacts.root / "studies" / name, ctx)
    return CellOutput({"study": name, "payload": result.payload}, result.rows)


def study_cost(cell: Cell, machine: Any) -> tuple[str, float]:
    study = STUDIES[cell.inputs["study"]]
    settings = merge(study.defaults, cell.inputs["config"], name=f"{study.name} config")
    return f"study/{study.name}", study.cost(settings, machine)
