"""The ``study`` stage: one of the registered studies (engine.runs.studies) as a cell of a run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.runs.cells import Cell, CellOutput, Inputs, Payload, reads
from engine.runs.context import RunContext
from engine.runs.overrides import merge
from engine.runs.studies import STUDIES


@dataclass(frozen=True, kw_only=True)
class StudyInputs(Inputs):
    """A registered study with the run's seed and its ``study.<name>`` overrides (merged over its defaults)."""

    study: str
    seed: int = reads("seed")
    overrides: dict[str, Any] = reads("study.{study}", absent={})

    def settings(self) -> dict[str, Any]:
        """The study's settings over its defaults: the run's seed, then ``study.<name>``."""
        return {"seed": self.seed, **self.overrides}


@dataclass(frozen=True, kw_only=True)
class StudyPayload(Payload):
    """The study's name and its own payload (what its report sections read)."""

    study: str
    payload: dict[str, Any]


def run_study(ctx: RunContext, inputs: StudyInputs, deps: Mapping[str, Any]) -> CellOutput:
    """Run the study named ``inputs.study`` with its settings; rows go to the store, the payload to the report."""
    name = inputs.study
    result = STUDIES[name].run(inputs.settings(), ctx.artifacts.root / "studies" / name, ctx)
    return CellOutput(StudyPayload(study=name, payload=result.payload), result.rows)


def study_cost(cell: Cell, machine: Any) -> tuple[str, float]:
    inputs = StudyInputs(**cell.inputs)
    study = STUDIES[inputs.study]
    settings = merge(study.defaults, inputs.settings(), name=f"{study.name} config")
    return f"study/{study.name}", study.cost(settings, machine)
