"""What the UAP study's payload says: each attack's relation to the fine-tuning family, kappa changes with paired
image-bootstrap intervals per seed combined over seeds, the clean-performance comparisons (intervals, paired t-tests
and equivalence tests over folds and over seeds) and the rows.

Kappa changes. Per (model, attack, eps, seed) the change is fine-tuned minus baseline quadratic kappa on the whole
test pool; its 95% interval within the seed is a percentile bootstrap over images (``bootstrap`` replicates, the
same resampled images for both models: :func:`paired_kappa_changes`). Over the S seeds, :func:`combine_seeds`
reports the mean change with the interval mean +- t_{0.975, S-1} * sqrt(s_seeds^2 / S + v_images): s_seeds^2 is the
between-seed variance of the per-seed changes (training, fine-tuning and attack randomness) and v_images the
bootstrap variance of the seed-mean change when every seed's images are resampled together (the test pool is shared
by the seeds, so its sampling error does not average out over them). The seed-by-image part is counted in both
terms, which makes the interval slightly conservative; t with S - 1 degrees of freedom keeps it honest at 2-5 seeds,
where a bootstrap over seeds would under-cover.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from engine.attacks.uap import UAP_METHODS
from engine.errors import UserError
from engine.metrics import mean_ci, paired_ttest, percentile_ci, quadratic_weighted_kappa, resample_kappas, tost_paired
from engine.runs.schema import Metric
from engine.runs.studies.base import study_row

FAMILIES = {kind: method.family for kind, method in UAP_METHODS.items()}  # algorithm family of each UAP kind
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


def paired_kappa_changes(
    y: Any,
    pairs: Mapping[Hashable, tuple[Sequence[Any], Sequence[Any]]],
    num_classes: int,
    n_boot: int,
    seed: int,
) -> dict[Hashable, tuple[np.ndarray, np.ndarray]]:
    """Per key of ``pairs`` = (baseline, fine-tuned) predictions, one row per seed ((S, n) each): the whole-pool
    kappa change fine-tuned minus baseline per seed (S,) and its ``n_boot`` bootstrap replicates (S, n_boot). Every
    replicate resamples the same images for both models, every seed and every key (resample_kappas, seeded)."""
    y, arrays = np.asarray(y), {}
    for key, (base, tuned) in pairs.items():
        arrays[key] = {"base": np.asarray(base), "tuned": np.asarray(tuned)}
        if arrays[key]["base"].shape != arrays[key]["tuned"].shape or arrays[key]["base"].ndim != 2:
            raise UserError(f"pairs[{key!r}]: baseline and fine-tuned predictions must both be (seeds, n) arrays")
    preds = {f"{j}/{role}/{s}": p for j, sides in enumerate(arrays.values())
             for role, ps in sides.items() for s, p in enumerate(ps)}  # fmt: skip
    boot = resample_kappas(y, preds, "bootstrap", n_boot, seed, num_classes)
    whole = {name: quadratic_weighted_kappa(y, p, num_classes) for name, p in preds.items()}
    out = {}
    for j, (key, sides) in enumerate(arrays.items()):
        names = [(f"{j}/tuned/{s}", f"{j}/base/{s}") for s in range(len(sides["base"]))]
        out[key] = (np.array([whole[t] - whole[b] for t, b in names]), np.array([boot[t] - boot[b] for t, b in names]))
    return out


def combine_seeds(point: Any, reps: Any, level: float = 0.95) -> dict[str, Any]:
    """Mean over seeds of the per-seed changes ``point`` (S,) with the interval of the module docstring, from
    ``reps`` (S, B): bootstrap replicates sharing their resampled images across seeds. ``per_seed``: each seed's
    change with its percentile interval; ``se_seeds`` and ``se_images``: the two standard-error terms."""
    point, reps = np.asarray(point, dtype=np.float64), np.asarray(reps, dtype=np.float64)
    if point.ndim != 1 or len(point) < 2 or reps.ndim != 2 or len(reps) != len(point):
        raise UserError(f"point must be (seeds >= 2,) and reps (seeds, replicates), got {point.shape}, {reps.shape}")
    s = len(point)
    seed_means = reps.mean(axis=0)
    seed_means = seed_means[np.isfinite(seed_means)]  # a replicate where some seed's kappa is undefined
    var_seeds = float(point.var(ddof=1)) / s
    var_images = float(seed_means.var(ddof=1)) if len(seed_means) >= 2 else float("nan")
    mean = float(point.mean())
    half = float(stats.t.ppf((1 + level) / 2, s - 1) * np.sqrt(var_seeds + var_images))
    per_seed = [dict(zip(("change", "low", "high"), (float(p), *percentile_ci(r, level)), strict=True))
                for p, r in zip(point, reps, strict=True)]  # fmt: skip
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "n": s,
        "level": float(level),
        "se_seeds": float(np.sqrt(var_seeds)),
        "se_images": float(np.sqrt(var_images)),
        "per_seed": per_seed,
    }


def kappa_gains(payload: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per (model, attack, eps): baseline and fine-tuned kappa (mean and 95% t interval over seeds) and the kappa
    change (the gain, :func:`combine_seeds`); and per relation (and 'held_out', every relation but 'seen'): the
    gains of that relation's conditions averaged within each seed and bootstrap replicate, then combined the same
    way."""
    cfg, y, k = payload["config"], payload["labels"], len(payload["classes"])
    gains, pairs = [], {}
    for m in payload["models"]:
        runs = m["runs"]
        for i, a in enumerate(runs[0]["baseline"]["attacks"]):
            side = {label: [r[label]["attacks"][i] for r in runs] for label in ("baseline", "finetuned")}
            pairs[len(gains)] = tuple([e["pred"] for e in side[label]] for label in ("baseline", "finetuned"))
            gains.append(
                {
                    "model": m["name"],
                    "attack": a["attack"],
                    "eps": a["eps"],
                    "relation": payload["relations"][a["attack"]],
                    **{label: mean_ci([e["kappa"] for e in side[label]]) for label in side},
                }
            )
    changes = paired_kappa_changes(y, pairs, k, cfg["bootstrap"], cfg["seed"])
    for i, g in enumerate(gains):
        g["gain"] = combine_seeds(*changes[i])
    summary = {}
    for relation, members in [*((r, (r,)) for r in RELATIONS), ("held_out", HELD_OUT)]:
        chosen = [i for i, g in enumerate(gains) if g["relation"] in members]
        if chosen:
            point = np.nanmean([changes[i][0] for i in chosen], axis=0)
            reps = np.nanmean([changes[i][1] for i in chosen], axis=0)
            summary[relation] = {**combine_seeds(point, reps), "conditions": len(chosen)}
    return gains, summary


def _paired_tests(tuned: np.ndarray, base: np.ndarray, test: Mapping[str, Any]) -> dict[str, Any]:
    """Difference tuned - base (mean, 95% t interval), paired t-test and TOST at +-``margin``."""
    return {
        "diff": mean_ci(tuned - base),
        "tost": tost_paired(tuned, base, test["margin"], test["alpha"]),
        "ttest": paired_ttest(tuned, base, test["alpha"]),
    }


def clean_comparisons(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Clean kappa of each fine-tuned model vs its own baseline, and of the fine-tuned ensemble vs the baselines'
    ensemble, each tested twice: ``folds``, on the same ``clean_test.folds`` shuffled folds of the test pool with
    both sides' fold kappas averaged over seeds; ``seeds``, on the whole-pool kappas, one difference per seed. Each
    gives the mean difference with its 95% interval, a paired t-test and the equivalence test (TOST at
    +-``margin``)."""
    cfg, y, k = payload["config"], np.asarray(payload["labels"]), len(payload["classes"])
    test = cfg["clean_test"]
    pairs = [(f"{m['name']}+uap-ft", m["name"], [r["finetuned"]["clean_pred"] for r in m["runs"]],
              [r["baseline"]["clean_pred"] for r in m["runs"]]) for m in payload["models"]]  # fmt: skip
    ensemble = payload["ensemble"]
    pairs.append(("ensemble(uap-ft)", "ensemble(baseline)", ensemble["finetuned"], ensemble["baseline"]))
    out = []
    for tuned_name, base_name, tuned, base in pairs:
        sides = {"tuned": tuned, "base": base}
        preds = {f"{role}{s}": np.asarray(p) for role, ps in sides.items() for s, p in enumerate(ps)}
        folds = resample_kappas(y, preds, "folds", test["folds"], cfg["seed"], k)
        fold_means = {role: np.mean([folds[f"{role}{s}"] for s in range(len(ps))], 0) for role, ps in sides.items()}
        whole = {role: np.array([quadratic_weighted_kappa(y, p, k) for p in ps]) for role, ps in sides.items()}
        out.append(
            {
                "tuned": tuned_name,
                "baseline": base_name,
                "kappa_baseline": mean_ci(whole["base"]),
                "kappa_tuned": mean_ci(whole["tuned"]),
                "folds": _paired_tests(fold_means["tuned"], fold_means["base"], test),
                "seeds": {
                    **_paired_tests(whole["tuned"], whole["base"], test),
                    "per_seed": (whole["tuned"] - whole["base"]).tolist(),
                },
            }
        )
    return out


def uap_rows(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Long-format rows of a UAP-study payload; values over seeds are means with their 95% interval (kappa gains:
    the combined interval of :func:`combine_seeds`). The clean tests over folds and over seeds: ``subset`` "folds" and
    "seeds"; the mean gains per relation to the fine-tuning attack: ``subset`` the relation."""
    ds, rows = payload["dataset"], []

    def add(model: str, metric: Metric, stat: Mapping[str, Any], **extra: Any) -> None:
        rows.append(study_row(ds, model, metric, stat["mean"], ci_low=stat["low"], ci_high=stat["high"], **extra))

    for m in payload["models"]:
        for label, model in (("baseline", m["name"]), ("finetuned", f"{m['name']}+uap-ft")):
            for i, a in enumerate(m["runs"][0][label]["attacks"]):
                for metric in (Metric.KAPPA, Metric.ACCURACY, Metric.FOOLING_RATE):
                    values = [r[label]["attacks"][i][metric] for r in m["runs"]]
                    add(model, metric, mean_ci(values), attack=a["attack"], eps=a["eps"])
    for g in payload["gains"]:
        add(g["model"], Metric.KAPPA_GAIN, g["gain"], attack=g["attack"], eps=g["eps"])
    for relation, stat in payload["summary"].items():
        add("all", Metric.KAPPA_GAIN_MEAN, stat, subset=relation)
    for c in payload["clean"]:
        add(c["baseline"], Metric.KAPPA, c["kappa_baseline"])
        add(c["tuned"], Metric.KAPPA, c["kappa_tuned"])
        for test in ("folds", "seeds"):  # the clean tests over folds and over seeds (subset)
            add(c["tuned"], Metric.CLEAN_KAPPA_DIFF_VS_BASELINE, c[test]["diff"], subset=test)
            rows.append(study_row(ds, c["tuned"], Metric.TOST_P_CLEAN_KAPPA, c[test]["tost"]["p"], subset=test))
            rows.append(study_row(ds, c["tuned"], Metric.TTEST_P_CLEAN_KAPPA, c[test]["ttest"]["p"], subset=test))
    return rows


__all__ = [
    "FAMILIES",
    "HELD_OUT",
    "RELATIONS",
    "clean_comparisons",
    "combine_seeds",
    "kappa_gains",
    "paired_kappa_changes",
    "relations",
    "uap_attacks",
    "uap_rows",
]
