"""What every run produces and how its parts are named: the long-format result row, its metric vocabulary,
fingerprints and labels.

A result row has the columns :data:`ROW_COLUMNS`. ``metric`` is a bare name of :class:`Metric`; which part of the
data it was measured on is a column of its own: ``subset`` (for detection metrics a :class:`Subset`, e.g. AUROC on
the ``paired`` images; for the diagnostics the image set; for a study its own split), ``layer`` (a model layer, for
per-layer metrics). ``eps_value`` is ``eps`` as a number; ``ci_level`` is set on rows with an interval
(``ci_low``/``ci_high``); ``n_neg``/``n_pos`` count the negatives and positives a detection metric was measured on
(for a success rate: the failed and the successful attacks). :func:`row` is the one constructor of rows; every
column but ``metric`` may be None (empty in the CSV). Rows go to the results store, ``results.csv`` /
``results.parquet`` and the report. Fingerprints are short stable hashes of JSON-able objects; labels are the
human-readable names rows carry.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from engine.attacks.base import parse_eps

ROW_COLUMNS = (
    "dataset", "model", "seed", "attack", "eps", "eps_value", "hfc", "variant", "arm", "detector", "metric", "subset",
    "layer", "value", "ci_low", "ci_high", "ci_level", "n_neg", "n_pos",
)  # fmt: skip
# seed: the run seed of the cell (engine.runs.plan.run_seeds); variant: an HFC set beside the main one ("w0": weight
# 0 at HFC's schedule), "" for the main plain and HFC sets; arm: the detector layer arm (detector.arms)
NUMBER_COLUMNS = ("eps_value", "value", "ci_low", "ci_high", "ci_level")
COUNT_COLUMNS = ("seed", "n_neg", "n_pos")
CI_LEVEL = 0.95  # the level of every interval the engine reports (bootstrap, t and binomial)


class Metric(StrEnum):
    """Every metric a row can carry: what the stages, the studies and the report write and read."""

    # model stage: clean test metrics (auc: 2 classes, kappa: more), the conversion's forward and gradient parity
    CLEAN_LOSS = "clean_loss"
    CLEAN_ACCURACY = "clean_accuracy"
    CLEAN_AUC = "clean_auc"
    CLEAN_KAPPA = "clean_kappa"
    CONVERSION_MAX_ABS_DIFF = "conversion_max_abs_diff"
    CONVERSION_GRADIENT_REL_ERROR = "conversion_gradient_rel_error"
    # attack and calibrate stages
    ATTACK_SUCCESS_RATE = "attack_success_rate"  # on the correctly classified pool, exact binomial interval
    HFC_LAM = "hfc_lam"
    HFC_CALIBRATION_SUCCESS = "hfc_calibration_success"
    # detect stage (engine.metrics.roc.METRICS, plus the other orientation's AUROC)
    AUROC = "auroc"
    AUROC_REVERSED = "auroc_reversed"
    TPR_AT_TNR90 = "tpr_at_tnr90"
    TNR_AT_TPR95 = "tnr_at_tpr95"
    PAUC_FPR10 = "pauc_fpr10"
    DETECTION_ACCURACY = "detection_accuracy"
    NOT_MEASURABLE = "not_measurable"  # value: the successful AEs there were; the reason is in the cell's payload
    # features stage: per layer, and the diagnostics per image set (subset)
    FEATURE_LOGLIK = "feature_loglik"
    DIAG_LOGIT_MARGIN = "diag_logit_margin"
    DIAG_MC_VARIANCE = "diag_mc_variance"
    DIAG_LOGLIK = "diag_loglik"
    # the stress study: per layer, on the fooled (successful) or all attacked images
    FEATURE_DEVIATION = "feature_deviation"
    SHIFT_COSINE = "shift_cosine"
    MAHA_AUROC = "maha_auroc"
    MAHA_DISTANCE_RATIO = "maha_distance_ratio"
    # the UAP study: under attack, gains, and the clean tests over folds or seeds (subset)
    KAPPA = "kappa"
    ACCURACY = "accuracy"
    FOOLING_RATE = "fooling_rate"
    KAPPA_GAIN = "kappa_gain"
    KAPPA_GAIN_MEAN = "kappa_gain_mean"  # subset: the relation of the attack to the fine-tuning one
    CLEAN_KAPPA_DIFF_VS_BASELINE = "clean_kappa_diff_vs_baseline"
    TOST_P_CLEAN_KAPPA = "tost_p_clean_kappa"
    TTEST_P_CLEAN_KAPPA = "ttest_p_clean_kappa"


class Subset(StrEnum):
    """The images a detection metric was measured on (the HFC protocol, engine.detectors.evaluate)."""

    SUCCESSFUL = "successful"  # the set's own successful AEs
    FAILED = "failed"
    ALL = "all"
    PAIRED = "paired"  # the images where both the fitted attack and this set succeeded
    CHANGE = "change"  # the paired change: this set minus the fitted attack, on the paired images


def fingerprint(obj: Any) -> str:
    """A 12-hex-digit hash of a JSON-able object (keys sorted), stable across processes and machines."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dataset_label(spec: Mapping[str, Any]) -> str:
    """The ``dataset`` column of a dataset spec: its ``label`` if given, else 'name:task' or 'name'."""
    if spec.get("label"):
        return str(spec["label"])
    name = str(spec["name"])
    return f"{name}:{spec['task']}" if spec.get("task") else name


def row(metric: Metric | str, value: Any, **columns: Any) -> dict[str, Any]:
    """One result row of ``metric`` (a :class:`Metric` or its name); ``ci_level`` defaults to :data:`CI_LEVEL`
    when the row has an interval. Raises ValueError naming an unknown metric or column."""
    try:
        name = Metric(metric)
    except ValueError:
        raise ValueError(f"row: unknown metric {metric!r}; allowed: {[m.value for m in Metric]}") from None
    unknown = set(columns) - set(ROW_COLUMNS)
    if unknown:
        raise ValueError(f"row: unknown columns {sorted(unknown)}; allowed: {ROW_COLUMNS}")
    interval = all(_finite(columns.get(c)) for c in ("ci_low", "ci_high"))
    if interval and columns.get("ci_level") is None:
        columns["ci_level"] = CI_LEVEL
    return normalise_row({**columns, "metric": name.value, "value": value})


def normalise_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A row with every column present: eps as text and ``eps_value`` its number, hfc as bool, numbers as float
    (NaN when missing), counts as int, other columns as text (None when missing). Raises ValueError for unknown
    columns or a missing metric."""
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
        elif value is None:
            pass
        elif col == "hfc":
            value = bool(value)
        elif col in COUNT_COLUMNS:
            value = int(value)
        else:  # text (a StrEnum member becomes its plain value)
            value = str(value)
        out[col] = value
    if math.isnan(out["eps_value"]) and out["eps"] not in (None, ""):
        out["eps_value"] = parse_eps(out["eps"])
    return out


PER_LAYER = (Metric.FEATURE_LOGLIK, Metric.FEATURE_DEVIATION, Metric.SHIFT_COSINE, Metric.MAHA_AUROC,
             Metric.MAHA_DISTANCE_RATIO)  # the metrics with a ``layer``  # fmt: skip
_LEGACY_SUFFIXES = {"_change": Subset.CHANGE.value, "_all": Subset.ALL.value, "_seeds": "seeds"}
_LEGACY_FOLDS = (Metric.CLEAN_KAPPA_DIFF_VS_BASELINE, Metric.TOST_P_CLEAN_KAPPA, Metric.TTEST_P_CLEAN_KAPPA)


def legacy_metric(name: str, detector: str | None) -> tuple[str, str | None, str | None]:
    """(metric, subset, layer) of a metric name written before rows had the ``subset`` and ``layer`` columns
    ('auroc@paired', 'auroc_change', 'feature_loglik@<layer>', 'feature_deviation_all@<layer>', 'diag_loglik@noise',
    'kappa_gain_mean_<relation>', 'tost_p_clean_kappa_seeds', ...); read by the store's migration."""
    base, _, at = name.partition("@")
    subset: str | None = None
    for suffix, part in _LEGACY_SUFFIXES.items():
        if base.endswith(suffix) and base.removesuffix(suffix) in set(Metric):
            base, subset = base.removesuffix(suffix), part
    relation = base.removeprefix(f"{Metric.KAPPA_GAIN_MEAN}_")
    if relation != base:
        return Metric.KAPPA_GAIN_MEAN.value, relation, None
    if base == Metric.FEATURE_LOGLIK:
        return base, None, at
    if base in PER_LAYER:  # the stress study's: on the fooled images, or on all attacked ones ('_all')
        return base, subset or Subset.SUCCESSFUL.value, at
    if base in _LEGACY_FOLDS:
        return base, subset or "folds", None
    if detector and base != Metric.NOT_MEASURABLE:  # a detection metric: its own successful AEs unless named
        return base, at or subset or Subset.SUCCESSFUL.value, None
    return base, at or subset, None


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))
