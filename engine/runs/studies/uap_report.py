"""Report sections of the UAP study (paper B): verdict paragraphs, tables with 95% intervals over seeds,
confusion matrices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from engine.html import Section, plt
from engine.runs.studies.uap_analysis import FAMILIES, RELATIONS


def _ci(stat: Mapping[str, Any], scale: float = 1.0, fmt: str = "{:+.2f}") -> str:
    """'mean [low, high]' of a mean_ci dict (bounds omitted when undefined, e.g. one seed)."""
    text = fmt.format(scale * stat["mean"])
    if np.isfinite(stat["low"]):
        text += f" [{fmt.format(scale * stat['low'])}, {fmt.format(scale * stat['high'])}]"
    return text


def _gain_word(stat: Mapping[str, Any]) -> str:
    if not np.isfinite(stat["low"]):
        return "cannot be decided from one seed"
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
        + f" (kappa gain x 100, mean [95% t interval] over {n} seeds); all held-out attacks pooled "
        f"{_ci(s['held_out'], 100)}{seen}. Paper B reports +3.41 mean and +31.92 max on its data."
    )


CLEAN_WORDS = {
    "equivalent": "no clean loss beyond the margin: equivalence shown",
    "higher": "clean kappa higher by more than the margin",
    "lower": "a clean loss larger than the margin",
    "inconclusive": "inconclusive: the interval crosses the margin",
}


def _clean_verdict(payload: Mapping[str, Any]) -> str:
    ens = payload["clean"][-1]
    tost = ens["tost"]
    supported = tost["decision"] in ("equivalent", "higher")
    word = "HOLDS" if supported else ("does NOT hold" if tost["decision"] == "lower" else "is NOT shown")
    return (
        f"Claim 'the fine-tuned ensemble loses no clean performance' {word} at a margin of +-{tost['margin']:g} "
        f"kappa: {ens['tuned']} minus {ens['baseline']} clean kappa {tost['mean_diff']:+.4f} over "
        f"{tost['n']} folds, {100 * tost['ci_level']:.0f}% interval [{tost['ci_low']:+.4f}, {tost['ci_high']:+.4f}], "
        f"TOST p = {tost['p']:.3g} ({CLEAN_WORDS[tost['decision']]}). Each model against its own baseline: "
        + "; ".join(
            f"{c['tuned']} {c['tost']['mean_diff']:+.4f} ({c['tost']['decision']})" for c in payload["clean"][:-1]
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
            }
        )
    return pd.DataFrame(records).set_index(["model", "attack", "eps"])


def _clean_table(payload: Mapping[str, Any]) -> pd.DataFrame:
    records = []
    for c in payload["clean"]:
        records.append(
            {
                "comparison": f"{c['tuned']} vs {c['baseline']}",
                "kappa baseline": f"{c['kappa_baseline']:.3f}",
                "kappa FT (seeds)": _ci(c["kappa_tuned"], fmt="{:.3f}"),
                "diff, folds (95% CI)": _ci(c["diff_folds"], fmt="{:+.4f}"),
                "TOST p": f"{c['tost']['p']:.3g}",
                "decision": c["tost"]["decision"],
                "t-test p": f"{c['ttest']['p']:.3g}",
            }
        )
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
        f"{len(payload['seeds'])} seeds (each: UAP fine-tuning and every attack re-run; data, split and baselines "
        f"fixed). UAPs fitted on {cfg['uap']['fit']} validation images against the model evaluated (white-box). "
        f"Fine-tuned on {', '.join(cfg['finetune']['methods'])} UAPs (L-inf {cfg['finetune']['eps']}; family: "
        f"{', '.join(families)}).",
    )
    section.paragraph(_gain_verdict(payload), css="verdict")
    section.paragraph(_clean_verdict(payload), css="verdict")
    section.table(
        _attack_table(payload),
        caption="Kappa under each attack, baseline vs UAP fine-tuned (FT): mean [95% t interval] over seeds; gain = "
        "FT - base. Relation: how the attack relates to the fine-tuning UAPs (seen = same algorithm family and norm; "
        "unseen norm = a fine-tuning family in L2; unseen family = another algorithm; per-image PGD).",
    )
    section.table(
        _clean_table(payload),
        caption=f"Clean kappa: each FT model vs its own baseline, FT ensemble vs the ensemble of the same baselines. "
        f"diff = mean over {cfg['clean_test']['folds']} shared folds of the test pool (FT fold kappas averaged over "
        f"seeds); TOST = paired equivalence test at +-{cfg['clean_test']['margin']:g} kappa, alpha "
        f"{cfg['clean_test']['alpha']:g}.",
    )
    section.figure(
        _confusions(payload),
        caption="Confusion matrices (rows true grade, columns predicted, first seed) under the held-out attack "
        "that hurt the first baseline most.",
    )
    return [section]
