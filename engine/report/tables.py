"""The report's tables from long-format rows: the paper-style plain | HFC | change table, the long detection table,
clean performance, the HFC weight calibration, and the per-layer feature log-likelihoods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from engine.report.verdicts import MAIN, at_setting, estimate, evidence, metric_rows, rows_frame
from engine.runs.plan import ADAPTIVE, TRANSFER
from engine.runs.schema import Metric, Subset

METRIC_LABELS = {Metric.AUROC: "AUROC", Metric.TPR_AT_TNR90: "TPR@90%TNR"}  # the detection tables' metrics
DIAGNOSTIC_LABELS = {
    Metric.DIAG_MC_VARIANCE: "MC-dropout variance (median)",
    Metric.DIAG_LOGIT_MARGIN: "logit margin (median)",
    Metric.DIAG_LOGLIK: "deepest constrained layer log-likelihood (mean)",
}
CLEAN_LABELS = {Metric.CLEAN_LOSS: "loss", Metric.CLEAN_ACCURACY: "accuracy", Metric.CLEAN_AUC: "auc",
                Metric.CLEAN_KAPPA: "kappa"}  # fmt: skip
CALIBRATION_LABELS = {Metric.HFC_LAM: "HFC weight", Metric.HFC_CALIBRATION_SUCCESS: "success on calibration images"}
SET_LABELS = {"clean": "clean", "noise": "noise", "plain": "plain AE", "hfc": "HFC AE"}


def _frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    return _with_setting(rows_frame(rows))


def _with_setting(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    frame = frame.copy()
    pairs = zip(frame["attack"], frame["eps"], strict=True)
    frame["setting"] = [f"{a} {e}" if isinstance(e, str) and e else str(a) for a, e in pairs]
    return frame


def paired_table(
    rows: Sequence[dict[str, Any]], dataset: str, metric: Metric = Metric.AUROC, arm: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(text, values) of the paper-style table for ``dataset`` and detector layer ``arm``: detectors as rows; per
    (attack, eps) the metric on plain AEs and on each HFC set (the calibrated HFC set, and the fixed-weight sets
    such as weight 0) of the same images (both attacks succeeded), and each set's paired change with its interval
    (the image bootstrap with one seed, the between-seed t interval with several)."""
    frame = rows_frame(rows)
    if frame.empty:
        return pd.DataFrame(), pd.DataFrame()
    frame = frame[(frame["dataset"] == dataset) & frame["detector"].ne("")]
    frame = frame[frame["arm"].isna()] if arm is None else frame[frame["arm"] == arm]
    frame = _with_setting(metric_rows(frame, metric))
    paired = frame[frame["subset"] == Subset.PAIRED]
    if paired.empty:
        return pd.DataFrame(), pd.DataFrame()
    hfc_sets = paired[paired["hfc"] & ~paired["variant"].str.startswith(TRANSFER)]
    variants = list(dict.fromkeys(hfc_sets["variant"]))
    parts = ["plain", *[p for v in variants for p in _parts(v)]]
    settings = list(dict.fromkeys(paired["setting"]))
    detectors = list(dict.fromkeys(paired["detector"]))
    columns = pd.MultiIndex.from_tuples([(s, p) for s in settings for p in parts])
    text = pd.DataFrame("–", index=detectors, columns=columns)
    values = pd.DataFrame(np.nan, index=detectors, columns=columns)
    for (setting, detector), group in frame.groupby(["setting", "detector"], sort=False):
        plain = group[~group["hfc"] & group["variant"].eq(MAIN) & (group["subset"] == Subset.PAIRED)]
        if not plain.empty:  # the plain side of the pair with the HFC set
            est = estimate(plain)
            text.loc[detector, (setting, "plain")] = f"{est.value:.2f}"
            values.loc[detector, (setting, "plain")] = est.value
        for variant in variants:
            on_set = group[group["hfc"] & group["variant"].eq(variant)]
            if on_set.empty:  # a set run at another setting only (the adaptive one: the headline)
                continue
            value = estimate(on_set[on_set["subset"] == Subset.PAIRED])
            change = estimate(on_set[on_set["subset"] == Subset.CHANGE])
            name, delta = _parts(variant)
            text.loc[detector, (setting, name)] = f"{value.value:.2f}"
            values.loc[detector, (setting, name)] = value.value
            mark = "*" if change.high < 0 or change.low > 0 else ""
            text.loc[detector, (setting, delta)] = f"{change.text(signed=True)}{mark}"
            values.loc[detector, (setting, delta)] = change.value
    text.index = [d.upper() for d in text.index]
    values.index = text.index
    return text, values


def _parts(variant: str) -> tuple[str, str]:
    """The (value, change) column names of an HFC set."""
    name = "HFC" if variant == MAIN else f"HFC {variant}"
    return name, f"{name} change"


def defence_table(rows: Sequence[dict[str, Any]], dataset: str, attack: str, eps: str | None,
                  arm: str | None) -> pd.DataFrame:  # fmt: skip
    """Per detector on layer ``arm`` at the headline (``attack``, ``eps``): AUROC and TPR at 90% TNR with their
    intervals on plain, HFC and adaptive-HFC AEs (the latter two on the images where plain and that set both
    succeeded), each set marked caught / not caught by the verdict rules (applicable, TPR at 90% TNR above 0.5)."""
    frame = rows_frame(rows)
    if frame.empty:
        return frame
    head = at_setting(frame, attack, eps)
    head = head[(head["dataset"] == dataset) & head["detector"].ne("")]
    head = head[head["arm"].isna()] if arm is None else head[head["arm"] == arm]
    records = {}
    for variant, name in ((MAIN, "HFC"), (ADAPTIVE, "adaptive HFC")):
        for detector, found in evidence(head, variant).items():
            record = records.setdefault(detector.upper(), {})
            if not record:
                plain = head[(head["detector"] == detector) & ~head["hfc"] & head["variant"].eq(MAIN)]
                plain_tpr = estimate(metric_rows(plain, Metric.TPR_AT_TNR90, Subset.SUCCESSFUL))
                record["plain AUROC"] = found.plain_auroc.text()
                record["plain TPR@90%TNR"] = plain_tpr.text()
            record[f"{name} AUROC"] = found.auroc.text()
            record[f"{name} TPR@90%TNR"] = found.tpr.text()
            record[f"{name}"] = "caught" if found.caught else "not caught"
    return pd.DataFrame.from_dict(records, orient="index")


def transfer_table(rows: Sequence[dict[str, Any]], dataset: str, arm: str | None) -> pd.DataFrame:
    """The cross-attack transfer matrix on layer ``arm``: per detector and the attack it was fitted on (plain AEs),
    its AUROC [interval] on every attack's plain and HFC AEs at the same budget (another attack's sets on the images
    where both it and the fitted attack succeeded); for a run with one attack, its diagonal."""
    frame = rows_frame(rows)
    if frame.empty:
        return frame
    frame = frame[(frame["dataset"] == dataset) & frame["detector"].ne("")]
    frame = frame[frame["arm"].isna()] if arm is None else frame[frame["arm"] == arm]
    transfer = frame["variant"].str.startswith(TRANSFER)
    own_plain = metric_rows(frame[~frame["hfc"] & frame["variant"].eq(MAIN)], Metric.AUROC, Subset.SUCCESSFUL)
    own_hfc = metric_rows(frame[frame["hfc"] & frame["variant"].eq(MAIN)], Metric.AUROC, Subset.PAIRED)
    other = metric_rows(frame[transfer], Metric.AUROC, Subset.PAIRED)
    records: dict[tuple[str, str], dict[str, str]] = {}
    for part, scored in ((own_plain, lambda r: r.attack), (own_hfc, lambda r: f"{r.attack}+hfc"),
                         (other, lambda r: r.variant.removeprefix(TRANSFER))):  # fmt: skip
        if part.empty:
            continue
        for (detector, attack, eps, name), group in part.groupby(
            ["detector", "attack", part["eps"].fillna(""), part.apply(scored, axis=1)], sort=False
        ):
            fitted = f"{attack} {eps}".strip()
            target = name.replace("+hfc", " HFC") if name.endswith("+hfc") else f"{name} plain"
            records.setdefault((detector.upper(), fitted), {})[target] = estimate(group).text()
    if not records:
        return pd.DataFrame()
    table = pd.DataFrame.from_dict(records, orient="index").fillna("–")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["detector", "fitted on"])
    return table


def diagnostics_table(rows: Sequence[dict[str, Any]], dataset: str) -> pd.DataFrame:
    """Per image set (clean, noise, plain AEs, HFC AEs) at the headline setting: median MC-dropout variance, median
    logit margin and mean deepest-constrained-layer log-likelihood (averaged over seeds)."""
    frame = rows_frame(rows)
    if frame.empty:
        return frame
    diag = frame[(frame["dataset"] == dataset) & frame["metric"].isin(list(DIAGNOSTIC_LABELS))]
    if diag.empty:
        return pd.DataFrame()
    table = diag.pivot_table(index="subset", columns="metric", values="value", aggfunc="mean", sort=False)
    table = table.rename(columns=DIAGNOSTIC_LABELS, index=SET_LABELS).rename_axis(index="set", columns="quantity")
    return table[[c for c in DIAGNOSTIC_LABELS.values() if c in table.columns]]


def seed_table(rows: Sequence[dict[str, Any]], dataset: str, arm: str | None) -> pd.DataFrame:
    """Per detector and seed, the paired AUROC change of the HFC set (main variant), with the between-seed mean and
    t interval: empty when the run has one seed."""
    frame = rows_frame(rows)
    if frame.empty or frame["seed"].nunique() < 2:
        return pd.DataFrame()
    frame = frame[(frame["dataset"] == dataset) & frame["detector"].ne("") & frame["hfc"] & frame["variant"].eq(MAIN)]
    frame = frame[frame["arm"].isna()] if arm is None else frame[frame["arm"] == arm]
    change = _with_setting(metric_rows(frame, Metric.AUROC, Subset.CHANGE))
    if change.empty:
        return pd.DataFrame()
    table = change.pivot_table(index=["setting", "detector"], columns="seed", values="value", aggfunc="first")
    table.columns = [f"seed {c}" for c in table.columns]
    table["between seeds"] = [estimate(g).text(signed=True) for _, g in change.groupby(["setting", "detector"])]
    return table


def success_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Attack success (on the correctly classified pool) per (dataset, attack, eps) of the plain and each HFC set,
    averaged over seeds."""
    frame = _frame(rows)
    if frame.empty:
        return frame
    asr = metric_rows(frame, Metric.ATTACK_SUCCESS_RATE).copy()
    if asr.empty:
        return pd.DataFrame()
    asr["set"] = [_set_name(h, v) for h, v in zip(asr["hfc"], asr["variant"], strict=True)]
    table = asr.pivot_table(index=["dataset", "setting"], columns="set", values="value", aggfunc="mean", sort=False)
    table.columns = [f"success {c}" for c in table.columns]
    return table


def _set_name(hfc: bool, variant: str) -> str:
    """A set's column name: plain, HFC, HFC w0, HFC adaptive, or another attack's (transfer) plain / HFC set."""
    if variant.startswith(TRANSFER):
        attack = variant.removeprefix(TRANSFER).removesuffix("+hfc")
        return f"{attack} {'HFC' if hfc else 'plain'}"
    return "plain" if not hfc else _parts(variant)[0]


def detection_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The long table: per (dataset, attack, eps, layer arm, detector) AUROC and TPR@90%TNR on each set's own
    successful AEs (plain and each HFC set), with the attack success rates beside them (means over seeds)."""
    frame = rows_frame(rows)
    if frame.empty:
        return pd.DataFrame()
    keys = ["dataset", "attack", "eps"]
    det = frame[frame["metric"].isin(list(METRIC_LABELS)) & frame["subset"].eq(Subset.SUCCESSFUL)].copy()
    if det.empty:
        return pd.DataFrame()
    det["arm"] = det["arm"].fillna("")
    det["set"] = [_set_name(h, v) for h, v in zip(det["hfc"], det["variant"], strict=True)]
    table = det.pivot_table(
        index=[*keys, "arm", "detector"], columns=["metric", "set"], values="value", aggfunc="mean", sort=False
    )
    table.columns = [f"{METRIC_LABELS[m]} {s}" for m, s in table.columns]
    order = [f"{label} {s}" for label in METRIC_LABELS.values() for s in dict.fromkeys(det["set"])]
    table = table[[c for c in order if c in table.columns]]
    asr = metric_rows(frame, Metric.ATTACK_SUCCESS_RATE).copy()
    if not asr.empty:
        asr["set"] = [_set_name(h, v) for h, v in zip(asr["hfc"], asr["variant"], strict=True)]
        asr = asr.pivot_table(index=keys, columns="set", values="value", aggfunc="mean", sort=False)
        asr.columns = [f"success {c}" for c in asr.columns]
        table = table.join(asr, on=keys)
    return table


def clean_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Clean test metrics per (dataset, model)."""
    frame = pd.DataFrame([r for r in rows if r["metric"] in CLEAN_LABELS])
    if frame.empty:
        return frame
    frame["metric"] = frame["metric"].map(CLEAN_LABELS)
    return frame.pivot_table(index=["dataset", "model"], columns="metric", values="value", aggfunc="first")


def calibration_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The HFC weight chosen per (dataset, attack, eps) and the success it kept on the calibration images."""
    frame = _frame(rows)
    if frame.empty:
        return frame
    cal = frame[frame["metric"].isin(list(CALIBRATION_LABELS))]
    if cal.empty:
        return pd.DataFrame()
    table = cal.pivot_table(index=["dataset", "setting"], columns="metric", values="value", aggfunc="first")
    return table.rename(columns=CALIBRATION_LABELS)


def loglik_table(rows: Sequence[dict[str, Any]], dataset: str) -> pd.DataFrame:
    """Per layer (in forward order), mean feature log-likelihood of clean images, plain AEs and HFC AEs."""
    frame = rows_frame(rows)
    if frame.empty:
        return frame
    ll = metric_rows(frame[frame["dataset"] == dataset], Metric.FEATURE_LOGLIK).copy()
    if ll.empty:
        return pd.DataFrame()
    adversarial = np.where(ll["hfc"].astype(bool), "HFC AE", "plain AE")
    ll["set"] = np.where(ll["attack"].fillna("").eq(""), "clean", adversarial)
    table = ll.pivot_table(index="layer", columns="set", values="value", aggfunc="first", sort=False)
    return table[[c for c in ("clean", "plain AE", "HFC AE") if c in table.columns]]
