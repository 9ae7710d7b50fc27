"""The report's tables from long-format rows: the paper-style plain | HFC | change table, the long detection table,
clean performance, the HFC weight calibration, and the per-layer feature log-likelihoods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

TABLE_METRICS = ("auroc", "tpr_at_tnr90")
METRIC_LABELS = {"auroc": "AUROC", "tpr_at_tnr90": "TPR@90%TNR"}
PARTS = ("plain", "HFC", "change [95% CI]")


def _frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return frame
    pairs = zip(frame["attack"], frame["eps"], strict=True)
    frame["setting"] = [f"{a} {e}" if isinstance(e, str) and e else str(a) for a, e in pairs]
    return frame


def paired_table(
    rows: Sequence[dict[str, Any]], dataset: str, metric: str = "auroc"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(text, values) of the paper-style table for ``dataset``: detectors as rows; per (attack, eps) the metric on
    plain and on HFC AEs of the same images (both attacks succeeded) and the paired change with its CI."""
    frame = _frame(rows)
    if frame.empty:
        return pd.DataFrame(), pd.DataFrame()
    frame = frame[(frame["dataset"] == dataset) & frame["detector"].fillna("").ne("")]
    paired = frame[frame["metric"] == f"{metric}@paired"]
    change = frame[frame["metric"] == f"{metric}_change"]
    if paired.empty:
        return pd.DataFrame(), pd.DataFrame()
    settings = list(dict.fromkeys(paired["setting"]))
    detectors = list(dict.fromkeys(paired["detector"]))
    columns = pd.MultiIndex.from_tuples([(s, p) for s in settings for p in PARTS])
    text = pd.DataFrame("–", index=detectors, columns=columns)
    values = pd.DataFrame(np.nan, index=detectors, columns=columns)
    for r in paired.itertuples():
        part = "HFC" if r.hfc else "plain"
        text.loc[r.detector, (r.setting, part)] = f"{r.value:.2f}"
        values.loc[r.detector, (r.setting, part)] = r.value
    for r in change.itertuples():
        mark = "*" if r.ci_high < 0 or r.ci_low > 0 else ""
        text.loc[r.detector, (r.setting, PARTS[2])] = f"{r.value:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]{mark}"
        values.loc[r.detector, (r.setting, PARTS[2])] = r.value
    text.index = [d.upper() for d in text.index]
    values.index = text.index
    return text, values


def success_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Attack success (on the correctly classified pool) per (dataset, attack, eps), plain and HFC."""
    frame = _frame(rows)
    if frame.empty:
        return frame
    asr = frame[frame["metric"] == "attack_success_rate"]
    if asr.empty:
        return pd.DataFrame()
    table = asr.pivot_table(index=["dataset", "setting"], columns="hfc", values="value", aggfunc="first")
    table.columns = ["success HFC" if h else "success plain" for h in table.columns]
    return table


def detection_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The long table: per (dataset, attack, eps, detector) AUROC and TPR@90%TNR on each set's own successful AEs,
    plain and HFC, with the attack success rates beside them."""
    frame = pd.DataFrame(list(rows))
    if frame.empty or "detector" not in frame:
        return pd.DataFrame()
    keys = ["dataset", "attack", "eps"]
    det = frame[frame["metric"].isin(TABLE_METRICS) & frame["detector"].fillna("").ne("")]
    if det.empty:
        return pd.DataFrame()
    table = det.pivot_table(index=[*keys, "detector"], columns=["metric", "hfc"], values="value", aggfunc="first")
    table.columns = [f"{METRIC_LABELS[m]} {'HFC' if h else 'plain'}" for m, h in table.columns]
    order = [f"{METRIC_LABELS[m]} {s}" for m in TABLE_METRICS for s in ("plain", "HFC")]
    table = table[[c for c in order if c in table.columns]]
    asr = frame[frame["metric"] == "attack_success_rate"]
    if not asr.empty:
        asr = asr.pivot_table(index=keys, columns="hfc", values="value", aggfunc="first")
        asr.columns = [f"success {'HFC' if h else 'plain'}" for h in asr.columns]
        table = table.join(asr, on=keys)
    return table


def clean_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Clean test metrics per (dataset, model)."""
    frame = pd.DataFrame([r for r in rows if str(r["metric"]).startswith("clean_")])
    if frame.empty:
        return frame
    frame["metric"] = frame["metric"].str.removeprefix("clean_")
    return frame.pivot_table(index=["dataset", "model"], columns="metric", values="value", aggfunc="first")


def calibration_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The HFC weight chosen per (dataset, attack, eps) and the success it kept on the calibration images."""
    frame = _frame(rows)
    if frame.empty:
        return frame
    cal = frame[frame["metric"].isin(["hfc_lam", "hfc_calibration_success"])]
    if cal.empty:
        return pd.DataFrame()
    table = cal.pivot_table(index=["dataset", "setting"], columns="metric", values="value", aggfunc="first")
    return table.rename(columns={"hfc_lam": "HFC weight", "hfc_calibration_success": "success on calibration images"})


def loglik_table(rows: Sequence[dict[str, Any]], dataset: str) -> pd.DataFrame:
    """Per layer (in forward order), mean feature log-likelihood of clean images, plain AEs and HFC AEs."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return frame
    ll = frame[(frame["dataset"] == dataset) & frame["metric"].str.startswith("feature_loglik@")].copy()
    if ll.empty:
        return pd.DataFrame()
    ll["layer"] = ll["metric"].str.split("@", n=1).str[1]
    adversarial = np.where(ll["hfc"].astype(bool), "HFC AE", "plain AE")
    ll["set"] = np.where(ll["attack"].fillna("").eq(""), "clean", adversarial)
    table = ll.pivot_table(index="layer", columns="set", values="value", aggfunc="first", sort=False)
    return table[[c for c in ("clean", "plain AE", "HFC AE") if c in table.columns]]
