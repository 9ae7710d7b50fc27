"""The ``data`` stage: load (or generate and cache) a dataset, split it, and record what each part holds.

Every later cell of the dataset depends on it; its payload says how many images and of which classes each split
holds, so a run's card and report show what the audit had to work with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.data import SYNTHETIC
from engine.data.synthetic import cache_path
from engine.runs.cells import Cell, CellOutput, Inputs, Payload, reads
from engine.runs.context import RunContext
from engine.runs.schema import dataset_label, fingerprint

GENERATION_SECONDS = 0.015  # per embedded image generated (measured at 32-64 px on 2 cores), once, then cached
DECODE_SECONDS = 0.005  # per image file decoded from disk


@dataclass(frozen=True, kw_only=True)
class DataInputs(Inputs):
    """A dataset split for one run seed (every later cell of the dataset extends these inputs)."""

    dataset: dict[str, Any]  # the dataset spec: a ``datasets`` entry (a generated one seeded per run seed)
    seed: int = reads("seed")
    split: dict[str, float] = reads("split")


@dataclass(frozen=True, kw_only=True)
class DataPayload(Payload):
    """Images and class counts per split part, the split's hash and its index file."""

    n: int
    classes: list[str]
    counts: dict[str, list[int]]
    split_hash: str
    split_file: str


def run_data(ctx: RunContext, inputs: DataInputs, deps: Mapping[str, Any]) -> CellOutput:
    """Load and split the dataset; save the split indices; report the class counts of each part."""
    spec, split, seed = inputs.dataset, inputs.split, inputs.seed
    splits = ctx.splits(spec, split, seed)
    directory = ctx.artifacts.directory("splits", dataset_label(spec), fingerprint([spec, split, seed]))
    splits.save(directory / "splits.json")
    classes = list(splits.dataset.classes)
    counts = {
        part: np.bincount(np.asarray(getattr(splits, part).targets), minlength=len(classes)).tolist()
        for part in ("train", "val", "test")
    }
    payload = DataPayload(
        n=len(splits.dataset),
        classes=classes,
        counts=counts,
        split_hash=splits.hash,
        split_file=ctx.artifacts.ref(directory / "splits.json"),
    )
    return CellOutput(payload)


def data_cost(cell: Cell, machine: Any) -> tuple[str, float]:
    """Generating an embedded dataset the first time (then reading its cache), or decoding files."""
    spec = DataInputs(**cell.inputs).dataset
    n = int(spec.get("n", 1000))
    if spec["name"] in SYNTHETIC:
        task = spec.get("task") or SYNTHETIC[spec["name"]].default_task
        path = cache_path(spec["name"], task, n, int(spec.get("image_size", 64)), int(spec.get("seed", 0)), 1.0)
        return "data", 1.0 if path.is_file() else 2.0 + GENERATION_SECONDS * n
    return "data", DECODE_SECONDS * n
