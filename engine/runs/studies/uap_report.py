"""Report sections of the UAP study (paper B): verdict paragraph, tables, confusion matrices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from engine.html import Section, plt


def is_heldout(attack: str, heldout: list[str]) -> bool:
    """Whether an attack name ("deepfool_uap", "pgd", ...) was unseen during fine-tuning (PGD always is)."""
    return attack == "pgd" or attack.removesuffix("_uap") in heldout


def _verdict_text(payload: Mapping[str, Any]) -> str:
    s, t = payload["summary"], payload["ttest"]
    base_name = payload["models"][0]["name"]
    gain = "HOLDS" if s["mean_gain"] > 0 else "does NOT hold"
    at = s["max_at"] or {}
    lost = t["significant"] and t["mean_diff"] < 0
    direction = "" if not t["significant"] else (" - significantly lower" if lost else " - significantly higher")
    return (
        f"Claim 'UAP fine-tuning raises kappa against unseen attacks' {gain} on this data: mean kappa gain "
        f"{100 * s['mean_gain']:+.2f} and max {100 * s['max_gain']:+.2f} (kappa x 100; max at {at.get('model')}, "
        f"{at.get('attack')} eps={at.get('eps')}), min {100 * s['min_gain']:+.2f}, negative in {s['n_negative']} "
        f"of {s['n']} (model, held-out attack, eps) conditions; paper B reports +3.41 mean and +31.92 max on its "
        f"data. Claim 'the ensemble loses no "
        f"statistically significant clean performance' {'does NOT hold' if lost else 'HOLDS'}: clean kappa of "
        f"the ensemble minus {base_name} baseline {t['mean_diff']:+.4f} averaged over {t['n']} "
        f"{t['resampling']}, paired t-test t={t['t']:.3f}, p={t['p']:.4g} "
        f"({'significant' if t['significant'] else 'not significant'} at {t['alpha']}{direction})."
    )


def _attack_table(payload: Mapping[str, Any]) -> pd.DataFrame:
    records = []
    for m in payload["models"]:
        tuned = {(a["attack"], a["eps"]): a for a in m["finetuned"]["attacks"]}
        for a in m["baseline"]["attacks"]:
            b = tuned[(a["attack"], a["eps"])]
            records.append(
                {
                    "model": m["name"],
                    "attack": a["attack"],
                    "eps": a["eps"],
                    "held out": is_heldout(a["attack"], payload["heldout_methods"]),
                    "kappa base": a["kappa"],
                    "kappa FT": b["kappa"],
                    "gain": b["kappa"] - a["kappa"],
                    "fooling base": a["fooling_rate"],
                    "fooling FT": b["fooling_rate"],
                }
            )
    ens = {(a["attack"], a["eps"]): a for a in payload["ensemble"]["attacks"]}
    frame = pd.DataFrame(records)
    frame["kappa ensemble"] = [ens[(a, e)]["kappa"] for a, e in zip(frame["attack"], frame["eps"], strict=True)]
    return frame.set_index(["model", "attack", "eps"])


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


def uap_sections(payload: Mapping[str, Any]) -> list[Any]:
    """Report sections of a UAP-study payload: verdict, tables, confusion matrices."""
    section = Section(
        "UAP attacks and UAP fine-tuning defence (paper B)",
        f"{payload['dataset']}, {payload['n_eval']} test images, quadratic-weighted kappa. UAPs fitted "
        f"on the validation split against the model evaluated (white-box). Fine-tuning UAP methods: "
        f"{payload['config']['finetune']['methods']}; held out: {payload['heldout_methods']} and PGD.",
    )
    section.paragraph(_verdict_text(payload), css="verdict")
    clean = [
        {
            "model": m["name"],
            "kappa base": m["baseline"]["clean"]["kappa"],
            "kappa FT": m["finetuned"]["clean"]["kappa"],
            "accuracy base": m["baseline"]["clean"]["accuracy"],
            "accuracy FT": m["finetuned"]["clean"]["accuracy"],
        }
        for m in payload["models"]
    ]
    clean.append(
        {
            "model": "ensemble(uap-ft)",
            "kappa FT": payload["ensemble"]["clean"]["kappa"],
            "accuracy FT": payload["ensemble"]["clean"]["accuracy"],
        }
    )
    section.table(pd.DataFrame(clean).set_index("model"), caption="Clean test performance.")
    section.table(
        _attack_table(payload),
        caption="Kappa and fooling rate under each attack, baseline vs UAP "
        "fine-tuned (FT); gain = kappa FT - kappa base.",
    )
    t = payload["ttest"]
    section.table(
        pd.DataFrame(
            [
                {
                    "resampling": t["resampling"],
                    "n": t["n"],
                    "mean kappa ensemble": float(np.mean(t["kappas_ensemble"])),
                    "mean kappa baseline": float(np.mean(t["kappas_baseline"])),
                    "t": t["t"],
                    "p": t["p"],
                    "significant": t["significant"],
                }
            ]
        ).set_index("resampling"),
        caption="Paired t-test (scipy.stats.ttest_rel) of clean kappa, ensemble vs baseline grader.",
        float_format="{:.4g}",
    )
    base = payload["models"][0]
    worst = min(base["baseline"]["attacks"], key=lambda a: a["kappa"] if np.isfinite(a["kappa"]) else np.inf)
    tuned = next(a for a in base["finetuned"]["attacks"] if (a["attack"], a["eps"]) == (worst["attack"], worst["eps"]))
    panels = [
        (f"{base['name']} clean", base["baseline"]["clean"]["confusion"]),
        (f"{base['name']} {worst['attack']} {worst['eps']}", worst["confusion"]),
        (f"{base['name']}+FT {worst['attack']} {worst['eps']}", tuned["confusion"]),
        ("ensemble clean", payload["ensemble"]["clean"]["confusion"]),
    ]
    section.figure(
        _confusion_figure(panels, payload["classes"]),
        caption="Confusion matrices (rows true grade, columns predicted); the attack shown is the one that "
        "hurt the baseline grader most.",
    )
    return [section]
