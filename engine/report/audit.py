"""The run report: the paper-style detection table, attack success, ROC curves, feature projections, the studies'
sections and the run card, built from a :class:`engine.runs.RunResult`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.attacks import parse_eps
from engine.fileio import atomic_write
from engine.html import Section, render
from engine.metrics import roc_curves
from engine.report.figures import projection_figure, roc_figure
from engine.runs import STUDIES, DetectorScores, Projection, RunResult

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


def roc_section(section: Section, result: RunResult) -> None:
    """ROC curves (plain vs HFC) of every detector, one figure per (dataset, attack) at its largest budget."""
    groups: dict[tuple[str, str, str], list[tuple[str, str, np.ndarray, np.ndarray]]] = {}
    for cell, payload in result.payloads.get("detect", []):
        scores = DetectorScores.load(result.artifacts.path(payload["directory"]))
        for attack_set, name in (("plain", "plain"), ("hfc", "HFC")):
            positives = scores.positives(attack_set)
            if len(positives):
                fpr, tpr = (curve[0] for curve in roc_curves(scores.scores["negatives"], positives))
                group = (cell.inputs["dataset_label"], cell.inputs["attack"], str(cell.inputs["eps"]))
                groups.setdefault(group, []).append((cell.inputs["detector"], name, fpr, tpr))
    largest: dict[tuple[str, str], str] = {}
    for dataset, attack, eps in groups:
        if (dataset, attack) not in largest or _budget(eps) > _budget(largest[dataset, attack]):
            largest[dataset, attack] = eps
    for (dataset, attack, eps), curves in groups.items():
        if largest[dataset, attack] != eps:
            continue
        section.figure(
            roc_figure(curves, f"{dataset} {attack}" + ("" if eps == "None" else f" eps={eps}")),
            "ROC of each detector on plain and on HFC adversarial examples (negatives: clean + noise).",
        )


def _budget(eps: str) -> float:
    return -1.0 if eps == "None" else parse_eps(eps)


def projection_section(section: Section, result: RunResult) -> None:
    for cell, payload in result.payloads.get("projection", []):
        projection = Projection.load(result.artifacts.path(payload["directory"]))
        panels = [
            (f"{cell.inputs['dataset_label']} {layer}", {g: projection.features[g][layer] for g in Projection.GROUPS})
            for layer in projection.layers
        ]
        section.figure(
            projection_figure(panels),
            f"PCA of GAP features ({cell.inputs['attack']}, eps={cell.inputs['eps']}): clean vs plain vs HFC AEs, "
            "at a shallow and a deep layer.",
            wide=True,
        )


def build_report(result: RunResult) -> str:
    """The complete self-contained HTML page of a run."""
    rows, card = result.rows, result.card
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
    if result.payloads.get("detect"):
        roc = Section("ROC curves")
        roc_section(roc, result)
        sections.append(roc)
    if result.payloads.get("projection"):
        proj = Section("Where adversarial features lie")
        projection_section(proj, result)
        sections.append(proj)
    for _, payload in result.payloads.get("study", []):
        sections.extend(STUDIES[payload["study"]].sections(payload["payload"]))
    sections.append(Section("Run card").preformatted(json.dumps(card, indent=2, default=str)))
    title = f"hfc-engine audit: {result.config['name']}"
    return render(title, sections, subtitle=f"hfc-engine {card.get('version', '')} — {card.get('finished', '')}")


def write_report(result: RunResult) -> Path:
    """``report.html`` in the run directory."""
    html = build_report(result)
    return atomic_write(result.run_dir / "report.html", lambda p: p.write_text(html))
