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
from engine.report.robustness import robustness_lines
from engine.report.tables import (
    METRIC_LABELS,
    calibration_table,
    clean_table,
    defence_table,
    detection_table,
    diagnostics_table,
    loglik_table,
    paired_table,
    seed_table,
    success_table,
    transfer_table,
)
from engine.report.verdicts import SCHEDULE_ONLY, verdicts
from engine.runs import STUDIES, Projection, RunResult
from engine.runs.artifacts import load_scores
from engine.runs.plan import detector_arms, headline, run_seeds

REPORT_FILE = "report.html"


def summary_lines(result: RunResult) -> list[str]:
    """The verdict on each of the HFC paper's claims at the run's headline setting, then what the run says about
    the model (budgets resisted, detection not measurable, possible gradient masking), one line each."""
    return [v.text for v in verdicts(result.rows, *headline(result.config))] + robustness_lines(result.rows)


def roc_section(section: Section, result: RunResult) -> None:
    """ROC curves (plain vs HFC) of every detector, one figure per (dataset, attack) at its largest budget."""
    groups: dict[tuple[str, str, str], list[tuple[str, str, np.ndarray, np.ndarray]]] = {}
    first_seed = run_seeds(result.config)[0]
    for cell, payload in result.payloads.get("detect", []):
        if "directory" not in payload or cell.inputs["seed"] != first_seed:  # skipped or not measurable
            continue
        arm = cell.inputs.get("arm")
        detector = cell.inputs["detector"] + ("" if arm is None else f" ({arm})")
        scores = load_scores(result.artifacts.path(payload["directory"]))
        for attack_set, name in (("plain", "plain"), ("hfc", "HFC")):
            positives = scores.positives(attack_set) if attack_set in scores.adversarial else []
            if len(positives):
                fpr, tpr = (curve[0] for curve in roc_curves(scores.negatives.reshape(-1), positives))
                group = (cell.inputs["dataset_label"], cell.inputs["attack"], str(cell.inputs["eps"]))
                groups.setdefault(group, []).append((detector, name, fpr, tpr))
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
        if "directory" not in payload:  # not measurable
            continue
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
    """Verdicts, then per dataset and detector layer arm the paper-style heatmap tables (plain | each HFC set |
    paired change), the per-seed changes of a several-seed run, the diagnostics, and attack success."""
    attack, eps = headline(result.config)
    seeds = run_seeds(result.config)
    claims = Section(
        "Verdicts",
        f"The HFC paper's claims judged at the headline setting ({attack}" + ("" if eps is None else f", eps {eps}")
        + f"; {len(seeds)} seed{'s' if len(seeds) > 1 else ''}) by the pre-registered rules of docs/runs.md: detectors "
        "fitted on plain AEs, scored on plain and on HFC AEs of the same test images, per detector layer arm.",
    )
    for v in verdicts(result.rows, attack, eps):
        claims.paragraph(v.text, css="verdict " + {True: "holds", False: "fails", None: ""}[v.holds])
    for line in robustness_lines(result.rows):
        claims.paragraph(line, css="verdict")
    sections = [claims]
    arms = list(detector_arms(result.config))
    for dataset in dict.fromkeys(r["dataset"] for r in result.rows if r.get("detector")):
        for arm in arms:
            title = f"Detection on {dataset}" + ("" if arm is None else f", detectors on the {arm!r} layers")
            section = Section(title, ARM_NOTES.get(arm, ""))
            for metric, label in METRIC_LABELS.items():
                text, values = paired_table(result.rows, dataset, metric, arm)
                if text.empty:
                    continue
                value_scale = (0.5, 1.0, "RdYlGn") if metric == "auroc" else (0.0, 1.0, "RdYlGn")
                change_scale = (-0.5, 0.5, "RdBu") if metric == "auroc" else (-1.0, 1.0, "RdBu")
                scales = {part: change_scale if part.endswith("change") else value_scale for _, part in text.columns}
                section.heatmap(
                    text,
                    values,
                    scales,
                    caption=f"{label} of each detector (fitted on plain AEs) on plain AEs and on each HFC set of the "
                    "same images (those where both attacks succeeded; negatives: their clean and noise copies), and "
                    "the paired change (that set minus plain) with its 95% interval (* : excludes zero)."
                    + (W0_NOTE if any(part == W0_COLUMN for _, part in text.columns) else ""),
                )
            extra = (
                (defence_table(result.rows, dataset, attack, eps, arm), DEFENCE_CAPTION, "{:.3f}"),
                (transfer_table(result.rows, dataset, arm), TRANSFER_CAPTION, "{:.3f}"),
                (seed_table(result.rows, dataset, arm), SEED_CAPTION, "{:+.2f}"),
            )
            for table, caption, float_format in extra:
                if not table.empty:
                    section.table(table, caption=caption, float_format=float_format)
            sections.append(section)
        diagnostics = diagnostics_table(result.rows, dataset)
        if not diagnostics.empty:
            sections.append(
                Section(
                    f"Diagnostics on {dataset}",
                    "Why a detector may score AEs as more normal than clean images: the medians of the MC-dropout "
                    "variance (BU's signal) and of the logit margin, and the mean log-likelihood of the deepest "
                    "constrained layer (clean and noise images under their class's mixtures, AEs under the target "
                    "class's), at the headline setting on the images where both attacks succeeded.",
                ).table(diagnostics, float_format="{:.4g}")
            )
    success = success_table(result.rows)
    if not success.empty:
        sections.append(Section("Attack success", "On the correctly classified test pool.").table(success))
    return sections


DEFENCE_CAPTION = (
    "Defence table: every detector on plain, HFC and adaptive-HFC AEs (95% intervals); 'caught' = the detector is "
    "applicable and flags more than half of that set's AEs at 90% TNR (the verdict rules)."
)
TRANSFER_CAPTION = (
    "Cross-attack transfer: detectors fitted on one attack's plain AEs, scored on every attack's plain and HFC AEs at "
    "the same budget (AUROC with its 95% interval; another attack's sets on the images where both attacks succeeded)."
)
W0_COLUMN = f"HFC {SCHEDULE_ONLY}"  # the weight-0 set's column in the paired tables (engine.report.tables)
W0_NOTE = " 'HFC w0' is HFC's schedule with weight 0: what the longer schedule alone does."
SEED_CAPTION = "Paired AUROC change of the HFC set per seed, and its between-seed mean with the 95% t interval."
ARM_NOTES = {
    "same": "The detectors read the layers HFC constrains (the paper's easiest case for HFC).",
    "unconstrained": "The detectors read every activation: KD and SVM the final pooled feature and DNR the last "
    "three layers, which HFC does not constrain; LID, MAHA and DNN combine constrained and unconstrained layers.",
}


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
    unmeasured = [f"{c.label}: {p['not_measurable']}" for stage in ("detect", "features")
                  for c, p in result.payloads.get(stage, []) if "not_measurable" in p]  # fmt: skip
    if unmeasured:
        section = Section(
            "Not measurable",
            "Cells with too few examples to measure (e.g. a model that resists the budget leaves too few successful "
            "AEs to fit a detector on): the run went on without them.",
        )
        for line in unmeasured:
            section.paragraph(line)
        sections.append(section)
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
        weight = Section(
            "HFC weight",
            "Chosen on correctly classified validation images, never on the test pool: the largest weight of the "
            "grid whose HFC attack keeps the target success (trials in the run card).",
        ).table(calibration, float_format="{:.4g}")
        for cell, payload in result.payloads.get("calibrate", []):
            if payload.get("note"):
                weight.paragraph(f"{cell.label}: {payload['note']}.")
        sections.append(weight)
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


def write_report(result: RunResult, html: str | None = None) -> Path:
    """``report.html`` in the run directory: ``html`` (a :func:`build_report` already built), else built here."""
    html = build_report(result) if html is None else html
    return atomic_write(result.run_dir / REPORT_FILE, lambda p: p.write_text(html))
