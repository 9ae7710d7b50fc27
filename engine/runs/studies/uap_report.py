"""Report sections of the UAP study (paper B): verdict paragraphs, tables with 95% intervals (over seeds, and per
seed over images), confusion matrices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from engine.html import Section, plt
from engine.runs.studies.uap_analysis import FAMILIES, RELATIONS


def _ci(stat: Mapping[str, Any], scale: float = 1.0, fmt: str = "{:+.2f}") -> str:
    """'mean [low, high]' of a dict with mean, low and high (bounds omitted when undefined)."""
    text = fmt.format(scale * stat["mean"])
    if np.isfinite(stat["low"]):
        text += f" [{fmt.format(scale * stat['low'])}, {fmt.format(scale * stat['high'])}]"
    return text


def _gain_word(stat: Mapping[str, Any]) -> str:
    if stat["low"] > 0:
        return "HOLDS"
    return "does NOT hold (lower after fine-tuning)" if stat["high"] < 0 else "is NOT supported (interval contains 0)"


def _gain_verdict(payload: Mapping[str, Any]) -> str:
    s, n = payload["summary"], len(payload["seeds"])
    held = [r for r in RELATIONS if r != "seen" and r in s]
    if not held:
        return "No held-out attack was evaluated."
    parts = [f"against {RELATIONS[r]} attacks it {_gain_word(s[r])}: {_ci(s[r], 100)}" for r in held]
    seen = f"; under the seen family {_ci(s['seen'], 100)}" if "seen" in s else ""
    return (
        "Claim 'UAP fine-tuning raises kappa against unseen attacks', by relation to the fine-tuning family: "
        + "; ".join(parts)
        + f" (kappa gain x 100, mean over {n} seeds [95% interval: between-seed t, widened by the paired image "
        f"bootstrap]); all held-out attacks pooled "
        f"{_ci(s['held_out'], 100)}{seen}. Paper B reports +3.41 mean and +31.92 max on its data."
    )


CLEAN_WORDS = {
    "equivalent": "no clean loss beyond the margin: equivalence shown",
    "higher": "clean kappa higher by more than the margin",
    "lower": "a clean loss larger than the margin",
    "inconclusive": "inconclusive: the interval crosses the margin",
}


def _tost_text(test: Mapping[str, Any], unit: str) -> str:
    tost = test["tost"]
    return (
        f"{tost['mean_diff']:+.4f} over {tost['n']} {unit}, {100 * tost['ci_level']:.0f}% interval "
        f"[{tost['ci_low']:+.4f}, {tost['ci_high']:+.4f}], TOST p = {tost['p']:.3g} ({CLEAN_WORDS[tost['decision']]}), "
        f"paired t-test p = {test['ttest']['p']:.3g}"
    )


def _clean_verdict(payload: Mapping[str, Any]) -> str:
    ens = payload["clean"][-1]
    tost = ens["folds"]["tost"]
    supported = tost["decision"] in ("equivalent", "higher")
    word = "HOLDS" if supported else ("does NOT hold" if tost["decision"] == "lower" else "is NOT shown")
    return (
        f"Claim 'the fine-tuned ensemble loses no clean performance' {word} at a margin of +-{tost['margin']:g} "
        f"kappa on the shared folds: {ens['tuned']} minus {ens['baseline']} clean kappa "
        f"{_tost_text(ens['folds'], 'folds')}. On the whole pool, one difference per seed (each seed's own "
        f"baselines): {_tost_text(ens['seeds'], 'seeds')}. Each model against its own baseline (folds; seeds): "
        + "; ".join(
            f"{c['tuned']} {c['folds']['tost']['mean_diff']:+.4f} ({c['folds']['tost']['decision']}; "
            f"{c['seeds']['tost']['decision']})"
            for c in payload["clean"][:-1]
        )
        + "."
    )


def _attack_table(payload: Mapping[str, Any]) -> pd.DataFrame:
    records = []
    for g in payload["gains"]:
        records.append(
            {
                "model": g["model"],
                "attack": g["attack"],
                "eps": g["eps"],
                "relation": RELATIONS[g["relation"]],
                "kappa base": _ci(g["baseline"], fmt="{:.3f}"),
                "kappa FT": _ci(g["finetuned"], fmt="{:.3f}"),
                "gain x 100": _ci(g["gain"], 100),
                "gain x 100 per seed": "; ".join(
                    _ci({"mean": p["change"], **p}, 100, "{:+.1f}") for p in g["gain"]["per_seed"]
                ),
            }
        )
    return pd.DataFrame(records).set_index(["model", "attack", "eps"])


def _clean_table(payload: Mapping[str, Any]) -> pd.DataFrame:
    records = []
    for c in payload["clean"]:
        record = {
            "comparison": f"{c['tuned']} vs {c['baseline']}",
            "kappa baseline": _ci(c["kappa_baseline"], fmt="{:.3f}"),
            "kappa FT": _ci(c["kappa_tuned"], fmt="{:.3f}"),
        }
        for test in ("folds", "seeds"):
            record[f"diff, {test} (95% CI)"] = _ci(c[test]["diff"], fmt="{:+.4f}")
            record[f"TOST p, {test}"] = f"{c[test]['tost']['p']:.3g}"
            record[f"decision, {test}"] = c[test]["tost"]["decision"]
            record[f"t-test p, {test}"] = f"{c[test]['ttest']['p']:.3g}"
        records.append(record)
    return pd.DataFrame(records).set_index("comparison")


def _confusion_figure(panels: list[tuple[str, list[list[int]]]], classes: list[str]) -> Any:
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.3), squeeze=False)
    for ax, (title, cm) in zip(axes[0], panels, strict=True):
        cm = np.asarray(cm)
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "k")
        ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(len(classes)), yticks=range(len(classes)))
        ax.title.set_fontsize(8)
    fig.tight_layout()
    return fig


def _confusions(payload: Mapping[str, Any]) -> Any:
    """The first model's worst held-out attack (first seed), baseline and fine-tuned."""
    first = payload["models"][0]["runs"][0]
    attacks = first["baseline"]["attacks"]
    held = [i for i, a in enumerate(attacks) if payload["relations"][a["attack"]] != "seen"] or range(len(attacks))
    i = min(held, key=lambda j: attacks[j]["kappa"] if np.isfinite(attacks[j]["kappa"]) else np.inf)
    name = f"{payload['models'][0]['name']} {attacks[i]['attack']} {attacks[i]['eps']}"
    panels = [(f"{name} base", attacks[i]["confusion"]), (f"{name} FT", first["finetuned"]["attacks"][i]["confusion"])]
    return _confusion_figure(panels, payload["classes"])


def uap_sections(payload: Mapping[str, Any]) -> list[Any]:
    """Report sections of a UAP-study payload: verdicts, tables, confusion matrices."""
    cfg = payload["config"]
    families = sorted({FAMILIES[m] for m in cfg["finetune"]["methods"]})
    section = Section(
        "UAP attacks and UAP fine-tuning defence (paper B)",
        f"{payload['dataset']}, {len(payload['labels'])} test images, quadratic-weighted kappa, "
        f"{len(payload['seeds'])} seeds (each: baselines trained, UAP fine-tuned and attacked anew; data, split, "
        f"fitting and test images fixed). UAPs fitted on {cfg['uap']['fit']} validation images against the model "
        "evaluated (white-box). "
        f"Fine-tuned on {', '.join(cfg['finetune']['methods'])} UAPs (L-inf {cfg['finetune']['eps']}; family: "
        f"{', '.join(families)}).",
    )
    section.paragraph(_gain_verdict(payload), css="verdict")
    section.paragraph(_clean_verdict(payload), css="verdict")
    section.table(
        _attack_table(payload),
        caption="Kappa under each attack, baseline vs UAP fine-tuned (FT): mean [95% t interval] over seeds. Gain = "
        f"FT - base per seed, with its 95% paired bootstrap interval over the test images ({cfg['bootstrap']} "
        "replicates, the same images for both models); over seeds, their mean with a between-seed t interval widened "
        "by the image-bootstrap variance of that mean. Relation: how the attack relates to the fine-tuning UAPs "
        "(seen = same algorithm family and norm; unseen norm = a fine-tuning family in L2; unseen family = another "
        "algorithm; per-image PGD).",
    )
    section.table(
        _clean_table(payload),
        caption=f"Clean kappa (mean over seeds [95% t interval]): each FT model vs its own baseline, FT ensemble vs "
        f"the ensemble of the same seed's baselines. Folds: mean difference over {cfg['clean_test']['folds']} "
        f"shared folds of the test pool (both sides' fold kappas averaged over seeds); seeds: whole-pool difference, "
        f"one per seed. TOST = paired equivalence test at +-{cfg['clean_test']['margin']:g} kappa, alpha "
        f"{cfg['clean_test']['alpha']:g}; t-test = paired t-test (paper B's test).",
    )
    section.figure(
        _confusions(payload),
        caption="Confusion matrices (rows true grade, columns predicted, first seed) under the held-out attack "
        "that hurt the first baseline most.",
    )
    return [section]
