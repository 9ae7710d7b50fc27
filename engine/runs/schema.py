"""What every run produces and how its parts are named: the long-format result row, fingerprints and labels.

A result row has the columns :data:`ROW_COLUMNS`; ``metric`` is required, every other column may be None
(empty in the CSV). Rows go to the results store, ``results.csv`` / ``results.parquet`` and the
report. Fingerprints are short stable hashes of JSON-able objects; labels are the human-readable names rows carry.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

ROW_COLUMNS = (
    "dataset", "model", "seed", "attack", "eps", "hfc", "variant", "arm", "detector", "metric", "value", "ci_low",
    "ci_high",
)  # fmt: skip
# seed: the run seed of the cell (engine.runs.plan.run_seeds); variant: an HFC set beside the main one ("w0": weight
# 0 at HFC's schedule), "" for the main plain and HFC sets; arm: the detector layer arm (detector.arms)
NUMBER_COLUMNS = ("value", "ci_low", "ci_high")


def fingerprint(obj: Any) -> str:
    """A 12-hex-digit hash of a JSON-able object (keys sorted), stable across processes and machines."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dataset_label(spec: Mapping[str, Any]) -> str:
    """The ``dataset`` column of a dataset spec: its ``label`` if given, else 'name:task' or 'name'."""
    if spec.get("label"):
        return str(spec["label"])
    name = str(spec["name"])
    return f"{name}:{spec['task']}" if spec.get("task") else name


def row(metric: str, value: Any, **columns: Any) -> dict[str, Any]:
    """One result row; unknown columns raise ValueError naming them."""
    unknown = set(columns) - set(ROW_COLUMNS)
    if unknown:
        raise ValueError(f"row: unknown columns {sorted(unknown)}; allowed: {ROW_COLUMNS}")
    return normalise_row({**columns, "metric": metric, "value": value})


def normalise_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A row with every column present: eps as text, hfc as bool, numbers as float (NaN when missing), other
    columns as given (None when missing). Raises ValueError for unknown columns or a missing metric."""
    unknown = set(raw) - set(ROW_COLUMNS)
    if unknown:
        raise ValueError(f"result row has unknown columns {sorted(unknown)}; allowed: {ROW_COLUMNS}")
    if not raw.get("metric"):
        raise ValueError("result row needs a 'metric'")
    out: dict[str, Any] = {}
    for col in ROW_COLUMNS:
        value = raw.get(col)
        if col in NUMBER_COLUMNS:
            value = math.nan if value is None else float(value)
        elif value is not None and col == "eps":
            value = str(value)
        elif value is not None and col == "hfc":
            value = bool(value)
        elif value is not None and col == "seed":
            value = int(value)
        out[col] = value
    return out
