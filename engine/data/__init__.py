"""Datasets: loaders for real on-disk layouts, in-memory arrays, the embedded synthetic sets, and splits.

Every dataset is a ``torch.utils.data.Dataset`` of ``(image float32 (C, H, W) in [0, 1], label int)`` with
``.classes``, ``.targets`` (int64 numpy), ``.name``, ``.paths`` and ``.fingerprint``; plain ``DataLoader`` works.

>>> ds = load_dataset("fundus-synth", task="binary", n=3000, image_size=64)
>>> train, val, test = split_dataset(ds, val=0.15, test=0.15, seed=0)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from engine.data.base import ArrayDataset, FileDataset, ImageDataset, RelabelledDataset, SubsetDataset
from engine.data.batches import as_tensors, check_batch_size, iter_batches, to_unit_float
from engine.data.loaders import (
    UNLABELLED,
    aptos,
    arrays,
    chest_xray,
    detect_kind,
    dicom,
    image_csv,
    image_folder,
    medmnist,
    source_files,
)
from engine.data.splits import Splits, split_dataset
from engine.data.synthetic import SPECS as SYNTHETIC
from engine.data.synthetic import synthetic
from engine.errors import UserError, UserTypeError
from engine.fileio import file_sha256

LOADERS: dict[str, Callable[..., ImageDataset]] = {
    "image_folder": image_folder,
    "image_csv": image_csv,
    "chest_xray": chest_xray,
    "aptos": aptos,
    "medmnist": medmnist,
    "dicom": dicom,
    "arrays": arrays,
}

__all__ = [
    "LOADERS",
    "SYNTHETIC",
    "UNLABELLED",
    "ArrayDataset",
    "FileDataset",
    "ImageDataset",
    "RelabelledDataset",
    "Splits",
    "SubsetDataset",
    "aptos",
    "arrays",
    "content_fingerprint",
    "as_tensors",
    "check_batch_size",
    "chest_xray",
    "dicom",
    "image_csv",
    "image_folder",
    "iter_batches",
    "load_dataset",
    "loader_kind",
    "medmnist",
    "split_dataset",
    "synthetic",
    "to_unit_float",
]


def loader_kind(name: str) -> str:
    """A loader's name as users may write it (``image-folder``, ``ImageFolder``) -> its key in LOADERS."""
    return name.strip().lower().replace("-", "_").replace("imagefolder", "image_folder")


def load_dataset(spec: str | dict[str, Any] | Path, **kwargs: Any) -> ImageDataset:
    """Resolve ``spec`` to a dataset. Accepted forms:

    - a synthetic name, optionally with its task: ``"fundus-synth"``, ``"fundus-synth:binary"``, ``"cxr-synth"``,
      ``"natural"`` (keyword options: n, image_size (generation size, default 64), seed, task, channels);
    - ``"<kind>:<path>"`` with kind in image_folder, image_csv, chest_xray, aptos, medmnist, dicom;
    - an existing path (the kind is detected: .npz, .csv, DICOM, APTOS csv, Kaggle chest-xray folders, else
      ImageFolder);
    - a dict ``{"kind" or "name": ..., "path" or "root": ..., **options}`` (``{"kind": "arrays", "images": ...,
      "labels": ..., "name": ...}`` for in-memory data); with ``kind``, ``name`` is the dataset's name.
    ``kwargs`` (e.g. ``image_size``, ``channels``, ``task``, ``split``) are passed to the loader."""
    if isinstance(spec, dict):
        opts = dict(spec)
        name = opts.pop("kind", None) or opts.pop("name", None)  # with a kind, 'name' names the data
        if name is None:
            raise UserError(f"spec: a dict spec needs a 'name' or 'kind' key, got keys {sorted(spec)}")
        path = opts.pop("path", None) or opts.pop("root", None)
        return _resolve(str(name), None if path is None else str(path), {**opts, **kwargs})
    if isinstance(spec, Path):
        return _resolve(detect_kind(spec), str(spec), kwargs)
    if not isinstance(spec, str):
        raise UserTypeError(f"spec: expected a str, Path or dict, got {type(spec).__name__}")
    head, sep, tail = spec.partition(":")
    if spec in SYNTHETIC or (sep and head in SYNTHETIC):
        return _resolve(head, None, {**({"task": tail} if tail else {}), **kwargs})
    if sep and loader_kind(head) in LOADERS:
        return _resolve(head, tail, kwargs)
    if Path(spec).expanduser().exists():
        return _resolve(detect_kind(spec), spec, kwargs)
    raise UserError(
        f"spec: {spec!r} is neither a synthetic dataset {sorted(SYNTHETIC)}, '<kind>:<path>' with kind in "
        f"{sorted(LOADERS)}, nor an existing path"
    )


def content_fingerprint(spec: Mapping[str, Any]) -> str | None:
    """A hash (16 hex digits) of everything a dict dataset spec reads from disk: each file's name (relative to the
    data's folder, so it carries the class folder) and the sha256 of its bytes, labels CSVs included
    (:func:`engine.data.loaders.source_files`). None for data the spec alone determines (synthetic sets) or that
    is not on disk (in-memory sets). Hashing reads every byte once per process (about 0.7 GB/s with SHA-NI):
    less than decoding the images, which loading does anyway, and unlike size + mtime it cannot miss a file
    copied over another with its times kept."""
    name = str(spec.get("kind") or spec.get("name"))
    path = spec.get("path") or spec.get("root")
    if name in SYNTHETIC or path is None:
        return None
    digest = hashlib.sha256()
    for relative, file in source_files(str(path), str(spec.get("path_column", "path"))):
        digest.update(f"{relative}\x00{file_sha256(file)}\n".encode())
    return digest.hexdigest()[:16]


def _resolve(name: str, path: str | None, opts: dict[str, Any]) -> ImageDataset:
    if name in SYNTHETIC:
        return synthetic(name, **opts)
    kind = loader_kind(name)
    if kind not in LOADERS:
        known = sorted(LOADERS) + sorted(SYNTHETIC)
        raise UserError(f"spec: unknown dataset kind {name!r}; expected one of {known}")
    if kind == "arrays":
        return arrays(**opts)
    if path is None:
        raise UserError(f"spec: loader {kind!r} needs a path (use '{kind}:<path>' or a dict with 'path')")
    return LOADERS[kind](path, **opts)
