"""Score thresholds an auditor can check: the threshold flagging a chosen share of clean images, at any rate, with
the rate it realises on those images and that rate's exact (Clopper-Pearson) binomial interval; and calibrations
on a site's own clean images.

A fitted detector keeps the clean scores its thresholds came from (:meth:`Detector.set_thresholds`; in an audit the
correctly classified clean images of the evaluation split). A calibration (:func:`save_calibration`, ``hfc-engine
calibrate``) holds the scores of a site's own clean images, saved beside the detector as
``calibrations/<UTC time>.json`` with where they came from (the data spec), the data's and the model's fingerprints
and the date; a new calibration never replaces an earlier one. :func:`reference` picks the clean scores a threshold
is read from: the newest calibration (``"latest"``, the default), the fit's (``"fit"``) or a calibration by name.

Too few clean images: a threshold at rate ``fpr`` set on ``n`` clean images expects ``n * fpr`` of them flagged.
Below :data:`MIN_EXPECTED_FLAGS` (10, i.e. n < 10 / fpr: 200 images at 5%) it rests on a handful of the highest
clean scores and the realised rate's 95% interval is as wide as the rate itself (77 images at 5%: 3 flagged,
interval 0.8%-11%), so :attr:`Threshold.warning` says so.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from engine.detectors.base import Detector, fpr_threshold
from engine.errors import UserError
from engine.fileio import atomic_write
from engine.metrics import binomial_ci

MIN_EXPECTED_FLAGS = 10  # warn when a threshold expects fewer flagged clean images than this
LEVEL = 0.95  # level of the realised rate's interval
CALIBRATIONS = "calibrations"  # directory of a detector's calibrations
FIT = "fit"
LATEST = "latest"


class ThresholdError(UserError):
    """A false-positive rate or a calibration that cannot give a threshold."""


def check_fprs(values: float | Iterable[float]) -> tuple[float, ...]:
    """``values`` as distinct false-positive rates in (0, 1), in the order given; ThresholdError otherwise."""
    rates = [values] if isinstance(values, (int, float)) else list(values)
    bad = [v for v in rates if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1]
    if not rates or bad:
        raise ThresholdError(f"fpr must be one or more rates in (0, 1), e.g. 0.05, got {bad or rates}")
    return tuple(dict.fromkeys(float(v) for v in rates))


@dataclass(frozen=True)
class Threshold:
    """Detector ``detector``'s threshold ``value`` for clean false-positive rate ``fpr`` (flag: score > value), set
    on ``images`` clean images of which ``flagged`` score above it (None: not known, for a detector saved before
    its clean scores were), with the realised rate's exact interval; ``calibration`` names the clean scores
    (``fit`` or a calibration), ``source`` and ``date`` say where and when they came from."""

    detector: str
    fpr: float
    value: float
    images: int
    flagged: int | None
    ci_low: float
    ci_high: float
    calibration: str
    source: str
    date: str | None

    @property
    def realised_fpr(self) -> float:
        return math.nan if self.flagged is None else self.flagged / self.images

    @property
    def warning(self) -> str | None:
        """One line when the clean images are too few for the rate (see the module's rule), else None."""
        expected = self.images * self.fpr
        if expected >= MIN_EXPECTED_FLAGS:
            return None
        interval = f"; the realised rate's 95% interval is [{self.ci_low:.1%}, {self.ci_high:.1%}]"
        interval = "" if self.flagged is None else interval
        return (
            f"detector {self.detector}: the threshold for fpr {self.fpr:g} rests on {self.images} clean images "
            f"({expected:.1f} expected above it, fewer than {MIN_EXPECTED_FLAGS}){interval}: calibrate on at least "
            f"{math.ceil(MIN_EXPECTED_FLAGS / self.fpr)} clean images (hfc-engine calibrate)"
        )

    def __str__(self) -> str:
        above = "" if self.flagged is None else (
            f"; {self.flagged} of {self.images} clean images above it ({self.realised_fpr:.1%}, "
            f"{LEVEL:.0%} interval {self.ci_low:.1%}-{self.ci_high:.1%})"
        )  # fmt: skip
        return f"{self.detector} at fpr {self.fpr:g}: {self.value:.6g} ({self.calibration}{above})"

    def record(self) -> dict[str, object]:
        """As a JSON-ready dict, the realised rate and the warning included."""
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {**fields, "realised_fpr": self.realised_fpr, "ci_level": LEVEL, "warning": self.warning}


@dataclass(frozen=True)
class Reference:
    """The clean scores a detector's thresholds are read from: ``scores`` (None for a detector saved before they
    were kept: then only its ``recorded`` thresholds by rate), their number, name, source and date."""

    name: str
    source: str
    date: str | None
    images: int
    scores: np.ndarray | None = None
    recorded: dict[str, float] | None = None

    def threshold(self, detector: str, fpr: float) -> Threshold:
        """The threshold for rate ``fpr`` with its realised rate and interval."""
        if self.scores is None:
            if str(float(fpr)) not in self.recorded:
                raise ThresholdError(
                    f"fpr {fpr:g}: detector {detector} records thresholds only for {sorted(map(float, self.recorded))} "
                    "(saved before its clean scores were kept); calibrate it (hfc-engine calibrate) for other rates"
                )
            value, flagged, (low, high) = self.recorded[str(float(fpr))], None, (math.nan, math.nan)
        else:
            value = fpr_threshold(self.scores, fpr)
            flagged = int(np.count_nonzero(self.scores > value))
            low, high = binomial_ci(flagged, len(self.scores), LEVEL)
        return Threshold(detector, fpr, value, self.images, flagged, low, high, self.name, self.source, self.date)


def reference(detector: Detector, directory: str | os.PathLike[str] | None, which: str = LATEST) -> Reference | None:
    """The clean scores ``which`` (``latest``, ``fit`` or a calibration's name) of ``detector`` saved at
    ``directory``; None when it has none (fitted outside an audit without :meth:`Detector.set_thresholds`)."""
    calibrations = sorted((Path(directory) / CALIBRATIONS).glob("*.json")) if directory is not None else []
    if which == LATEST and calibrations:
        which = calibrations[-1].stem
    if which not in (FIT, LATEST):
        path = Path(directory or ".") / CALIBRATIONS / f"{which}.json"
        if not path.is_file():
            names = [p.stem for p in calibrations]
            raise ThresholdError(f"calibration {which!r} is not one of {detector.name}'s: {[FIT, *names]}")
        saved = json.loads(path.read_text())
        scores = np.asarray(saved["scores"], dtype=np.float64)
        return Reference(which, saved["source"], saved["date"], len(scores), scores)
    if detector.clean_scores_ is not None:
        return Reference(FIT, FIT, None, len(detector.clean_scores_), detector.clean_scores_)
    if detector.thresholds_:
        return Reference(FIT, FIT, None, int(detector.thresholds_["images"]), recorded=detector.thresholds_["fpr"])
    return None


def save_calibration(
    directory: str | os.PathLike[str], scores: np.ndarray, *, source: str, data: str, model: str,
    model_sha256: str | None = None,
) -> Path:  # fmt: skip
    """Save the clean ``scores`` of a detector saved at ``directory`` as a new calibration
    (``calibrations/<UTC time>.json``, never replacing one) recording their ``source`` (data spec), the data's
    and the model's fingerprints and the date; returns its path."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or not len(scores) or not np.isfinite(scores).all():
        raise ThresholdError(f"scores must be a non-empty (N,) array of finite values, got shape {scores.shape}")
    now = datetime.now(timezone.utc)
    folder = Path(directory) / CALIBRATIONS
    folder.mkdir(exist_ok=True)
    stem, k = now.strftime("%Y%m%dT%H%M%S%fZ"), 1
    while (folder / f"{stem}.json").exists():
        stem, k = f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{k}", k + 1
    record = {"source": source, "date": now.isoformat(timespec="seconds"), "images": len(scores), "data": data,
              "model": model, "model_sha256": model_sha256, "scores": scores.tolist()}  # fmt: skip
    return atomic_write(folder / f"{stem}.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
