"""The stress study's verdicts (per seed with bootstrap intervals, then across seeds) and its report sections:
paragraphs, tables on the fooled and on all attacked images, depth plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from engine.html import Section, plt
from engine.metrics import mean_ci, percentile_ci

# The largest spread (max - min) of one seed's matched models' clean test accuracies at which "medical features are
# more vulnerable" is judged. A weaker model has less confident, differently scaled features, so beyond this gap
# the deviation comparison is confounded and the claim reads "cannot be decided" on that seed.
MAX_ACCURACY_GAP = 0.05
VARIANTS = ("fooled", "attacked")  # the images a quantity is measured on: those PGD fools, or all attacked ones
VARIANT_TEXT = {"fooled": "the fooled images", "attacked": "all attacked images"}
RATIO_KEYS = ("deviation_mean", "deviation_deep")
CLAIMS = ("medical_more_vulnerable", "binary_shifts_aligned", "natural_shifts_aligned")


def _pick(d: Mapping[str, Any], attack: str, eps: str, variant: str = "fooled") -> Mapping[str, Any]:
    return next(r for r in d["results"] if (r["attack"], r["eps"], r["variant"]) == (attack, eps, variant))


def _interval(point: float, replicates: Any) -> list[float]:
    return [float(point), *percentile_ci(replicates)]


def _ratio(member: tuple[Mapping, Mapping], others: Sequence[tuple[Mapping, Mapping]], eps, key, variant) -> list:
    """One model's PGD quantity ``key`` on the ``variant`` images over the mean of ``others``', with a bootstrap
    interval (each dataset's images resampled independently)."""

    def mean(group, reps: bool):
        values = [r[(variant, "pgd", eps)].get(key, np.nan) if reps else _point(d, eps, key, variant) for d, r in group]
        return np.mean(values, axis=0)

    return _interval(mean([member], False) / mean(others, False), mean([member], True) / mean(others, True))


def _point(d: Mapping[str, Any], eps: str, key: str, variant: str) -> float:
    r = _pick(d, "pgd", eps, variant)
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
    """Whether the paper's two claims hold on one seed's models, from (payload entry, bootstrap replicates) pairs.

    Vulnerability, per eps and medical model: its mean PGD deviation (averaged over layers, and at the deepest
    layer) over the natural models', with a 95% bootstrap interval, on the fooled and on all attacked images; it
    holds when every fooled-image interval lies above 1. It is None (cannot be decided) when a group is missing or
    the models' clean test accuracies differ by more than :data:`MAX_ACCURACY_GAP`. Alignment, per eps and
    binary model: the deepest layer's within-class PGD cosine on the fooled images and its excess over the noise
    control on the same images, with intervals; it holds for medical models when every cosine interval lies above
    0.5 and every excess interval above 0. The natural model's alignment is reported the same way.
    """
    medical = [m for m in measured if m[0]["group"] == "medical"]
    natural = [m for m in measured if m[0]["group"] == "natural"]
    eps_grid = list(dict.fromkeys(r["eps"] for r in measured[0][0]["results"])) if measured else []
    per_eps = []
    for eps in eps_grid:
        entry: dict[str, Any] = {"eps": eps, "alignment": {}, "ratios": {v: {} for v in VARIANTS}}
        for variant in VARIANTS:
            for m in medical if natural else []:
                ratios = {key: _ratio(m, natural, eps, key, variant) for key in RATIO_KEYS}
                entry["ratios"][variant][m[0]["label"]] = ratios
        for d, reps in measured:
            pgd, noise = reps[("fooled", "pgd", eps)], reps[("fooled", "noise", eps)]
            cos = _pick(d, "pgd", eps)["cosine"][-1]
            gap = cos - _pick(d, "noise", eps)["cosine"][-1]
            entry["alignment"][d["label"]] = {
                "group": d["group"],
                "cosine": _interval(cos, pgd.get("cosine_deep", np.nan)),
                "excess_over_noise": _interval(gap, pgd.get("cosine_deep", np.nan) - noise.get("cosine_deep", np.nan)),
            }
        per_eps.append(entry)
    accuracy = {d["label"]: d["accuracy"] for d, _ in measured}
    spread = max(accuracy.values()) - min(accuracy.values()) if accuracy else 0.0
    vulnerable = None
    if medical and natural and per_eps and spread <= MAX_ACCURACY_GAP:
        found = [r for e in per_eps for r in e["ratios"]["fooled"].values()]
        vulnerable = _overall({_word(*r[k][1:], 1.0) for r in found for k in RATIO_KEYS})
    aligned = {group: _aligned(per_eps, group) if members and per_eps else None
               for group, members in (("medical", medical), ("natural", natural))}  # fmt: skip
    return {
        "per_eps": per_eps,
        "medical_more_vulnerable": vulnerable,
        "binary_shifts_aligned": aligned["medical"],
        "natural_shifts_aligned": aligned["natural"],
        "clean_accuracy": accuracy,
        "val_accuracy": {d["label"]: d["val_accuracy"] for d, _ in measured},
        "accuracy_gap": spread,
    }


def _aligned(per_eps: Sequence[Mapping[str, Any]], group: str) -> str:
    """The alignment criterion over every eps and model of ``group``: cosine interval above 0.5, excess over
    the noise control above 0."""
    found = [a for e in per_eps for a in e["alignment"].values() if a["group"] == group]
    words = {_word(*a["cosine"][1:], 0.5) for a in found} | {_word(*a["excess_over_noise"][1:], 0.0) for a in found}
    return _overall(words)


def seeds_verdict(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The claims across seeds, from each run's ``seed`` and per-seed ``verdict`` (:func:`stress_verdict`).

    A claim holds only when it holds on every seed; otherwise it takes the worst seed's word (undecided, then
    reversed, then not shown), and it cannot be decided (None) when it cannot on some seed. ``confounded_seeds``
    are those whose accuracy gap exceeds :data:`MAX_ACCURACY_GAP`. ``ratios_over_seeds``: per eps, variant,
    medical model and ratio key, the mean and 95% Student-t interval (``mean_ci``) of the seeds' point ratios.
    """
    verdicts = [run["verdict"] for run in runs]
    confounded = [run["seed"] for run in runs if run["verdict"]["accuracy_gap"] > MAX_ACCURACY_GAP]
    out: dict[str, Any] = {"confounded_seeds": confounded}
    for claim in CLAIMS:
        words = [v[claim] for v in verdicts]
        out[claim] = None if None in words or not words else _overall(set(words))
    out["ratios_over_seeds"] = [
        {
            "eps": entry["eps"],
            "ratios": {
                variant: {
                    label: {
                        key: mean_ci([v["per_eps"][i]["ratios"][variant][label][key][0] for v in verdicts])
                        for key in RATIO_KEYS
                    }
                    for label in entry["ratios"][variant]
                }
                for variant in VARIANTS
            },
        }
        for i, entry in enumerate(verdicts[0]["per_eps"] if verdicts else [])
    ]
    return out


WORDS = {
    None: "cannot be decided (it needs a medical and a natural model)",
    "holds": "HOLDS",
    "not shown": "is NOT shown",
    "reversed": "does NOT hold (an interval lies wholly on the wrong side of its threshold)",
    "undecided": "cannot be decided (too few successful AEs at some eps)",
}


def _ci(v: Sequence[float]) -> str:
    return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"


def _tci(ci: Mapping[str, float]) -> str:
    """'mean [low, high]' of a mean_ci dict (bounds omitted when undefined, e.g. one seed)."""
    bounds = f" [{ci['low']:.2f}, {ci['high']:.2f}]" if np.isfinite(ci["low"]) else ""
    return f"{ci['mean']:.2f}{bounds}"


def _per_seed(payload: Mapping[str, Any], claim: str) -> str:
    return ", ".join(f"seed {run['seed']} {run['verdict'][claim] or 'cannot be decided'}" for run in payload["runs"])


def _vulnerability_word(verdict: Mapping[str, Any]) -> str:
    if verdict["medical_more_vulnerable"] is None and verdict["confounded_seeds"]:
        seeds = ", ".join(str(s) for s in verdict["confounded_seeds"])
        return (
            f"cannot be decided (on seed(s) {seeds} the matched models' clean test accuracies differ by more than "
            f"{MAX_ACCURACY_GAP}; accuracies below)"
        )
    return WORDS[verdict["medical_more_vulnerable"]]


def _verdict_text(payload: Mapping[str, Any]) -> str:
    verdict, k = payload["verdict"], len(payload["runs"])
    means = "; ".join(
        f"eps={e['eps']}: "
        + ", ".join(
            f"{label} {_tci(r['deviation_mean'])} / {_tci(e['ratios']['attacked'][label]['deviation_mean'])}"
            for label, r in e["ratios"]["fooled"].items()
        )
        for e in verdict["ratios_over_seeds"]
    )
    natural = ""
    if verdict["natural_shifts_aligned"] == "holds" and verdict["binary_shifts_aligned"] == "holds":
        natural = (
            " The natural binary model meets the same alignment criterion, so on this data alignment is a property "
            "of binary tasks, not of medical images."
        )
    return (
        f"Claim 'deep features of medical images are more vulnerable than natural ones' "
        f"{_vulnerability_word(verdict)} on this data (criterion, on each of the {k} training seeds: every medical "
        f"model's PGD deviation on the fooled images over the natural model's has its 95% bootstrap interval above 1 "
        f"at every eps, averaged over layers and at the deepest layer, and the matched models' clean test accuracies "
        f"lie within {MAX_ACCURACY_GAP} of each other; the claim holds only when it holds on every seed). Per seed: "
        f"{_per_seed(payload, 'medical_more_vulnerable')}. Deviation ratio medical / natural averaged over layers, "
        f"mean [95% t interval] over seeds, fooled / all attacked images: {means or 'none'}. Claim 'attacks on "
        f"binary medical models shift features in one fixed direction' {WORDS[verdict['binary_shifts_aligned']]} "
        f"(criterion, on every seed: deepest-layer cosine interval above 0.5 and above the noise control, every eps "
        f"and medical model; per seed: {_per_seed(payload, 'binary_shifts_aligned')}).{natural} "
        + _accuracy_note(payload)
    )


def _accuracy_note(payload: Mapping[str, Any]) -> str:
    """Every seed's matched accuracies and their spread, flagging the seeds beyond MAX_ACCURACY_GAP."""
    parts = []
    for run in payload["runs"]:
        v = run["verdict"]
        test, val = v["clean_accuracy"], v["val_accuracy"]
        flag = f", more than {MAX_ACCURACY_GAP}" if v["accuracy_gap"] > MAX_ACCURACY_GAP else ""
        models = ", ".join(f"{k} {val[k]:.3f} / {test[k]:.3f}" for k in test)
        parts.append(f"seed {run['seed']}: {models} (test spread {v['accuracy_gap']:.3f}{flag})")
    return "Clean accuracy of the measured models (validation / test split): " + "; ".join(parts) + "."


def _seed_mean(payload: Mapping[str, Any], k: int, attack: str, eps: str, quantity: str, variant: str) -> np.ndarray:
    """Dataset k's per-layer ``quantity`` averaged over seeds (NaN where no seed has a value)."""
    values = np.array([_pick(run["datasets"][k], attack, eps, variant)[quantity] for run in payload["runs"]])
    counts = np.isfinite(values).sum(0)
    return np.where(counts > 0, np.nansum(values, 0) / np.maximum(counts, 1), np.nan)


def _depth_figure(payload: Mapping[str, Any], quantity: str, ylabel: str, variant: str, log: bool = False) -> Any:
    datasets = payload["runs"][0]["datasets"]
    eps_grid = list(payload["config"]["eps"])
    fig, axes = plt.subplots(1, len(eps_grid), figsize=(4.2 * len(eps_grid), 3.5), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, eps in zip(axes[0], eps_grid, strict=True):
        for k, d in enumerate(datasets):
            depth, colour = np.arange(len(d["layers"])), colours[k % len(colours)]
            style = "-" if d["group"] == "medical" else "--"
            pgd, noise = (_seed_mean(payload, k, a, eps, quantity, variant) for a in ("pgd", "noise"))
            ax.plot(depth, pgd, style, marker="o", ms=3, color=colour, label=f"{d['label']} ({d['group']}) PGD")
            ax.plot(depth, noise, ":", color=colour, alpha=0.7, label=f"{d['label']} noise")
        ax.set(title=f"eps = {eps}", xlabel="layer depth (hooked layer index)", ylabel=ylabel)
        if log:
            ax.set_yscale("log")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def _table(payload: Mapping[str, Any], variant: str) -> pd.DataFrame:
    """Per dataset, eps and seed: the matched model, the attack and the quantities on the ``variant`` images."""
    records = []
    for k in range(len(payload["runs"][0]["datasets"])):
        for i, eps in enumerate(payload["config"]["eps"]):
            for run in payload["runs"]:
                d = run["datasets"][k]
                pgd, noise = _pick(d, "pgd", eps, variant), _pick(d, "noise", eps, variant)
                cosine = pgd["cosine"][-1]
                if variant == "fooled":  # the verdict's interval
                    cosine = _ci(run["verdict"]["per_eps"][i]["alignment"][d["label"]]["cosine"])
                records.append(
                    {
                        "dataset": d["label"],
                        "group": d["group"],
                        "eps": eps,
                        "seed": run["seed"],
                        "step": d["step"],
                        "val / test acc": f"{d['val_accuracy']:.3f} / {d['accuracy']:.3f}",
                        "PGD success": pgd["success_rate"],
                        "n": pgd["n"],
                        "dev mean PGD": _mean(pgd["deviation"]),
                        "dev mean noise": _mean(noise["deviation"]),
                        "dev deep PGD": pgd["deviation"][-1],
                        "cos deep PGD": cosine,
                        "cos deep noise": noise["cosine"][-1],
                        "MAHA AUROC deep PGD": pgd["maha_auroc"][-1],
                        "MAHA AUROC deep noise": noise["maha_auroc"][-1],
                    }
                )
    return pd.DataFrame(records).set_index(["dataset", "group", "eps", "seed"])


def _ratio_cells(ratios: Mapping[str, Any], label: str, fmt: Any) -> dict[str, str]:
    """The ratio columns of one medical model: ``fmt`` of each variant's and key's ratio."""
    names = {"deviation_mean": "mean over layers", "deviation_deep": "deepest layer"}
    return {f"{v}: {names[k]}": fmt(ratios[v][label][k]) for v in VARIANTS for k in RATIO_KEYS}


def _ratio_table(payload: Mapping[str, Any]) -> pd.DataFrame:
    """Per eps and medical model: each seed's deviation ratios over the natural model's [bootstrap interval] and
    verdict, then their mean [t interval] over seeds; on the fooled and on all attacked images."""
    records = []
    for i, across in enumerate(payload["verdict"]["ratios_over_seeds"]):
        for label in across["ratios"]["fooled"]:
            key = {"eps": across["eps"], "dataset": label}
            for run in payload["runs"]:
                cells = _ratio_cells(run["verdict"]["per_eps"][i]["ratios"], label, _ci)
                word = run["verdict"]["medical_more_vulnerable"] or "cannot be decided"
                records.append({**key, "seed": str(run["seed"]), **cells, "verdict": word})
            records.append({**key, "seed": "mean (t interval)", **_ratio_cells(across["ratios"], label, _tci)})
    return pd.DataFrame(records).set_index(["eps", "dataset", "seed"])


def stress_sections(payload: Mapping[str, Any]) -> list[Any]:
    """Report sections of a stress-study payload: verdict, ratio table, tables of both variants, depth plots."""
    cfg = payload["config"]
    matched = (
        f"matched on validation accuracy (snapshot every {cfg['match_every']} steps; the step is shown)"
        if cfg["match_accuracy"]
        else "unmatched"
    )
    section = Section(
        "Stress test and fixed-direction analysis (paper A)",
        "Relative GAP-feature deviation under untargeted PGD and under uniform noise of the same L-inf budget, per "
        "layer; within-class mean pairwise cosine of the feature shifts; AUROC of the tied-covariance Mahalanobis "
        f"outlier score (shifted vs clean features). {len(payload['runs'])} training seeds; models {matched}. "
        "Correctly classified test images of the pool: those PGD fooled (the verdicts' images) and all attacked ones "
        "(n); the noise control perturbs the same images.",
    )
    section.paragraph(_verdict_text(payload), css="verdict")
    if payload["verdict"]["ratios_over_seeds"] and payload["verdict"]["ratios_over_seeds"][0]["ratios"]["fooled"]:
        section.table(
            _ratio_table(payload),
            caption="PGD deviation of each medical model over the natural model's: per seed with its 95% bootstrap "
            "interval, and the mean over seeds with its 95% t interval.",
        )
    deep = payload["runs"][0]["datasets"][0]["layers"][-1]
    for variant in VARIANTS:
        section.table(
            _table(payload, variant),
            caption=f"On {VARIANT_TEXT[variant]}: 'deep' = the last hooked layer ({deep}); dev = relative "
            "deviation; step = the matched snapshot.",
        )
    for variant in VARIANTS:
        section.figure(
            _depth_figure(payload, "deviation", "relative feature deviation", variant, log=True),
            caption=f"Deviation vs depth per eps on {VARIANT_TEXT[variant]}, mean over seeds: medical solid, "
            "natural dashed, noise control dotted.",
        )
    section.figure(
        _depth_figure(payload, "cosine", "within-class shift cosine", "fooled"),
        caption="Alignment of the feature shifts vs depth on the fooled images, mean over seeds (1 = one fixed "
        "direction).",
    )
    section.figure(
        _depth_figure(payload, "maha_auroc", "Mahalanobis AUROC", "fooled"),
        caption="Outlier score of the shifted features (AUROC of shifted vs clean) vs depth on the fooled images, "
        "mean over seeds.",
    )
    return [section]
