"""The audit report: the paper-style detection table, attack success, ROC curves, feature projections, run card."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.report.html import Section, projection_figure, render, roc_figure

TABLE_METRICS = ("auroc", "tpr_at_tnr90")


def detection_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Paper-style table: one row per (dataset, attack, eps, detector); AUROC and TPR@90%TNR, plain vs HFC,
    with the attack success rates (on the correctly classified pool) beside them."""
    frame = pd.DataFrame(rows)
    if frame.empty or "detector" not in frame:
        return pd.DataFrame()
    keys = ["dataset", "attack", "eps"]
    det = frame[frame["metric"].isin(TABLE_METRICS) & frame["detector"].fillna("").ne("")]
    if det.empty:
        return pd.DataFrame()
    table = det.pivot_table(index=[*keys, "detector"], columns=["metric", "hfc"], values="value", aggfunc="first")
    table.columns = [f"{_metric_label(m)} {'HFC' if h else 'plain'}" for m, h in table.columns]
    order = [f"{_metric_label(m)} {s}" for m in TABLE_METRICS for s in ("plain", "HFC")]
    table = table[[c for c in order if c in table.columns]]
    asr = frame[frame["metric"] == "attack_success_rate"]
    if not asr.empty:
        asr = asr.pivot_table(index=keys, columns="hfc", values="value", aggfunc="first")
        asr.columns = [f"success {'HFC' if h else 'plain'}" for h in asr.columns]
        table = table.join(asr, on=keys)
    return table


def _metric_label(metric: str) -> str:
    return {"auroc": "AUROC", "tpr_at_tnr90": "TPR@90%TNR"}.get(metric, metric)


def clean_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame([r for r in rows if str(r["metric"]).startswith("clean_")])
    if frame.empty:
        return frame
    frame["metric"] = frame["metric"].str.removeprefix("clean_")
    return frame.pivot_table(index=["dataset", "model"], columns="metric", values="value", aggfunc="first")


def summary_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Plain-language findings: mean detection AUROC on plain vs HFC AEs per dataset, and attack success."""
    frame = pd.DataFrame(rows)
    if frame.empty or "detector" not in frame:
        return []
    lines = []
    auroc = frame[(frame["metric"] == "auroc") & frame["detector"].fillna("").ne("")]
    for dataset, group in auroc.groupby("dataset"):
        plain = group[~group["hfc"].astype(bool)]["value"].mean()
        hfc = group[group["hfc"].astype(bool)]["value"].mean()
        line = f"{dataset}: mean detection AUROC over detectors and attacks {plain:.3f} on plain AEs"
        if not np.isnan(hfc):
            line += f", {hfc:.3f} on HFC AEs (detectors fitted on plain AEs)"
        lines.append(line + ".")
    asr = frame[frame["metric"] == "attack_success_rate"]
    for (dataset, hfc), group in asr.groupby(["dataset", "hfc"]):
        lines.append(
            f"{dataset}: mean attack success rate {'with' if hfc else 'without'} HFC "
            f"{group['value'].mean():.3f} over {len(group)} attack settings."
        )
    return lines


def roc_section(section: Section, detect_payloads: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """ROC curves (plain vs HFC) of every detector for each (dataset, attack, eps) given."""
    from engine.detectors.metrics import roc_curves

    groups: dict[tuple[str, str, str], list[tuple[str, str, np.ndarray, np.ndarray]]] = {}
    for inputs, payload in detect_payloads:
        with np.load(payload["scores"]) as data:
            neg = data["negatives"]
            for key, name in (("plain__successful", "plain"), ("hfc__successful", "HFC")):
                if key in data.files and len(data[key]):
                    fpr, tpr = (curve[0] for curve in roc_curves(neg, data[key]))
                    group = (inputs["dataset_label"], inputs["attack"], str(inputs["eps"]))
                    groups.setdefault(group, []).append((inputs["detector"], name, fpr, tpr))
    from engine.attacks import parse_eps

    largest: dict[tuple[str, str], str] = {}  # one figure per (dataset, attack): its largest budget
    for dataset, attack, eps in groups:
        if (dataset, attack) not in largest or parse_eps(eps) > parse_eps(largest[dataset, attack]):
            largest[dataset, attack] = eps
    for (dataset, attack, eps), curves in groups.items():
        if largest[dataset, attack] != eps:
            continue
        section.figure(
            roc_figure(curves, f"{dataset} {attack} eps={eps}"),
            "ROC of each detector on plain and on HFC adversarial examples (negatives: clean + noise).",
        )


def projection_section(section: Section, payloads: Sequence[dict[str, Any]]) -> None:
    for payload in payloads:
        with np.load(payload["file"]) as data:
            panels = []
            for layer in payload["layers"]:
                groups = {g: data[f"{g}|{layer}"] for g in ("clean", "plain AE", "HFC AE")}
                panels.append((f"{payload['dataset']} {layer}", groups))
        section.figure(
            projection_figure(panels),
            f"PCA of GAP features ({payload['attack']}, eps={payload['eps']}): clean vs plain vs HFC AEs, "
            "at a shallow and the deepest ReLU layer.",
            wide=True,
        )


def build_report(
    title: str,
    rows: Sequence[dict[str, Any]],
    card: dict[str, Any],
    detect_payloads: Sequence[tuple[dict[str, Any], dict[str, Any]]] = (),
    projections: Sequence[dict[str, Any]] = (),
    extra: Sequence[Section] = (),
) -> str:
    """The complete self-contained HTML page."""
    sections = []
    findings = Section("Findings")
    for line in summary_lines(rows):
        findings.paragraph(line, css="verdict")
    sections.append(findings)
    clean = clean_table(rows)
    if not clean.empty:
        sections.append(Section("Clean performance (test split)").table(clean))
    table = detection_table(rows)
    if not table.empty:
        sections.append(
            Section(
                "Detection of adversarial examples",
                "Detectors fitted on plain AEs (70% of the correctly classified pool) and evaluated on the other 30%: "
                "plain columns score plain AEs, HFC columns score HFC AEs with the same fitted detectors. "
                "Success rates are attack success on the correctly classified pool.",
            ).table(table)
        )
    if detect_payloads:
        roc = Section("ROC curves")
        roc_section(roc, detect_payloads)
        sections.append(roc)
    if projections:
        proj = Section("Where adversarial features lie")
        projection_section(proj, projections)
        sections.append(proj)
    sections.extend(extra)
    sections.append(Section("Run card").preformatted(json.dumps(card, indent=2, default=str)))
    return render(title, sections, subtitle=f"hfc-engine {card.get('version', '')} — {card.get('finished', '')}")


def write_tables(rows: Sequence[dict[str, Any]], run_dir: Path) -> tuple[Path, Path]:
    """results.csv and results.parquet (long format, one row per cell and metric)."""
    from engine.fileio import atomic_write
    from engine.sweep.store import ROW_COLUMNS

    frame = pd.DataFrame(list(rows), columns=list(ROW_COLUMNS))
    csv_path = atomic_write(run_dir / "results.csv", lambda p: frame.to_csv(p, index=False))
    parquet_path = atomic_write(run_dir / "results.parquet", lambda p: frame.to_parquet(p, index=False))
    return csv_path, parquet_path
