"""The HFC paper's claims, judged on a run's rows at its headline setting by size and applicability.

The rules and their thresholds are fixed here, before the runs that judge them (the commit order is the
pre-registration; docs/runs.md, "Verdict rules"). Per dataset and detector layer arm (``arm`` column):

1. *Plain adversarial examples are easy to detect*: the median plain AUROC over the detectors is at least
   :data:`EASY_AUROC`. Claims 1, 4 and 5 are about the HFC paper's detectors (:data:`PAPER_DETECTORS`); the
   engine's own defences (typicality) are judged in 6 only.
2. A detector is **applicable** when the lower bound of its plain AUROC interval exceeds :data:`APPLICABLE_AUROC`
   (chance): a detector that cannot tell plain AEs from clean images says nothing about hiding, so it is listed,
   never counted.
3. A detector is **defeated** by an attack set when its TPR at 90% TNR on that set is at most
   :data:`DEFEATED_TPR` *and* the upper bound of the paired AUROC change (that set minus plain, same images) is at
   most :data:`DEFEATED_CHANGE`: a size, not only a sign (0.995 -> 0.985 is not a defeat).
4. *HFC hides the AEs* holds when at least :data:`MIN_DEFEATED` detectors are applicable and defeated by the HFC
   set, with HFC still succeeding on at least :data:`MIN_SUCCESS` of the pool.
5. *The constraint, not the schedule*: of the detectors HFC defeats, those the weight-0 arm (HFC's schedule with
   the constraint switched off, ``variant`` "w0") does not defeat; holds for at least :data:`MIN_DEFEATED`.
6. *What still catches HFC*: the detector configurations (detector x layer arm) that *catch* the HFC set --
   applicable, and flagging more than :data:`DEFEATED_TPR` of its AEs at 90% TNR --, and which of them still catch
   the adaptive set (HFC in ``typical`` mode, ``variant`` "adaptive").
7. *Mechanism*: at the deepest constrained layer HFC AEs' log-likelihood under the target class's mixtures is
   closer to clean images' than plain AEs' is.

Intervals: with one seed, the 95% image-bootstrap CI of the rows; with several (``seed`` column), the 95% Student-t
interval over the per-seed values (between-seed), and the verdicts are judged on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from engine.metrics.significance import mean_ci
from engine.runs.plan import ADAPTIVE
from engine.runs.schema import Metric, Subset

EASY_AUROC = 0.9  # median plain AUROC for "easy to detect" (the predecessor paper reports > 0.98)
APPLICABLE_AUROC = 0.5  # the plain AUROC interval's lower bound must exceed chance
DEFEATED_TPR = 0.5  # at 90% TNR, a detector missing half of the AEs no longer screens
DEFEATED_CHANGE = -0.10  # the paired AUROC change's upper bound: a tenth of the AUROC range, well beyond its CI noise
MIN_DEFEATED = 5  # of the seven detectors of the HFC paper's table
MIN_SUCCESS = 0.9  # an attack set whose success falls below this hides partly by failing
PAPER_DETECTORS = ("kd", "bu", "lid", "maha", "svm", "safetynet", "dnn", "dnr")
MAIN = ""  # the ``variant`` of the main plain and HFC sets
SCHEDULE_ONLY = "w0"  # the ``variant`` of the weight-0 arm (HFC's schedule, no constraint)


@dataclass(frozen=True)
class Estimate:
    """A value with its 95% interval and the number of seeds it summarises."""

    value: float
    low: float
    high: float
    seeds: int = 1

    def text(self, signed: bool = False) -> str:
        fmt = "{:+.2f}" if signed else "{:.2f}"
        return f"{fmt.format(self.value)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


@dataclass(frozen=True)
class DetectorEvidence:
    """What the rules read for one detector against one attack set: plain AUROC (the fitted attack, its own
    successful AEs), the set's AUROC and TPR at 90% TNR on the images where both attacks succeeded, and the paired
    AUROC change (set minus plain)."""

    detector: str
    plain_auroc: Estimate
    auroc: Estimate
    change: Estimate
    tpr: Estimate

    @property
    def applicable(self) -> bool:
        return bool(self.plain_auroc.low > APPLICABLE_AUROC)

    @property
    def defeated(self) -> bool:
        return bool(self.tpr.value <= DEFEATED_TPR and self.change.high <= DEFEATED_CHANGE)

    @property
    def caught(self) -> bool:
        """The set is still caught: the detector is applicable and flags more than :data:`DEFEATED_TPR` of its AEs
        at 90% TNR (a detector that is not defeated only because its AUROC fell little, from a low TPR, does not
        catch the set)."""
        return self.applicable and bool(self.tpr.value > DEFEATED_TPR)

    def text(self) -> str:
        mark = "defeated" if self.applicable and self.defeated else ("not applicable" if not self.applicable else "")
        return (
            f"{self.detector.upper()} plain {self.plain_auroc.value:.2f}, HFC {self.auroc.value:.2f}, change "
            f"{self.change.text(signed=True)}, HFC TPR@90%TNR {self.tpr.value:.2f}" + (f" ({mark})" if mark else "")
        )


@dataclass
class Verdict:
    dataset: str
    claim: str
    holds: bool | None  # None: the rows cannot decide it
    text: str
    arm: str | None = None


def rows_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a frame with the optional columns (``arm``, ``variant``, ``seed``, ``subset``, ``layer``...)
    present."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return frame
    optional = (("arm", None), ("variant", MAIN), ("seed", 0), ("detector", ""), ("eps", None), ("subset", None),
                ("layer", None), ("ci_low", np.nan), ("ci_high", np.nan))  # fmt: skip
    for column, default in optional:
        if column not in frame:
            frame[column] = default
    frame["variant"] = frame["variant"].fillna(MAIN)
    frame["detector"] = frame["detector"].fillna("")
    frame["seed"] = frame["seed"].fillna(0)
    frame["hfc"] = frame["hfc"].fillna(False).astype(bool)
    return frame


def metric_rows(frame: pd.DataFrame, metric: Metric, subset: Subset | None = None) -> pd.DataFrame:
    """The rows of ``frame`` (a :func:`rows_frame`) of ``metric``, in ``subset`` when given."""
    keep = frame["metric"] == metric
    if subset is not None:
        keep &= frame["subset"] == subset
    return frame[keep]


def at_setting(frame: pd.DataFrame, attack: str, eps: str | None) -> pd.DataFrame:
    """The rows of ``frame`` at (``attack``, ``eps``); eps None: an attack without a budget."""
    eps_match = frame["eps"].isna() if eps is None else frame["eps"].astype(str) == str(eps)
    return frame[(frame["attack"] == attack) & eps_match]


def estimate(rows: pd.DataFrame) -> Estimate:
    """One seed: the row's value and CI; several: the mean of the per-seed values and their t interval."""
    if rows.empty:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    per_seed = rows.groupby("seed", sort=True)
    if per_seed.ngroups == 1:
        first = rows.iloc[0]
        low = first.get("ci_low", np.nan)
        high = first.get("ci_high", np.nan)
        return Estimate(float(first["value"]), float(low), float(high), 1)
    summary = mean_ci(per_seed["value"].first().to_numpy())
    return Estimate(summary["mean"], summary["low"], summary["high"], summary["n"])


def evidence(head: pd.DataFrame, variant: str = MAIN, paper_only: bool = False) -> dict[str, DetectorEvidence]:
    """Per detector of ``head`` (one dataset, arm and headline setting; with ``paper_only`` the HFC paper's
    detectors only), its evidence against the HFC set of ``variant``."""
    detectors = head[head["detector"].isin(PAPER_DETECTORS) if paper_only else head["detector"].ne("")]
    plain = detectors[~detectors["hfc"] & detectors["variant"].eq(MAIN)]
    hfc = detectors[detectors["hfc"] & detectors["variant"].eq(variant)]

    def pick(frame: pd.DataFrame, name: str, metric: Metric, subset: Subset) -> Estimate:
        return estimate(metric_rows(frame[frame["detector"] == name], metric, subset))

    return {
        name: DetectorEvidence(
            detector=name,
            plain_auroc=pick(plain, name, Metric.AUROC, Subset.SUCCESSFUL),
            auroc=pick(hfc, name, Metric.AUROC, Subset.PAIRED),
            change=pick(hfc, name, Metric.AUROC, Subset.CHANGE),
            tpr=pick(hfc, name, Metric.TPR_AT_TNR90, Subset.PAIRED),
        )
        for name in dict.fromkeys(hfc["detector"])
    }


def success(head: pd.DataFrame, hfc: bool, variant: str = MAIN) -> float:
    """The attack success rate of a set, averaged over seeds."""
    rows = metric_rows(head, Metric.ATTACK_SUCCESS_RATE)
    rows = rows[(rows["hfc"] == hfc) & rows["variant"].eq(variant)]
    return float(rows["value"].mean()) if len(rows) else float("nan")


def verdicts(rows: Sequence[dict[str, Any]], attack: str, eps: str | None) -> list[Verdict]:
    """The claims per dataset (and detector layer arm) at the headline (``attack``, ``eps``)."""
    frame = rows_frame(rows)
    if frame.empty:
        return []
    out: list[Verdict | None] = []
    setting = f"{attack}" + ("" if eps is None else f" at eps {eps}")
    for dataset, rows_ds in frame.groupby("dataset", sort=False):
        head = at_setting(rows_ds, attack, eps)
        detect = head[head["detector"].ne("") & head["metric"].ne(Metric.NOT_MEASURABLE)]
        if detect.empty:  # nothing measured here (engine.report.robustness says why)
            continue
        attacks = head[head["detector"].eq("")]
        seeds = rows_ds["seed"].nunique()
        where = setting + (f", {seeds} seeds: between-seed 95% intervals" if seeds > 1 else "")
        for arm, rows_arm in detect.groupby(detect["arm"].fillna(""), sort=False):
            arm_head = pd.concat([rows_arm, attacks])
            out.append(_easy_to_detect(dataset, arm, arm_head, where))
            out.append(_hidden(dataset, arm, arm_head, where))
            out.append(_attribution(dataset, arm, arm_head, where))
        out.append(_still_caught(dataset, detect, where))
        out.append(_mechanism(dataset, rows_ds, head, where))
    return [v for v in out if v is not None]


def _still_caught(dataset: str, detect: pd.DataFrame, setting: str) -> Verdict | None:
    """Which detector configurations (detector on a layer arm) still catch HFC AEs, and the adaptive ones."""
    caught, adaptive_caught, adaptive_run = [], [], False
    for arm, rows_arm in detect.groupby(detect["arm"].fillna(""), sort=False):
        on_adaptive = evidence(rows_arm, ADAPTIVE)
        adaptive_run = adaptive_run or bool(on_adaptive)
        for name, found in evidence(rows_arm).items():
            where = f"{name.upper()}" + (f" on the {arm!r} layers" if arm else "")
            if found.caught:
                caught.append(f"{where} (HFC TPR {found.tpr.value:.2f}, change {found.change.text(signed=True)})")
                if name in on_adaptive and on_adaptive[name].caught:
                    adaptive_caught.append(f"{where} (adaptive TPR {on_adaptive[name].tpr.value:.2f})")
    if not caught:
        text = f"What still catches HFC on {dataset} ({setting}): no detector configuration catches HFC AEs."
    else:
        text = f"What still catches HFC on {dataset} ({setting}): {'; '.join(caught)}."
        if adaptive_run:
            text += (
                f" Against the adaptive HFC (typical mode): {'; '.join(adaptive_caught)}."
                if adaptive_caught
                else " None of them catches the adaptive HFC (typical mode): the adaptive attack defeats them all."
            )
    return Verdict(dataset, "still caught", bool(caught), text)


def _arm_text(arm: str) -> str:
    return f", detectors on the {arm!r} layers" if arm else ""


def _easy_to_detect(dataset: str, arm: str, head: pd.DataFrame, setting: str) -> Verdict | None:
    plain = {name: ev.plain_auroc for name, ev in evidence(head, paper_only=True).items()}
    if not plain:
        return None
    median = float(np.median([e.value for e in plain.values()]))
    holds = median >= EASY_AUROC
    listing = ", ".join(f"{d.upper()} {e.text()}" for d, e in sorted(plain.items(), key=lambda kv: -kv[1].value))
    inapplicable = [d.upper() for d, e in plain.items() if not e.low > APPLICABLE_AUROC]
    text = (
        f"Plain AEs are easy to detect: {'HOLDS' if holds else 'does NOT hold'} on {dataset} ({setting}"
        f"{_arm_text(arm)}; attack success {success(head, False):.2f}): median AUROC {median:.3f} over {len(plain)} "
        f"detectors (threshold {EASY_AUROC}): {listing}."
    )
    if inapplicable:
        text += (
            f" Not applicable (plain AUROC interval not above {APPLICABLE_AUROC}): {', '.join(inapplicable)}; see "
            "the diagnostics table."
        )
    return Verdict(dataset, "easy to detect", holds, text, arm or None)


def _hidden(dataset: str, arm: str, head: pd.DataFrame, setting: str) -> Verdict | None:
    found = evidence(head, paper_only=True)
    if not found:
        return None
    applicable = [e for e in found.values() if e.applicable]
    defeated = [e for e in applicable if e.defeated]
    rate = success(head, True)
    holds = len(defeated) >= MIN_DEFEATED and rate >= MIN_SUCCESS
    text = (
        f"HFC hides the AEs from detectors fitted on plain AEs: {'HOLDS' if holds else 'does NOT hold'} on {dataset} "
        f"({setting}{_arm_text(arm)}): {len(defeated)} of {len(applicable)} applicable detectors defeated (TPR@90%TNR "
        f"<= {DEFEATED_TPR} and paired AUROC change upper bound <= {DEFEATED_CHANGE}; {MIN_DEFEATED} needed). "
        + "; ".join(e.text() for e in found.values())
        + f". Attack success with HFC {rate:.2f} (plain {success(head, False):.2f})."
    )
    if rate < MIN_SUCCESS:
        text += f" HFC succeeds on fewer than {MIN_SUCCESS:.0%} of the images, so part of the hiding is failed attacks."
    return Verdict(dataset, "hidden by HFC", holds, text, arm or None)


def _attribution(dataset: str, arm: str, head: pd.DataFrame, setting: str) -> Verdict | None:
    schedule = evidence(head, SCHEDULE_ONLY, paper_only=True)
    if not schedule:
        if not evidence(head, paper_only=True):
            return None  # no HFC set: nothing to attribute
        text = (
            f"The drop is not attributed on {dataset} ({setting}{_arm_text(arm)}): the run has no weight-0 set "
            "(hfc.fixed_weights without 0), so part of any drop may come from HFC's longer schedule rather than "
            "its constraint."
        )
        return Verdict(dataset, "constraint, not schedule", None, text, arm or None)
    by_hfc = [e for e in evidence(head, paper_only=True).values() if e.applicable and e.defeated]
    by_schedule = {name for name, e in schedule.items() if e.defeated}
    constraint = [e.detector for e in by_hfc if e.detector not in by_schedule]
    holds = len(constraint) >= MIN_DEFEATED
    detail = "; ".join(
        f"{e.detector.upper()} change {e.change.text(signed=True)}, TPR {e.tpr.value:.2f}" for e in schedule.values()
    )
    text = (
        f"The drop comes from the constraint, not the longer schedule: {'HOLDS' if holds else 'does NOT hold'} on "
        f"{dataset} ({setting}{_arm_text(arm)}): of the {len(by_hfc)} detectors HFC defeats, {len(constraint)} are "
        f"not defeated by the weight-0 arm (HFC's steps and step size, no constraint; success "
        f"{success(head, True, SCHEDULE_ONLY):.2f}): {detail}."
    )
    return Verdict(dataset, "constraint, not schedule", holds, text, arm or None)


def _mechanism(dataset: str, rows_ds: pd.DataFrame, head: pd.DataFrame, setting: str) -> Verdict | None:
    loglik = metric_rows(head, Metric.FEATURE_LOGLIK)
    loglik = loglik[loglik["variant"].eq(MAIN)]
    clean = metric_rows(rows_ds, Metric.FEATURE_LOGLIK)
    clean = clean[clean["attack"].fillna("").eq("")]
    if loglik.empty or clean.empty:
        return None
    layer = clean["layer"].iloc[-1]
    values = {
        "clean": float(clean[clean["layer"] == layer]["value"].mean()),
        "plain": float(loglik[(loglik["layer"] == layer) & ~loglik["hfc"]]["value"].mean()),
        "HFC": float(loglik[(loglik["layer"] == layer) & loglik["hfc"]]["value"].mean()),
    }
    holds = bool(abs(values["HFC"] - values["clean"]) < abs(values["plain"] - values["clean"]))
    text = (
        f"Mechanism: {'HOLDS' if holds else 'does NOT hold'} on {dataset} ({setting}): mean log-likelihood of the "
        f"deepest constrained layer ({layer}) under the target class's mixtures: HFC AEs "
        f"{values['HFC']:.1f}, plain AEs {values['plain']:.1f}, clean images under their own class "
        f"{values['clean']:.1f} (images where both attacks succeeded); HFC keeps the features "
        f"{'closer to' if holds else 'no closer to'} the clean level than plain AEs."
    )
    return Verdict(dataset, "mechanism", holds if np.isfinite(list(values.values())).all() else None, text)
