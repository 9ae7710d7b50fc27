"""The run's artifact location and every artifact one stage writes and another reads, named once, here.

All artifacts live under one root (``<run dir>/artifacts`` by default). A directory is named by what it holds,
``<kind>/<readable label>-<key>`` (e.g. ``adversarial/fundus-synth_binary-pgd-2_256-hfc-3f2a9c01``), and payloads
refer to it by its path relative to the root (:meth:`Artifacts.ref`), so a run directory can be moved or mounted
elsewhere. Writes go through engine.fileio.atomic_write (write, fsync, rename).

Formats owned here: per-image detector scores (:func:`save_scores`, :func:`load_scores`) and feature projections
(:class:`Projection`); adversarial sets, HFC mixtures, fitted detectors and checkpoints keep the formats of the
packages that define them and are opened through the readers below.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from engine.attacks import load_adversarial, load_hfc_gmms
from engine.detectors import EvalScores
from engine.fileio import atomic_write
from engine.mixture import GaussianMixture

KINDS = ("splits", "models", "gmms", "adversarial", "detectors", "projections", "studies")
_SEP = "__"  # separates the parts of npz member names
SCORES_FILE = "scores.npz"


class AdversarialSet(NamedTuple):
    """An attack cell's output in pool order: images, whether each attack succeeded, the targets (if targeted)."""

    images: torch.Tensor
    success: np.ndarray
    target: np.ndarray | None


class Artifacts:
    """The artifact root of a run: where stages write files and how payloads name them."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def directory(self, kind: str, label: str, key: str) -> Path:
        """A (created) directory ``<root>/<kind>/<label>-<key>`` for one cell's artifact of ``kind``."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        path = self.root / kind / f"{slug(label)}-{key}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def ref(self, path: str | os.PathLike[str]) -> str:
        """How a payload names ``path``: relative to the root (absolute paths outside it stay absolute)."""
        path = Path(path)
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def path(self, ref: str) -> Path:
        """The file or directory a payload names (relative refs resolve against the root)."""
        path = Path(ref)
        return path if path.is_absolute() else self.root / path

    def publish(self) -> None:
        """Make the files written so far reachable from every worker; called when a cell finishes, before it is
        committed. A directory needs nothing (on a cluster it is a shared filesystem); an fsspec location uploads
        them (engine.runs.staging.StagedArtifacts)."""

    # -- readers of the formats other packages own ------------------------------------------------------------
    def adversarial(self, ref: str) -> AdversarialSet:
        """The adversarial set a payload names, in pool order."""
        stored = load_adversarial(self.path(ref))
        order = np.argsort(np.asarray(stored.meta["index"]))
        target = stored.meta.get("target")
        return AdversarialSet(
            images=stored.images[torch.as_tensor(order)],
            success=np.asarray(stored.meta["success"], dtype=bool)[order],
            target=None if target is None else np.asarray(target, dtype=np.int64)[order],
        )

    def gmms(self, ref: str) -> dict[str, list[GaussianMixture]]:
        return load_hfc_gmms(self.path(ref))


def slug(label: str) -> str:
    """A file-name-safe version of a label: runs of anything but letters, digits, '.', '-' become '_'."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", label).strip("_") or "artifact"


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    return atomic_write(path, write)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def save_scores(directory: Path, scores: EvalScores) -> Path:
    """Write one fitted detector's per-image evaluation scores (engine.detectors.EvalScores) as ``scores.npz``."""
    arrays = {"negatives": scores.negatives, "index": scores.index}
    for name in scores.adversarial:
        arrays[f"adversarial{_SEP}{name}"] = scores.adversarial[name]
        arrays[f"success{_SEP}{name}"] = scores.success[name]
    return _save_npz(directory / SCORES_FILE, arrays)


def load_scores(directory: Path) -> EvalScores:
    """Read what :func:`save_scores` wrote."""
    arrays = _load_npz(directory / SCORES_FILE)
    sets = [key.split(_SEP, 1)[1] for key in arrays if key.startswith(f"adversarial{_SEP}")]
    return EvalScores(
        negatives=arrays["negatives"],
        adversarial={name: arrays[f"adversarial{_SEP}{name}"] for name in sets},
        success={name: arrays[f"success{_SEP}{name}"].astype(bool) for name in sets},
        index=arrays["index"],
    )


@dataclass
class Projection:
    """GAP features of clean images, plain AEs and HFC AEs at a few layers: ``features[group][layer]`` (n, d)."""

    layers: list[str]
    features: dict[str, dict[str, np.ndarray]]

    GROUPS = ("clean", "plain AE", "HFC AE")
    FILE = "projection.npz"

    def save(self, directory: Path) -> Path:
        arrays: dict[str, Any] = {"layers": np.array(self.layers)}
        for g, group in enumerate(self.GROUPS):
            for j, layer in enumerate(self.layers):
                arrays[f"g{g}l{j}"] = self.features[group][layer]
        return _save_npz(directory / self.FILE, arrays)

    @classmethod
    def load(cls, directory: Path) -> Projection:
        arrays = _load_npz(directory / cls.FILE)
        layers = [str(name) for name in arrays["layers"]]
        features = {
            group: {layer: arrays[f"g{g}l{j}"] for j, layer in enumerate(layers)} for g, group in enumerate(cls.GROUPS)
        }
        return cls(layers, features)
