"""Deterministic, stratified train/val/test splits that are saved with a run and identified by a hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.data.base import ImageDataset, SubsetDataset
from engine.errors import UserError
from engine.fileio import atomic_write

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    """Indices of a dataset's train/val/test parts; ``train``/``val``/``test`` are contract-keeping subsets.

    ``hash`` identifies (dataset fingerprint, indices): record it in checkpoints. Unpacks as
    ``train, val, test = splits``."""

    dataset: ImageDataset
    indices: dict[str, np.ndarray]
    params: dict = field(default_factory=dict)

    def subset(self, part: str) -> SubsetDataset:
        if part not in PARTS:
            raise UserError(f"part: expected one of {PARTS}, got {part!r}")
        return SubsetDataset(self.dataset, self.indices[part], part)

    @property
    def train(self) -> SubsetDataset:
        return self.subset("train")

    @property
    def val(self) -> SubsetDataset:
        return self.subset("val")

    @property
    def test(self) -> SubsetDataset:
        return self.subset("test")

    def __iter__(self):
        return iter((self.train, self.val, self.test))

    @property
    def hash(self) -> str:
        h = hashlib.sha256(self.dataset.fingerprint.encode())
        for part in PARTS:
            h.update(part.encode() + np.asarray(self.indices[part], dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict:
        return {
            "format": "hfc-engine-splits/1",
            "dataset": self.dataset.name,
            "fingerprint": self.dataset.fingerprint,
            "n": len(self.dataset),
            "hash": self.hash,
            "params": self.params,
            **{part: [int(i) for i in self.indices[part]] for part in PARTS},
        }

    def save(self, path: str | Path) -> Path:
        """Write the indices (and hash, fingerprint, parameters) as JSON."""
        return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(self.to_dict())))

    @classmethod
    def load(cls, path: str | Path, dataset: ImageDataset, strict: bool = True) -> Splits:
        """Read splits saved by ``save`` and attach them to ``dataset``. With ``strict``, the dataset's fingerprint
        must match the one recorded (same images, labels and order)."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != "hfc-engine-splits/1":
            raise UserError(f"path: {str(path)!r} is not an hfc-engine splits file")
        if strict and data["fingerprint"] != dataset.fingerprint:
            raise UserError(
                f"dataset: fingerprint {dataset.fingerprint} differs from the split file's {data['fingerprint']} "
                f"(dataset {data['dataset']!r}, n={data['n']}); pass strict=False to use the indices anyway"
            )
        indices = {part: np.asarray(data[part], dtype=np.int64) for part in PARTS}
        top = max((int(ix.max()) for ix in indices.values() if ix.size), default=-1)
        if top >= len(dataset):
            raise UserError(f"dataset: split index {top} out of range for {len(dataset)} images")
        return cls(dataset, indices, data.get("params", {}))


def _fraction(value: float, name: str) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise UserError(f"{name}: expected a fraction in [0, 1), got {value!r}")
    return float(value)


def split_dataset(
    ds: ImageDataset, val: float = 0.15, test: float = 0.15, seed: int = 0, stratify: bool = True
) -> Splits:
    """Seeded split of ``ds`` into train/val/test. With ``stratify`` each class is split in the same proportions
    (per class: round(test*n_c) test, round(val*n_c) val, the rest train); indices are sorted within each part."""
    val, test = _fraction(val, "val"), _fraction(test, "test")
    if val + test >= 1.0:
        raise UserError(f"val + test: expected < 1, got {val + test}")
    targets = np.asarray(ds.targets)
    if targets.size == 0:
        raise UserError("ds: the dataset is empty")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(targets == c) for c in np.unique(targets)] if stratify else [np.arange(targets.size)]
    parts: dict[str, list[np.ndarray]] = {p: [] for p in PARTS}
    for group in groups:
        perm = rng.permutation(group)
        n_test = int(round(test * perm.size))
        n_val = min(int(round(val * perm.size)), perm.size - n_test)
        parts["test"].append(perm[:n_test])
        parts["val"].append(perm[n_test : n_test + n_val])
        parts["train"].append(perm[n_test + n_val :])
    indices = {p: np.sort(np.concatenate(v)).astype(np.int64) for p, v in parts.items()}
    params = {"val": val, "test": test, "seed": int(seed), "stratify": bool(stratify)}
    return Splits(ds, indices, params)
