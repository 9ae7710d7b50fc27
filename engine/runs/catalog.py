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
``/``, so ``fundus*/pgd/8-256/*`` matches every model's detectors).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.runs.artifacts import Artifacts, slug
from engine.runs.run import CARD_FILE
from engine.runs.staging import is_url
from engine.runs.store import STORE_FILE, ResultStore


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
    """The fitted detectors of the run in ``run_dir``, in plan order. Raises ValueError if it is not a run
    directory, or if two detectors share a key (datasets or models with the same label)."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise UserError(f"{str(run_dir)!r} is not a run directory (no {STORE_FILE}; `hfc-engine run` makes one)")
    artifacts = Artifacts(_artifact_location(run_dir))
    with ResultStore(run_dir) as store:
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
            raise UserError(
                f"two fitted detectors of {str(run_dir)!r} are both {entry.key!r} ({seen[entry.key].path} and "
                f"{entry.path}): give the run's datasets distinct labels and its models distinct names"
            )
        seen[entry.key] = entry
    return entries


def select(run_dir: str | os.PathLike[str], pattern: str) -> list[FittedDetector]:
    """The fitted detectors of the run whose key matches the glob ``pattern``; ValueError (listing a few keys)
    when none does."""
    entries = catalog(run_dir)
    chosen = [e for e in entries if fnmatchcase(e.key, pattern)]
    if not chosen:
        keys = [e.key for e in entries]
        some = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
        raise UserError(f"no fitted detector of {str(run_dir)!r} matches {pattern!r}; available: {some or 'none'}")
    return chosen


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
        raise UserError(f"the run in {str(run_dir)!r} keeps its artifacts at {location}; the catalog reads local ones")
    return Path(location).expanduser()


def _entry(rows: list[dict[str, Any]], path: Path) -> FittedDetector:
    """A catalog entry from a detect cell's rows (its identity and AUROC rows) and its fitted directory."""
    auroc = {
        r["hfc"]: Auroc(r["value"], r["ci_low"], r["ci_high"])
        for r in rows
        if r["metric"] == "auroc" and not r.get("variant")  # the main plain and HFC sets
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
