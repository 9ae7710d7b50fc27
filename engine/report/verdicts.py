"""The HFC paper's claims, judged on a run's rows at its headline setting, in words a reader can act on.

Per dataset:

1. *Plain adversarial examples are easy to detect*: holds when the median AUROC over the detectors (plain,
   successful AEs) is at least :data:`EASY_AUROC`.
2. *HFC hides them*: the paired AUROC change (HFC minus plain, on the images where both attacks succeeded) has a
   95% CI below zero for a majority of the detectors, with the HFC attack still succeeding on at least
   :data:`MIN_SUCCESS` of the pool (otherwise hiding is bought with failed attacks, and the verdict says so).
3. *Mechanism*: at the deepest constrained layer, HFC AEs' features have a log-likelihood under the target class's
   mixtures closer to clean images' (under their own class) than plain AEs' have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

EASY_AUROC = 0.9
MIN_SUCCESS = 0.9


@dataclass
class Verdict:
    dataset: str
    claim: str
    holds: bool | None  # None: the rows cannot decide it
    text: str


def _setting(frame: pd.DataFrame, attack: str, eps: str | None) -> pd.DataFrame:
    eps_match = frame["eps"].isna() if eps is None else frame["eps"].astype(str) == str(eps)
    return frame[(frame["attack"] == attack) & eps_match]


def verdicts(rows: Sequence[dict[str, Any]], attack: str, eps: str | None) -> list[Verdict]:
    """The three claims per dataset at the headline (``attack``, ``eps``)."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        return []
    out = []
    setting = f"{attack}" + ("" if eps is None else f" at eps {eps}")
    for dataset, rows_ds in frame.groupby("dataset", sort=False):
        head = _setting(rows_ds, attack, eps)
        if head[head["detector"].fillna("").ne("")].empty:
            continue
        out.append(_easy_to_detect(dataset, head, setting))
        out.append(_hidden(dataset, head, setting))
        out.append(_mechanism(dataset, rows_ds, head, setting))
    return [v for v in out if v is not None]


def _detector_values(head: pd.DataFrame, metric: str, hfc: bool) -> pd.DataFrame:
    det = head[(head["metric"] == metric) & (head["hfc"].astype(bool) == hfc) & head["detector"].fillna("").ne("")]
    return det.set_index("detector")[["value", "ci_low", "ci_high"]]


def _success(head: pd.DataFrame, hfc: bool) -> float:
    rows = head[(head["metric"] == "attack_success_rate") & (head["hfc"].astype(bool) == hfc)]["value"]
    return float(rows.iloc[0]) if len(rows) else float("nan")


def _easy_to_detect(dataset: str, head: pd.DataFrame, setting: str) -> Verdict:
    plain = _detector_values(head, "auroc", hfc=False)["value"].sort_values(ascending=False)
    median = float(plain.median())
    holds = median >= EASY_AUROC
    listing = ", ".join(f"{d.upper()} {v:.2f}" for d, v in plain.items())
    below = [d.upper() for d, v in plain.items() if v < 0.5]
    text = (
        f"Plain AEs are easy to detect: {'HOLDS' if holds else 'does NOT hold'} on {dataset} ({setting}, attack "
        f"success {_success(head, False):.2f}): median AUROC {median:.3f} over {len(plain)} detectors "
        f"(threshold {EASY_AUROC}): {listing}."
    )
    if below:
        text += f" Below chance: {', '.join(below)} (scores these AEs as more normal than clean images)."
        if "DNR" in below:
            text += (
                " On a binary task DNR's score is minus its combiner's margin, and targeted AEs pushed deep into the "
                "target class can have larger margins than clean images (docs/detectors.md)."
            )
    return Verdict(dataset, "easy to detect", holds, text)


def _hidden(dataset: str, head: pd.DataFrame, setting: str) -> Verdict | None:
    change = _detector_values(head, "auroc_change", hfc=True)
    if change.empty:
        return None
    lowered = change[change["ci_high"] < 0]
    raised = change[change["ci_low"] > 0]
    success = _success(head, True)
    holds = len(lowered) > len(change) / 2 and success >= MIN_SUCCESS
    detail = ", ".join(f"{d.upper()} {r.value:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]" for d, r in change.iterrows())
    text = (
        f"HFC hides the AEs from detectors fitted on plain AEs: {'HOLDS' if holds else 'does NOT hold'} on "
        f"{dataset} ({setting}): the paired AUROC change (HFC minus plain, same images, 95% bootstrap CI over "
        f"images) is below zero for {len(lowered)} of {len(change)} detectors: {detail}."
        f" Attack success with HFC {success:.2f} (plain {_success(head, False):.2f})."
    )
    if len(raised):
        text += f" HFC AEs are detected better by {', '.join(d.upper() for d in raised.index)}."
    if success < MIN_SUCCESS:
        text += f" HFC succeeds on fewer than {MIN_SUCCESS:.0%} of the images, so part of the hiding is failed attacks."
    return Verdict(dataset, "hidden by HFC", holds, text)


def _mechanism(dataset: str, rows_ds: pd.DataFrame, head: pd.DataFrame, setting: str) -> Verdict | None:
    loglik = head[head["metric"].str.startswith("feature_loglik@")]
    clean = rows_ds[rows_ds["metric"].str.startswith("feature_loglik@") & rows_ds["attack"].fillna("").eq("")]
    if loglik.empty or clean.empty:
        return None
    layer = clean["metric"].iloc[-1]
    values = {
        "clean": float(clean[clean["metric"] == layer]["value"].iloc[0]),
        "plain": float(loglik[(loglik["metric"] == layer) & ~loglik["hfc"].astype(bool)]["value"].iloc[0]),
        "HFC": float(loglik[(loglik["metric"] == layer) & loglik["hfc"].astype(bool)]["value"].iloc[0]),
    }
    holds = bool(abs(values["HFC"] - values["clean"]) < abs(values["plain"] - values["clean"]))
    text = (
        f"Mechanism: {'HOLDS' if holds else 'does NOT hold'} on {dataset} ({setting}): mean log-likelihood of the "
        f"deepest constrained layer ({layer.split('@', 1)[1]}) under the target class's mixtures: HFC AEs "
        f"{values['HFC']:.1f}, plain AEs {values['plain']:.1f}, clean images under their own class "
        f"{values['clean']:.1f} (images where both attacks succeeded); HFC keeps the features "
        f"{'closer to' if holds else 'no closer to'} the clean level than plain AEs."
    )
    return Verdict(dataset, "mechanism", holds if np.isfinite(list(values.values())).all() else None, text)
