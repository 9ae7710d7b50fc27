"""Adversarial sets on disk, written incrementally: one shard per appended batch plus a JSON manifest.

Layout of a store directory::

    manifest.json        {"version", "classes", "name", "dtype", "format", "meta_keys", "shards": [{"file", "n"}]}
    shard_000000.npz     images (n,C,H,W) float32 or uint8, labels (n,), one array per metadata key
    ...

Each shard is written to a temporary name, flushed to disk and renamed; only then is the manifest rewritten the
same way (write-then-rename, atomic on POSIX). The manifest is the single source of truth: a run killed at any
point leaves every shard listed in it intact and loadable, and a shard file not (yet) listed is ignored and
overwritten when the writer resumes. Nothing is ever rewritten except the small manifest.

``dtype="uint8"`` quantises pixels to round(255 x) / 255 (4x smaller; moves each pixel by at most 0.5/255, so a
stored L-inf perturbation may exceed its eps by that much).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.errors import UserError
from engine.fileio import atomic_write

MANIFEST = "manifest.json"
FORMATS = ("npz", "pt")
DTYPES = ("float32", "uint8")


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temporary file and rename it to ``path`` (engine.fileio.atomic_write)."""

    def write_file(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            write(fh)

    atomic_write(path, write_file)


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class AdvWriter:
    """Append batches of adversarial images (with labels and per-sample metadata) to a store directory.

    Args:
        directory: created if missing; an existing store is resumed (its classes, dtype and format must match).
        classes: class names, as the source dataset's ``.classes``.
        dtype: "float32" or "uint8" (quantised).
        fmt: shard format, "npz" or "pt".
        name: a dataset name recorded in the manifest.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        classes: Sequence[str],
        dtype: str = "float32",
        fmt: str = "npz",
        name: str = "adversarial",
    ) -> None:
        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if fmt not in FORMATS:
            raise UserError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        if isinstance(classes, str) or not classes:
            raise UserError(f"classes must be a non-empty sequence of class names, got {classes!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = _read_manifest(self.directory)
        wanted = {"classes": [str(c) for c in classes], "dtype": dtype, "format": fmt}
        if existing is None:
            self.manifest = {"version": 1, "name": name, **wanted, "meta_keys": None, "shards": []}
        else:
            clash = {k: (existing[k], v) for k, v in wanted.items() if existing[k] != v}
            if clash:
                raise UserError(f"{self.directory} holds a store with other settings (stored, asked): {clash}")
            self.manifest = existing

    @property
    def num_samples(self) -> int:
        return sum(s["n"] for s in self.manifest["shards"])

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def stored_indices(self) -> np.ndarray:
        """Values of the ``index`` metadata already stored (to skip finished samples when resuming)."""
        if self.num_shards == 0:
            return np.zeros(0, dtype=np.int64)
        if "index" not in (self.manifest["meta_keys"] or []):
            raise UserError("this store has no 'index' metadata; pass index=... to append")
        return np.asarray(load_adversarial(self.directory).meta["index"])

    def append(self, images: Any, labels: Any, **meta: Any) -> int:
        """Write one shard: images (n,C,H,W) in [0,1], labels (n,), metadata arrays (n,) such as ``index``,
        ``target``, ``success``; returns the number of samples now stored."""
        images, labels = _to_numpy(images), _to_numpy(labels)
        if images.ndim < 2 or not np.issubdtype(images.dtype, np.floating):
            raise UserError(f"images must be a float array (n, C, H, W), got {images.dtype} {images.shape}")
        n = images.shape[0]
        if n and not (0.0 <= float(images.min()) and float(images.max()) <= 1.0):
            raise UserError("images must hold values in [0,1]")
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
        missing = [key for key, value in meta.items() if value is None]
        if missing:
            raise ValueError(
                f"metadata {missing} is None: leave such keys out (an untargeted attack's result has no target; "
                "append_result does this)"
            )
        arrays = {key: _to_numpy(value) for key, value in meta.items()}
        for key, value in arrays.items():
            if value.shape[:1] != (n,):
                raise UserError(f"metadata {key!r} must have {n} rows (one per image), got shape {value.shape}")
        keys = sorted(arrays)
        if self.manifest["meta_keys"] is not None and keys != self.manifest["meta_keys"]:
            raise UserError(f"metadata keys must match earlier shards {self.manifest['meta_keys']}, got {keys}")
        if self.manifest["dtype"] == "uint8":
            images = np.round(images * 255.0).astype(np.uint8)
        else:
            images = images.astype(np.float32)
        payload = {"images": images, "labels": labels.astype(np.int64), **{f"meta_{k}": arrays[k] for k in keys}}
        fname = f"shard_{self.num_shards:06d}.{self.manifest['format']}"
        if self.manifest["format"] == "npz":
            _atomic_write(self.directory / fname, lambda fh: np.savez(fh, **payload))
        else:
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in payload.items()}
            _atomic_write(self.directory / fname, lambda fh: torch.save(tensors, fh))
        self.manifest["meta_keys"] = keys
        self.manifest["shards"].append({"file": fname, "n": int(n)})
        text = json.dumps(self.manifest, indent=1).encode()
        _atomic_write(self.directory / MANIFEST, lambda fh: fh.write(text))
        return self.num_samples

    def append_result(self, result: Any, index: Any, labels: Any = None) -> int:
        """Append an :class:`engine.attacks.AttackResult` with ``index`` (original dataset positions) and its
        target and success flags; ``labels`` defaults to ``result.labels`` (required for targeted=True)."""
        labels = result.labels if labels is None else labels
        if labels is None:
            raise UserError("labels are required: this result holds targets only (targeted=True)")
        meta = {"index": index, "success": result.success}
        if result.target is not None:
            meta["target"] = result.target
        return self.append(result.adv, labels, **meta)


class AdvDataset(Dataset):
    """A stored adversarial set as a Dataset of (image float32 (C,H,W) in [0,1], int label).

    ``.classes``, ``.targets`` (labels, np.int64), ``.name`` as every engine dataset, plus ``.meta`` (per-sample
    metadata arrays, e.g. ``index``, ``target``, ``success``).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        manifest = _read_manifest(self.directory)
        if manifest is None:
            raise UserError(f"{self.directory} holds no {MANIFEST}; write it with AdvWriter")
        self.classes = list(manifest["classes"])
        self.name = manifest["name"]
        shards = [self._read(s["file"], manifest["format"]) for s in manifest["shards"]]
        keys = manifest["meta_keys"] or []
        if shards:
            self._images = np.concatenate([s["images"] for s in shards])
            self.targets = np.concatenate([s["labels"] for s in shards])
            self.meta = {k: np.concatenate([s[f"meta_{k}"] for s in shards]) for k in keys}
        else:
            self._images = np.zeros((0,), np.float32)
            self.targets = np.zeros(0, np.int64)
            self.meta = {}

    def _read(self, fname: str, fmt: str) -> dict[str, np.ndarray]:
        path = self.directory / fname
        if fmt == "npz":
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.asarray(self._images[i]))
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image
        return image, int(self.targets[i])

    @property
    def images(self) -> torch.Tensor:
        """All images as one float32 tensor (N,C,H,W)."""
        images = torch.from_numpy(self._images)
        return images.float() / 255.0 if images.dtype == torch.uint8 else images


def load_adversarial(directory: str | os.PathLike) -> AdvDataset:
    """Open a store written by :class:`AdvWriter` as a dataset."""
    return AdvDataset(directory)


__all__ = ["AdvWriter", "AdvDataset", "load_adversarial"]
