"""The stress study's verdicts (with bootstrap intervals) and its report sections: paragraphs, table, depth plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from engine.html import Section, plt
from engine.metrics import percentile_ci

RATIO_KEYS = ("deviation_mean", "deviation_deep")


def _pick(d: Mapping[str, Any], attack: str, eps: str) -> Mapping[str, Any]:
    return next(r for r in d["results"] if r["attack"] == attack and r["eps"] == eps)


def _interval(point: float, replicates: Any) -> list[float]:
    return [float(point), *percentile_ci(replicates)]


def _ratio(member: tuple[Mapping, Mapping], others: Sequence[tuple[Mapping, Mapping]], eps, key) -> list[float]:
    """One model's PGD quantity ``key`` over the mean of ``others``', with a bootstrap interval (each dataset's
    images resampled independently)."""

    def mean(group, reps: bool):
        values = [r[("pgd", eps)].get(key, np.nan) if reps else _point(d, eps, key) for d, r in group]
        return np.mean(values, axis=0)

    return _interval(mean([member], False) / mean(others, False), mean([member], True) / mean(others, True))


def _point(d: Mapping[str, Any], eps: str, key: str) -> float:
    r = _pick(d, "pgd", eps)
    return {"deviation_mean": _mean(r["deviation"]), "deviation_deep": r["deviation"][-1]}[key]


def _mean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when there are none, e.g. no successful AE at that eps)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _word(low: float, high: float, threshold: float) -> str:
    if not np.isfinite(low):
        return "undecided"
    return "holds" if low > threshold else ("reversed" if high < threshold else "not shown")


def _overall(words: set[str]) -> str:
    """One word for a claim checked in several places: every check must hold."""
    for word in ("undecided", "reversed", "not shown"):
        if word in words:
            return word
    return "holds"


def stress_verdict(measured: Sequence[tuple[Mapping[str, Any], Mapping[Any, Any]]]) -> dict[str, Any]:
    """Whether the paper's two claims hold on these models, from (payload entry, bootstrap replicates) pairs.

    Vulnerability, per eps and medical model: its mean PGD deviation (averaged over layers, and at the deepest
    layer) over the natural models', with a 95% bootstrap interval; it holds when every interval lies above 1.
    Alignment, per eps and binary model: the deepest layer's within-class PGD cosine and its excess over the noise
    control on the same images, with intervals; it holds for medical models when every cosine interval lies above
    0.5 and every excess interval above 0. The natural model's alignment is reported the same way.
    """
    medical = [m for m in measured if m[0]["group"] == "medical"]
    natural = [m for m in measured if m[0]["group"] == "natural"]
    eps_grid = [r["eps"] for r in measured[0][0]["results"] if r["attack"] == "pgd"] if measured else []
    per_eps = []
    for eps in eps_grid:
        entry: dict[str, Any] = {"eps": eps, "alignment": {}, "ratios": {}}
        for m in medical if natural else []:
            entry["ratios"][m[0]["label"]] = {key: _ratio(m, natural, eps, key) for key in RATIO_KEYS}
        for d, reps in measured:
            pgd, noise = reps[("pgd", eps)], reps[("noise", eps)]
            cos = _pick(d, "pgd", eps)["cosine"][-1]
            gap = cos - _pick(d, "noise", eps)["cosine"][-1]
            entry["alignment"][d["label"]] = {
                "group": d["group"],
                "cosine": _interval(cos, pgd.get("cosine_deep", np.nan)),
                "excess_over_noise": _interval(gap, pgd.get("cosine_deep", np.nan) - noise.get("cosine_deep", np.nan)),
            }
        per_eps.append(entry)
    vulnerable = None
    if medical and natural and per_eps:
        words = {_word(*r[k][1:], 1.0) for e in per_eps for r in e["ratios"].values() for k in RATIO_KEYS}
        vulnerable = _overall(words)
    aligned = {group: _aligned(per_eps, group) if members and per_eps else None
               for group, members in (("medical", medical), ("natural", natural))}  # fmt: skip
    return {
        "per_eps": per_eps,
        "medical_more_vulnerable": vulnerable,
        "binary_shifts_aligned": aligned["medical"],
        "natural_shifts_aligned": aligned["natural"],
        "clean_accuracy": {d["label"]: d["accuracy"] for d, _ in measured},
        "val_accuracy": {d["label"]: d["val_accuracy"] for d, _ in measured},
    }


def _aligned(per_eps: Sequence[Mapping[str, Any]], group: str) -> str:
    """The alignment criterion over every eps and model of ``group``: cosine interval above 0.5, excess over
    the noise control above 0."""
    found = [a for e in per_eps for a in e["alignment"].values() if a["group"] == group]
    words = {_word(*a["cosine"][1:], 0.5) for a in found} | {_word(*a["excess_over_noise"][1:], 0.0) for a in found}
    return _overall(words)


WORDS = {
    None: "cannot be decided (a group is missing)",
    "holds": "HOLDS",
    "not shown": "is NOT shown",
    "reversed": "does NOT hold (an interval lies wholly on the wrong side of its threshold)",
    "undecided": "cannot be decided (too few successful AEs at some eps)",
}


def _ci(v: Sequence[float]) -> str:
    return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"


def _verdict_text(verdict: Mapping[str, Any]) -> str:
    parts = []
    for e in verdict["per_eps"]:
        text = f"eps={e['eps']}: PGD deviation over the natural model's " + "".join(
            f"{label} {_ci(r['deviation_mean'])} averaged over layers, {_ci(r['deviation_deep'])} at the deepest "
            "layer; "
            for label, r in e["ratios"].items()
        )
        text += "deepest-layer cosine " + ", ".join(
            f"{label} {_ci(a['cosine'])} (excess over noise {_ci(a['excess_over_noise'])})"
            for label, a in e["alignment"].items()
        )
        parts.append(text)
    natural = ""
    if verdict.get("natural_shifts_aligned") == "holds" and verdict["binary_shifts_aligned"] == "holds":
        natural = (
            " The natural binary model meets the same alignment criterion, so on this data alignment is a property "
            "of binary tasks, not of medical images."
        )
    return (
        f"Claim 'deep features of medical images are more vulnerable than natural ones' "
        f"{WORDS[verdict['medical_more_vulnerable']]} on this data (criterion: every medical model's PGD deviation "
        f"over the natural model's has its 95% bootstrap interval above 1 at every eps). Claim 'attacks on binary "
        f"medical models shift features in one fixed direction' {WORDS[verdict['binary_shifts_aligned']]} "
        f"(criterion: deepest-layer cosine interval above 0.5 and above the noise control, every eps and medical "
        f"model).{natural} " + "; ".join(parts) + ". " + _accuracy_note(verdict)
    )


def _accuracy_note(verdict: Mapping[str, Any]) -> str:
    """The models' accuracies, with a warning when the matching left them apart."""
    test, val = verdict["clean_accuracy"], verdict["val_accuracy"]
    text = "Clean accuracy (validation / test pool): " + ", ".join(f"{k} {val[k]:.3f} / {test[k]:.3f}" for k in test)
    if test and max(test.values()) - min(test.values()) > 0.05:
        text += (
            ". The test accuracies still differ by more than 0.05, which confounds the medical-vs-natural "
            "comparison (a weaker model has less confident, differently scaled features)"
        )
    return text + "."


def _depth_figure(datasets: list[Mapping[str, Any]], quantity: str, ylabel: str, log: bool = False) -> Any:
    eps_grid = [r["eps"] for r in datasets[0]["results"] if r["attack"] == "pgd"]
    fig, axes = plt.subplots(1, len(eps_grid), figsize=(4.2 * len(eps_grid), 3.5), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, eps in zip(axes[0], eps_grid, strict=True):
        for i, d in enumerate(datasets):
            depth, colour = np.arange(len(d["layers"])), colours[i % len(colours)]
            style = "-" if d["group"] == "medical" else "--"
            label = f"{d['label']} ({d['group']}) PGD"
            ax.plot(depth, _pick(d, "pgd", eps)[quantity], style, marker="o", ms=3, color=colour, label=label)
            ax.plot(depth, _pick(d, "noise", eps)[quantity], ":", color=colour, alpha=0.7, label=f"{d['label']} noise")
        ax.set(title=f"eps = {eps}", xlabel="layer depth (hooked layer index)", ylabel=ylabel)
        if log:
            ax.set_yscale("log")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def _table(payload: Mapping[str, Any]) -> pd.DataFrame:
    records = []
    alignment = {e["eps"]: e["alignment"] for e in payload["verdict"]["per_eps"]}
    for d in payload["datasets"]:
        for eps in [r["eps"] for r in d["results"] if r["attack"] == "pgd"]:
            pgd, noise = _pick(d, "pgd", eps), _pick(d, "noise", eps)
            records.append(
                {
                    "dataset": d["label"],
                    "group": d["group"],
                    "eps": eps,
                    "epoch": d["epoch"],
                    "val / test acc": f"{d['val_accuracy']:.3f} / {d['accuracy']:.3f}",
                    "PGD success": pgd["success_rate"],
                    "n (fooled)": pgd["n"],
                    "dev mean PGD": _mean(pgd["deviation"]),
                    "dev mean noise": _mean(noise["deviation"]),
                    "dev deep PGD": pgd["deviation"][-1],
                    "cos deep PGD [95% CI]": _ci(alignment[eps][d["label"]]["cosine"]),
                    "cos deep noise": noise["cosine"][-1],
                    "MAHA AUROC deep PGD": pgd["maha_auroc"][-1],
                    "MAHA AUROC deep noise": noise["maha_auroc"][-1],
                }
            )
    return pd.DataFrame(records).set_index(["dataset", "group", "eps"])


def stress_sections(payload: Mapping[str, Any]) -> list[Any]:
    """Report sections of a stress-study payload: verdict, summary table, depth plots."""
    datasets = payload["datasets"]
    matched = "matched on validation accuracy (epoch shown)" if payload["config"]["match_accuracy"] else "unmatched"
    section = Section(
        "Stress test and fixed-direction analysis (paper A)",
        "Relative GAP-feature deviation under untargeted PGD and under uniform noise of the same L-inf budget, per "
        "layer; within-class mean pairwise cosine of the feature shifts; AUROC of the tied-covariance Mahalanobis "
        f"outlier score (shifted vs clean features). Models {matched}. Only correctly classified test images that "
        "PGD fooled (n); the noise control perturbs the same images.",
    )
    section.paragraph(_verdict_text(payload["verdict"]), css="verdict")
    section.table(
        _table(payload),
        caption=f"'deep' = the last hooked layer ({datasets[0]['layers'][-1]}); dev = relative deviation.",
    )
    section.figure(
        _depth_figure(datasets, "deviation", "relative feature deviation", log=True),
        caption="Deviation vs depth per eps: medical solid, natural dashed, noise control dotted.",
    )
    section.figure(
        _depth_figure(datasets, "cosine", "within-class shift cosine"),
        caption="Alignment of the feature shifts vs depth (1 = one fixed direction).",
    )
    section.figure(
        _depth_figure(datasets, "maha_auroc", "Mahalanobis AUROC"),
        caption="Outlier score of the shifted features (AUROC of shifted vs clean) vs depth.",
    )
    return [section]
