"""What the UAP study's payload says: each attack's relation to the fine-tuning family, kappa gains with 95%
intervals over seeds, the clean-performance comparisons (CI, paired t-test, equivalence test) and the rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from engine.metrics import mean_ci, paired_ttest, quadratic_weighted_kappa, resample_kappas, tost_paired
from engine.runs.studies.base import study_row

# Algorithm family of each UAP kind: the targeted UAP's inner step is a targeted BIM, the same sign-gradient steps
# as SGD-UAP; DeepFool-UAP adds minimal L2 steps; the data-free UAP maximises feature activations without images.
FAMILIES = {
    "deepfool": "DeepFool",
    "sgd": "sign gradient",
    "targeted": "sign gradient",
    "data_free": "feature maximisation",
}
RELATIONS = {
    "seen": "seen family and norm",
    "unseen_norm": "unseen norm",
    "unseen_family": "unseen family",
    "per_image": "per-image PGD",
}
HELD_OUT = ("unseen_norm", "unseen_family", "per_image")


def uap_attacks(cfg: Mapping[str, Any]) -> list[tuple[str, str, str, Any]]:
    """The UAPs a study evaluates as (name, kind, norm, eps): every L-inf kind x eps, then L2 kinds x L2 eps."""
    linf = [(f"{kind}_uap", kind, "linf", eps) for kind in cfg["methods"] for eps in cfg["eps"]]
    return linf + [(f"{kind}_uap_l2", kind, "l2", eps) for kind in cfg["l2"]["methods"] for eps in cfg["l2"]["eps"]]


def relations(cfg: Mapping[str, Any]) -> dict[str, str]:
    """{attack name: relation to the fine-tuning UAPs (L-inf, ``finetune.methods``)}: 'seen' (same family and
    norm), 'unseen_norm' (a fine-tuning family in another norm), 'unseen_family', or 'per_image' (PGD)."""
    families = {FAMILIES[kind] for kind in cfg["finetune"]["methods"]}
    out = {}
    for name, kind, norm, _ in uap_attacks(cfg):
        if FAMILIES[kind] not in families:
            out[name] = "unseen_family"
        else:
            out[name] = "seen" if norm == "linf" else "unseen_norm"
    return {**out, "pgd": "per_image"}


def kappa_gains(payload: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per (model, attack, eps): baseline and fine-tuned kappa and their difference (the gain), each as a mean
    with a 95% t interval over seeds; and per relation (and 'held_out', every relation but 'seen'): the gain
    averaged over that relation's conditions within each seed, then its mean and interval over seeds."""
    gains = []
    for m in payload["models"]:
        runs = m["runs"]
        for i, a in enumerate(runs[0]["baseline"]["attacks"]):
            base = [r["baseline"]["attacks"][i]["kappa"] for r in runs]
            tuned = [r["finetuned"]["attacks"][i]["kappa"] for r in runs]
            per_seed = [t - b for t, b in zip(tuned, base, strict=True)]
            gains.append(
                {
                    "model": m["name"],
                    "attack": a["attack"],
                    "eps": a["eps"],
                    "relation": payload["relations"][a["attack"]],
                    "baseline": mean_ci(base),
                    "finetuned": mean_ci(tuned),
                    "gain": mean_ci(per_seed),
                    "per_seed": per_seed,
                }
            )
    summary = {}
    for relation, members in [*((r, (r,)) for r in RELATIONS), ("held_out", HELD_OUT)]:
        chosen = [g for g in gains if g["relation"] in members]
        if chosen:
            per_seed = np.nanmean([g["per_seed"] for g in chosen], axis=0)
            summary[relation] = {**mean_ci(per_seed), "conditions": len(chosen), "per_seed": per_seed.tolist()}
    return gains, summary


def clean_comparisons(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Clean kappa of each fine-tuned model vs its own baseline, and of the fine-tuned ensemble vs the baselines'
    ensemble. On the same ``clean_test.folds`` shuffled folds of the test pool, the fine-tuned fold kappas are
    averaged over seeds; the fold differences give a 95% interval, a paired t-test and the equivalence test
    (TOST at +-``margin``). The whole-pool kappas and their per-seed difference are reported beside."""
    cfg, y, k = payload["config"], np.asarray(payload["labels"]), len(payload["classes"])
    test = cfg["clean_test"]
    pairs = [(f"{m['name']}+uap-ft", m["name"], [r["finetuned"]["clean_pred"] for r in m["runs"]], m["clean_pred"])
             for m in payload["models"]]  # fmt: skip
    ensemble = payload["ensemble"]
    pairs.append(("ensemble(uap-ft)", "ensemble(baseline)", ensemble["finetuned"], ensemble["baseline_pred"]))
    out = []
    for tuned_name, base_name, tuned, base in pairs:
        preds = {"base": np.asarray(base), **{f"seed{i}": np.asarray(p) for i, p in enumerate(tuned)}}
        folds = resample_kappas(y, preds, "folds", test["folds"], cfg["seed"], k)
        tuned_folds = np.mean([folds[f"seed{i}"] for i in range(len(tuned))], axis=0)
        base_kappa = quadratic_weighted_kappa(y, preds["base"], k)
        per_seed = [quadratic_weighted_kappa(y, preds[f"seed{i}"], k) for i in range(len(tuned))]
        out.append(
            {
                "tuned": tuned_name,
                "baseline": base_name,
                "kappa_baseline": base_kappa,
                "kappa_tuned": mean_ci(per_seed),
                "diff_seeds": mean_ci(np.asarray(per_seed) - base_kappa),
                "diff_folds": mean_ci(tuned_folds - folds["base"]),
                "tost": tost_paired(tuned_folds, folds["base"], test["margin"], test["alpha"]),
                "ttest": paired_ttest(tuned_folds, folds["base"], test["alpha"]),
            }
        )
    return out


def uap_rows(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Long-format rows of a UAP-study payload; values over seeds are means with their 95% interval."""
    ds, rows = payload["dataset"], []

    def add(model: str, metric: str, stat: Mapping[str, Any], **extra: Any) -> None:
        rows.append(study_row(ds, model, metric, stat["mean"], ci_low=stat["low"], ci_high=stat["high"], **extra))

    for m in payload["models"]:
        for label, model in (("baseline", m["name"]), ("finetuned", f"{m['name']}+uap-ft")):
            for i, a in enumerate(m["runs"][0][label]["attacks"]):
                for metric in ("kappa", "accuracy", "fooling_rate"):
                    values = [r[label]["attacks"][i][metric] for r in m["runs"]]
                    add(model, metric, mean_ci(values), attack=a["attack"], eps=a["eps"])
    for g in payload["gains"]:
        add(g["model"], "kappa_gain", g["gain"], attack=g["attack"], eps=g["eps"])
    for relation, stat in payload["summary"].items():
        add("all", f"kappa_gain_mean_{relation}", stat)
    for c in payload["clean"]:
        rows.append(study_row(ds, c["baseline"], "kappa", c["kappa_baseline"]))
        add(c["tuned"], "kappa", c["kappa_tuned"])
        add(c["tuned"], "clean_kappa_diff_vs_baseline", c["diff_folds"])
        rows.append(study_row(ds, c["tuned"], "tost_p_clean_kappa", c["tost"]["p"]))
        rows.append(study_row(ds, c["tuned"], "ttest_p_clean_kappa", c["ttest"]["p"]))
    return rows


__all__ = [
    "FAMILIES",
    "HELD_OUT",
    "RELATIONS",
    "clean_comparisons",
    "kappa_gains",
    "relations",
    "uap_attacks",
    "uap_rows",
]
