"""The run report, built from a :class:`engine.runs.RunResult`: verdicts on the HFC paper's claims and the paper-style
heatmap tables first (one minute to grasp), then the mechanism, ROC curves, calibration, the studies' sections, the
long table and the run card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.attacks import parse_eps
from engine.fileio import atomic_write
from engine.html import Section, render
from engine.metrics import roc_curves
from engine.report.figures import loglik_figure, projection_figure, roc_figure
from engine.report.tables import (
    METRIC_LABELS,
    PARTS,
    calibration_table,
    clean_table,
    detection_table,
    loglik_table,
    paired_table,
    success_table,
)
from engine.report.verdicts import verdicts
from engine.runs import STUDIES, Projection, RunResult
from engine.runs.artifacts import load_scores
from engine.runs.plan import headline


def summary_lines(result: RunResult) -> list[str]:
    """The verdict on each of the HFC paper's claims at the run's headline setting, one line each."""
    return [v.text for v in verdicts(result.rows, *headline(result.config))]


def roc_section(section: Section, result: RunResult) -> None:
    """ROC curves (plain vs HFC) of every detector, one figure per (dataset, attack) at its largest budget."""
    groups: dict[tuple[str, str, str], list[tuple[str, str, np.ndarray, np.ndarray]]] = {}
    for cell, payload in result.payloads.get("detect", []):
        if "skipped" in payload:
            continue
        scores = load_scores(result.artifacts.path(payload["directory"]))
        for attack_set, name in (("plain", "plain"), ("hfc", "HFC")):
            positives = scores.positives(attack_set) if attack_set in scores.adversarial else []
            if len(positives):
                fpr, tpr = (curve[0] for curve in roc_curves(scores.negatives.reshape(-1), positives))
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
    for cell, payload in result.payloads.get("features", []):
        projection = Projection.load(result.artifacts.path(payload["directory"]))
        panels = [
            (f"{cell.inputs['dataset_label']} {layer}", {g: projection.features[g][layer] for g in Projection.GROUPS})
            for layer in projection.layers
        ]
        section.figure(
            projection_figure(panels),
            f"PCA of GAP features ({cell.inputs['attack']}, eps={cell.inputs['eps']}, the {payload['n']} images where "
            "both attacks succeeded): clean vs plain vs HFC AEs, at a shallow and a deep layer.",
            wide=True,
        )


def headline_sections(result: RunResult) -> list[Section]:
    """Verdicts, then per dataset the paper-style heatmap table (plain | HFC | paired change), attack success."""
    attack, eps = headline(result.config)
    claims = Section(
        "Verdicts",
        f"The HFC paper's claims judged at the headline setting ({attack}" + ("" if eps is None else f", eps {eps}")
        + "): detectors fitted on plain AEs, scored on plain and on HFC AEs of the same test images.",
    )
    for v in verdicts(result.rows, attack, eps):
        claims.paragraph(v.text, css="verdict " + {True: "holds", False: "fails", None: ""}[v.holds])
    sections = [claims]
    datasets = list(dict.fromkeys(r["dataset"] for r in result.rows if r.get("detector")))
    for dataset in datasets:
        section = Section(f"Detection on {dataset}")
        for metric, label in METRIC_LABELS.items():
            text, values = paired_table(result.rows, dataset, metric)
            if text.empty:
                continue
            section.heatmap(
                text,
                values,
                {"plain": (0.5, 1.0, "RdYlGn"), "HFC": (0.5, 1.0, "RdYlGn"), PARTS[2]: (-0.5, 0.5, "RdBu")}
                if metric == "auroc"
                else {"plain": (0.0, 1.0, "RdYlGn"), "HFC": (0.0, 1.0, "RdYlGn"), PARTS[2]: (-1.0, 1.0, "RdBu")},
                caption=f"{label} of each detector (fitted on plain AEs) on plain and on HFC AEs of the same images "
                "(those where both attacks succeeded; negatives: their clean and noise copies), and the paired change "
                "HFC minus plain with its 95% bootstrap CI over images (* : CI excludes zero).",
            )
        sections.append(section)
    success = success_table(result.rows)
    if not success.empty:
        sections.append(Section("Attack success", "On the correctly classified test pool.").table(success))
    return sections


def build_report(result: RunResult) -> str:
    """The complete self-contained HTML page of a run: verdicts and the paper-style tables first (and the detectors
    a model could not run), then the mechanism (feature log-likelihoods, PCA), ROC curves, clean performance and
    calibration, the studies, the long table and the run card."""
    rows, card = result.rows, result.card
    sections = headline_sections(result)
    skipped = sorted({f"{c.inputs['detector']} on {c.inputs['model_label']}: {p['skipped']}"
                      for c, p in result.payloads.get("detect", []) if "skipped" in p})  # fmt: skip
    if skipped:
        sections.append(Section("Detectors not run", "; ".join(skipped) + "."))
    tables = [(d, loglik_table(rows, d)) for d in dict.fromkeys(r["dataset"] for r in rows)]
    tables = [(d, t) for d, t in tables if not t.empty]
    if tables or result.payloads.get("features"):
        where = Section(
            "Where adversarial features lie",
            "Mean log-likelihood of the GAP features of every constrained layer under HFC's mixtures: clean images "
            "under their own class, plain and HFC AEs under their target class (images where both succeeded).",
        )
        if tables:
            where.figure(loglik_figure(tables), "Log-likelihood by depth (symlog scale).", wide=True)
        projection_section(where, result)
        sections.append(where)
    if result.payloads.get("detect"):
        roc = Section("ROC curves")
        roc_section(roc, result)
        sections.append(roc)
    clean = clean_table(rows)
    if not clean.empty:
        sections.append(Section("Clean performance (test split)").table(clean))
    calibration = calibration_table(rows)
    if not calibration.empty:
        sections.append(
            Section(
                "HFC weight",
                "Chosen on correctly classified validation images, never on the test pool: the largest weight of the "
                "grid whose HFC attack keeps the target success (trials in the run card).",
            ).table(calibration, float_format="{:.4g}")
        )
    for _, payload in result.payloads.get("study", []):
        sections.extend(STUDIES[payload["study"]].sections(payload["payload"]))
    table = detection_table(rows)
    if not table.empty:
        sections.append(
            Section(
                "All settings",
                "Each set on its own successful AEs (not paired): AUROC and TPR@90%TNR, plain vs HFC, and the attack "
                "success rates on the correctly classified pool.",
            ).table(table)
        )
    sections.append(Section("Run card").preformatted(json.dumps(card, indent=2, default=str)))
    title = f"hfc-engine audit: {result.config['name']}"
    return render(title, sections, subtitle=f"hfc-engine {card.get('version', '')} — {card.get('finished', '')}")


def write_report(result: RunResult) -> Path:
    """``report.html`` in the run directory."""
    html = build_report(result)
    return atomic_write(result.run_dir / "report.html", lambda p: p.write_text(html))
