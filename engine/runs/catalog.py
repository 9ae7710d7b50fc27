"""The fitted detectors of a run, found by what they are.

A run's ``detect`` cells each fit one detector for one (dataset, model, attack, eps) on plain AEs and score plain
and HFC AEs with it (the HFC protocol), so a fitted detector is named by the key
``<dataset>/<model>/<attack>/<eps>/<arm>/<detector>`` (e.g. ``fundus-synth_binary/resnet18/pgd/8-256/same/kd``):
each part is the row's label made file-name safe (:func:`engine.runs.artifacts.slug`), eps is written as on the
command line with ``-`` for ``/`` (``none`` for an attack without a budget), the detector layer arm only when the
run has arms, and a ``seed<k>`` part after the model when the run has several seeds. Whether the AEs were HFC
ones is not part of the key: the same fitted detector has an AUROC on both. Everything comes from the run's own
records: the cells of the config last run in the directory (the store's plan), their payloads (where the fitted
detector lives) and their rows (what it is, its AUROC with the bootstrap CI), never from directory names.

``select(run_dir, pattern)`` picks entries by a glob over the key (``fnmatch``, case-sensitive; ``*`` also spans
``/``, so ``fundus*/pgd/8-256/*`` matches every model's detectors). ``locate(paths, pattern)`` is how commands find
fitted detectors: a run directory stands for its entries matching the pattern, any other path for the saved detector
directories at or under it, each with its catalog key when it belongs to a run found above it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.runs.artifacts import Artifacts, slug
from engine.runs.run import CARD_FILE
from engine.runs.schema import Metric, Subset
from engine.runs.staging import is_url
from engine.runs.store import STORE_FILE, ResultStore

DETECTOR_FILE = "config.json"  # what a saved detector directory holds (engine.detectors.Detector.save)


class CatalogError(UserError):
    """A path or pattern that names no fitted detector, or a run whose detectors cannot be told apart."""


@dataclass(frozen=True)
class Auroc:
    """An AUROC of the audit (on the successful AEs) with its bootstrap 95% CI (NaN when not stored)."""

    value: float
    ci_low: float = math.nan
    ci_high: float = math.nan

    def __str__(self) -> str:
        if math.isnan(self.ci_low) or math.isnan(self.ci_high):
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


@dataclass(frozen=True)
class FittedDetector:
    """One fitted detector of a run: what it is, where it lives, how well it detected plain and HFC AEs."""

    dataset: str
    model: str
    attack: str
    eps: str | None
    detector: str
    path: Path
    auroc: Auroc | None
    auroc_hfc: Auroc | None
    arm: str | None = None
    seed: int | None = None
    several_seeds: bool = False

    @property
    def key(self) -> str:
        eps = "none" if self.eps is None else slug(self.eps.replace("/", "-"))
        parts = [slug(self.dataset), slug(self.model), *([f"seed{self.seed}"] if self.several_seeds else [])]
        parts += [slug(self.attack), eps, *([slug(self.arm)] if self.arm else []), slug(self.detector)]
        return "/".join(parts)


def catalog(run_dir: str | os.PathLike[str]) -> list[FittedDetector]:
    """The fitted detectors of the run in ``run_dir``, in plan order. Raises CatalogError if it is not a run
    directory, or if two detectors share a key (datasets or models with the same label)."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise CatalogError(f"{str(run_dir)!r} is not a run directory (no {STORE_FILE}; `hfc-engine run` makes one)")
    artifacts = Artifacts(_artifact_location(run_dir))
    with ResultStore(run_dir, readonly=True) as store:
        finished = [key for key, _, _ in store.cells("detect")]  # in the order they finished
        planned, done = store.plan(), set(finished)
        keys = finished if planned is None else [key for key in planned if key in done]
        keys = [key for key in keys if "fitted" in store.payload(key)]  # not a detector skipped for its model
        entries = [_entry(store.rows([key]), artifacts.path(store.payload(key)["fitted"])) for key in keys]
    if len({e.seed for e in entries}) > 1:
        entries = [dataclasses.replace(e, several_seeds=True) for e in entries]
    seen: dict[str, FittedDetector] = {}
    for entry in entries:
        if entry.key in seen:
            raise CatalogError(
                f"two fitted detectors of {str(run_dir)!r} are both {entry.key!r} ({seen[entry.key].path} and "
                f"{entry.path}): give the run's datasets distinct labels and its models distinct names"
            )
        seen[entry.key] = entry
    return entries


def select(run_dir: str | os.PathLike[str], pattern: str) -> list[FittedDetector]:
    """The fitted detectors of the run whose key matches the glob ``pattern``; CatalogError (listing a few keys)
    when none does."""
    entries = catalog(run_dir)
    chosen = [e for e in entries if fnmatchcase(e.key, pattern)]
    if not chosen:
        keys = [e.key for e in entries]
        some = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
        raise CatalogError(f"no fitted detector of {str(run_dir)!r} matches {pattern!r}; available: {some or 'none'}")
    return chosen


@dataclass(frozen=True)
class Located:
    """A saved detector directory and its catalog key (None when it belongs to no run found above it)."""

    path: Path
    key: str | None


def locate(paths: Sequence[str | os.PathLike[str]], pattern: str | None = None) -> list[Located]:
    """The fitted detectors ``paths`` name: a run directory's entries whose key matches ``pattern`` (all without
    it); any other path's saved detector directories (holding config.json) at or under it, keyed when a run
    directory above them lists them. CatalogError when a path names none, or ``pattern`` is given without a run."""
    if pattern is not None and not any(map(is_run, paths)):
        raise CatalogError(
            f"--select {pattern!r} picks detectors of a run directory; none of {list(map(str, paths))} is one"
        )
    found: list[Located] = []
    runs: dict[Path, dict[Path, str]] = {}
    for path in map(Path, paths):
        if is_run(path):
            found += [Located(e.path, e.key) for e in select(path, pattern or "*")]
            continue
        if not path.exists():
            raise CatalogError(f"detectors: {str(path)!r} does not exist")
        dirs = [path] if (path / DETECTOR_FILE).is_file() else sorted(p.parent for p in path.rglob(DETECTOR_FILE))
        if not dirs:
            raise CatalogError(f"detectors: no fitted detector (a directory with {DETECTOR_FILE}) under {str(path)!r}")
        found += [Located(d, _keys_in_run(d, runs).get(d.resolve())) for d in dirs]
    return found


def _keys_in_run(directory: Path, runs: dict[Path, dict[Path, str]]) -> dict[Path, str]:
    """Catalog keys by resolved detector directory of the run found above ``directory`` (memoised in ``runs``)."""
    run = next((p for p in directory.resolve().parents if is_run(p)), None)
    if run is None:
        return {}
    if run not in runs:
        runs[run] = {e.path.resolve(): e.key for e in catalog(run)}
    return runs[run]


def is_run(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a run directory (it holds a results store)."""
    return (Path(path) / STORE_FILE).is_file()


def _artifact_location(run_dir: Path) -> Path:
    """The run's artifact directory: the run card's ``artifacts`` if set, else ``<run dir>/artifacts``."""
    card = run_dir / CARD_FILE
    location = json.loads(card.read_text())["config"].get("artifacts") if card.is_file() else None
    if location is None:
        return run_dir / "artifacts"
    if is_url(str(location)):
        raise CatalogError(
            f"the run in {str(run_dir)!r} keeps its artifacts at {location}; the catalog reads local ones"
        )
    return Path(location).expanduser()


def _entry(rows: list[dict[str, Any]], path: Path) -> FittedDetector:
    """A catalog entry from a detect cell's rows (its identity and AUROC rows) and its fitted directory."""
    auroc = {
        r["hfc"]: Auroc(r["value"], r["ci_low"], r["ci_high"])
        for r in rows
        if r["metric"] == Metric.AUROC and r["subset"] == Subset.SUCCESSFUL and not r.get("variant")  # main sets
    }
    first = rows[0]
    return FittedDetector(
        dataset=first["dataset"],
        model=first["model"],
        attack=first["attack"],
        eps=first["eps"],
        detector=first["detector"],
        path=path,
        auroc=auroc.get(False),
        auroc_hfc=auroc.get(True),
        arm=first.get("arm"),
        seed=first.get("seed"),
    )
