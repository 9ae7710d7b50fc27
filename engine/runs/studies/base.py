"""What every study is: a registered experiment with defaults, a run function and its report sections.

A study runs as one cell of a run (stage ``study``): ``run(settings, workdir, context) -> StudyResult`` with
``settings`` merged over ``defaults``; ``sections(payload)`` renders its part of the report from the payload
alone, so a payload read back from a results store renders the same report. ``cost(settings, machine)`` estimates
its seconds for the progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.runs.schema import Metric, row


@dataclass
class StudyResult:
    """A finished study: long-format ``rows`` and a JSON-able ``payload`` (what the report sections read)."""

    name: str
    rows: list[dict[str, Any]]
    payload: dict[str, Any]
    seconds: float = 0.0


@dataclass(frozen=True)
class Study:
    """A registry entry: the study's run function, defaults, tiny settings (for tests), report sections and cost."""

    name: str
    title: str
    run: Callable[[Mapping[str, Any], Path, Any], StudyResult]
    defaults: Mapping[str, Any]
    tiny: Mapping[str, Any]
    sections: Callable[[Mapping[str, Any]], list[Any]]
    cost: Callable[[Mapping[str, Any], Any], float]


def study_row(dataset: str, model: str, metric: Metric, value: float, **extra: Any) -> dict[str, Any]:
    """A study's result row: no detector and no HFC; attack '' and eps None unless given."""
    return row(metric, value, **{"dataset": dataset, "model": model, "attack": "", "eps": None, "hfc": False,
                                 "detector": "", **extra})  # fmt: skip
