"""The embedded default datasets, generated offline and deterministically from a seed, cached on disk.

``synthetic("fundus-synth" | "cxr-synth" | "natural", n=3000, image_size=64, seed=0, task=...)`` returns an
``ArrayDataset``. Image i is drawn from ``numpy.random.default_rng([seed, i, salt])``, so the bytes depend only on
(name, task, n, image_size, seed, contrast, GENERATOR_VERSION), not on the number of worker processes.
The cache lives in ``$HFC_ENGINE_CACHE`` (default ``~/.cache/hfc-engine``)/synthetic; files are written to a
temporary name and renamed, and carry a checksum that is verified on load (a bad file is regenerated).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.base import ArrayDataset
from engine.data.image import to_uint8
from engine.data.synthetic import cxr, fundus, natural
from engine.data.synthetic.common import balanced_labels
from engine.errors import UserError
from engine.fileio import atomic_write

log = logging.getLogger("engine.data")
GENERATOR_VERSION = 1
PARALLEL_MIN_IMAGES = 256  # below this, generating in-process beats starting worker processes


@dataclass(frozen=True)
class _Spec:
    tasks: dict[str, list[str]]
    default_task: str
    channels: int
    salt: int


SPECS = {
    "fundus-synth": _Spec(fundus.CLASSES, "grade", 3, 11),
    "cxr-synth": _Spec({"pneumonia": cxr.CLASSES}, "pneumonia", 1, 23),
    "natural": _Spec(natural.CLASSES, "splice", 3, 37),
}


def cache_dir() -> Path:
    return Path(os.environ.get("HFC_ENGINE_CACHE") or Path.home() / ".cache" / "hfc-engine").expanduser()


def _plan(name: str, task: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, grades): class labels for the task, and for fundus-synth the DR grade behind each label."""
    if name == "fundus-synth":
        grades = balanced_labels(n, fundus.grade_weights(task), seed)
        return np.array([fundus.task_label(g, task) for g in grades], dtype=np.int64), grades
    labels = balanced_labels(n, np.ones(len(SPECS[name].tasks[task])), seed)
    return labels, labels


def _render_one(name: str, task: str, grade: int, size: int, rng: np.random.Generator, contrast: float):
    if name == "fundus-synth":
        return fundus.render(rng, grade, size, contrast)
    if name == "cxr-synth":
        return cxr.render(rng, grade, size, contrast)
    return natural.render(rng, grade, size, task, contrast)


def _render_chunk(name: str, task: str, size: int, seed: int, contrast: float, start: int, grades: np.ndarray):
    salt = SPECS[name].salt
    out = [
        _render_one(name, task, int(g), size, np.random.default_rng([seed, start + k, salt]), contrast)
        for k, g in enumerate(grades)
    ]
    return to_uint8(np.stack(out)).transpose(0, 3, 1, 2)


def generate(
    name: str,
    n: int = 3000,
    image_size: int = 64,
    seed: int = 0,
    task: str | None = None,
    contrast: float = 1.0,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a synthetic set without caching: (images uint8 (n, C, H, W), labels (n,), grades (n,))."""
    spec = _spec(name)
    task = task or spec.default_task
    if task not in spec.tasks:
        raise UserError(f"task: {name} has tasks {sorted(spec.tasks)}, got {task!r}")
    if int(n) < 1 or int(image_size) < 8:
        raise UserError(f"n >= 1 and image_size >= 8 expected, got n={n}, image_size={image_size}")
    n, size = int(n), int(image_size)
    labels, grades = _plan(name, task, n, seed)
    workers = workers or (min(2, os.cpu_count() or 1) if n >= PARALLEL_MIN_IMAGES else 1)
    t0 = time.perf_counter()
    if workers == 1:
        images = _render_chunk(name, task, size, seed, contrast, 0, grades)
    else:
        bounds = np.linspace(0, n, 4 * workers + 1).astype(int)
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            jobs = [
                pool.submit(_render_chunk, name, task, size, seed, contrast, int(a), grades[a:b])
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
                if b > a
            ]
            images = np.concatenate([j.result() for j in jobs])
    log.info("%s/%s: generated %d images at %dpx in %.1fs", name, task, n, size, time.perf_counter() - t0)
    return np.ascontiguousarray(images), labels, grades


def _spec(name: str) -> _Spec:
    if name not in SPECS:
        raise UserError(f"name: expected one of {sorted(SPECS)}, got {name!r}")
    return SPECS[name]


def _checksum(images: np.ndarray, labels: np.ndarray, grades: np.ndarray) -> str:
    h = hashlib.sha256()
    for arr in (images, labels, grades):
        h.update(str(arr.shape).encode() + np.ascontiguousarray(arr).data)
    return h.hexdigest()


def cache_path(name: str, task: str, n: int, image_size: int, seed: int, contrast: float) -> Path:
    key = f"{name}-{task}-n{n}-{image_size}px-seed{seed}-c{contrast:g}-v{GENERATOR_VERSION}"
    return cache_dir() / "synthetic" / f"{key}.npz"


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            images, labels, grades, digest = z["images"], z["labels"], z["grades"], str(z["checksum"])
        if _checksum(images, labels, grades) == digest:
            return images, labels, grades
        reason = "checksum mismatch"
    except Exception as err:  # noqa: BLE001 - a truncated/garbled zip raises many kinds of errors
        reason = f"{type(err).__name__}: {err}"
    log.warning("ignoring corrupt cache file %s (%s); regenerating", path, reason)
    return None


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray, grades: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a path
            np.savez(fh, images=images, labels=labels, grades=grades, checksum=_checksum(images, labels, grades))

    atomic_write(path, write)


def synthetic(
    name: str,
    n: int = 3000,
    image_size: int = 64,
    seed: int = 0,
    task: str | None = None,
    channels: int | None = None,
    contrast: float = 1.0,
    cache: bool = True,
    workers: int | None = None,
) -> ArrayDataset:
    """The embedded dataset ``name`` (see module docstring). ``contrast`` scales lesion strength (1 = the
    calibrated default); ``channels`` converts (e.g. 3 for cxr-synth); fundus-synth also sets ``.grades``."""
    spec = _spec(name)
    task = task or spec.default_task
    path = cache_path(name, task, int(n), int(image_size), int(seed), float(contrast))
    data = _read_cache(path) if cache else None
    if data is None:
        data = generate(name, n, image_size, seed, task, contrast, workers)
        if cache:
            _write_cache(path, *data)
    images, labels, grades = data
    ds = ArrayDataset(images, labels, spec.tasks[task], f"{name}-{task}", channels=channels)
    ds.grades = grades
    return ds
