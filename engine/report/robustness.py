"""What a run says about the model itself, from its rows: the budgets it resisted, where detection was not
measurable, and possible gradient masking.

The rules (docs/runs.md, "A model that resists"), per dataset, model and attack, on the plain attack's success
rate on the correctly classified pool (the attack cells' rows, which count their successful and failed attacks):

1. The model **resisted** a budget when the plain attack succeeds on fewer than :data:`RESISTED_SUCCESS` of the
   pool there (a result, with its exact binomial interval, not an error).
2. Detection is **not measurable** where a detect cell had too few examples (``not_measurable`` rows: no successful
   AE in the fit part, fewer examples than the detector needs); their reasons are in the cells'
   payloads.
3. **Possible gradient masking** when success does not rise toward 1 as the budget grows: below
   :data:`MASKING_SUCCESS` at the largest budget, or lower at a larger budget than at a smaller one beyond both
   intervals. A model whose gradients are wrong (a faulty conversion, a non-differentiable preprocessing) looks
   robust to gradient attacks; a flag asks for a check, it proves nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from engine.report.verdicts import MAIN, Estimate, estimate, metric_rows, rows_frame
from engine.runs.schema import Metric

RESISTED_SUCCESS = 0.5  # the plain attack fails on most of the pool at this budget
MASKING_SUCCESS = 0.9  # success at the largest budget below this: the attack does not approach 1


def robustness_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The report's lines on the model: budgets resisted, detection not measurable, possible gradient masking."""
    frame = rows_frame(rows)
    if frame.empty:
        return []
    success = metric_rows(frame, Metric.ATTACK_SUCCESS_RATE)
    if "n_pos" in success:  # the attack cells' rows count their attacks (studies' rows are means over seeds)
        success = success[success["n_pos"].notna() & ~success["hfc"] & success["variant"].eq(MAIN)]
    else:
        success = success.iloc[:0]
    lines = []
    for (dataset, model, attack), group in success.groupby(["dataset", "model", "attack"], sort=False):
        budgets = _budgets(group)
        resisted = [f"eps {eps} {_success_text(est, rows_eps)}" for eps, est, rows_eps in budgets
                    if est.value < RESISTED_SUCCESS]  # fmt: skip
        if resisted:
            lines.append(
                f"The model resisted {attack} on {dataset} ({model}) at {'; '.join(resisted)}: the plain attack "
                f"succeeds on fewer than {RESISTED_SUCCESS:.0%} of the correctly classified pool there."
            )
        masking = _masking(budgets)
        if masking:
            trend = ", ".join(f"{eps} {est.value:.2f}" for eps, est, _ in budgets)
            lines.append(
                f"Possible gradient masking on {dataset} ({model}), {attack}: attack success does not rise toward 1 "
                f"as the budget grows ({trend}): {masking}. Check the model's input gradients (a conversion with "
                "wrong gradients looks robust), more steps or restarts, or a gradient-free attack before reading "
                "this as robustness."
            )
    lines += _not_measurable(metric_rows(frame, Metric.NOT_MEASURABLE))
    return lines


def _budgets(group: pd.DataFrame) -> list[tuple[str, Estimate, pd.DataFrame]]:
    """(eps, success over seeds, its rows) per budget of one attack, smallest budget first."""
    budgeted = group[group["eps"].notna()]
    order = budgeted.sort_values("eps_value", kind="stable")
    return [(eps, estimate(part), part) for eps, part in order.groupby("eps", sort=False)]


def _success_text(est: Estimate, rows: pd.DataFrame) -> str:
    successes, trials = int(rows["n_pos"].sum()), int((rows["n_pos"] + rows["n_neg"]).sum())
    return f"(success {est.text()}, {successes} of {trials} images)"


def _masking(budgets: list[tuple[str, Estimate, pd.DataFrame]]) -> str:
    """Why success does not rise toward 1 across ``budgets`` (rule 3), or '' when it does."""
    if not budgets:
        return ""
    for i, (small, low_budget, _) in enumerate(budgets):
        for large, high_budget, _ in budgets[i + 1 :]:
            if high_budget.high < low_budget.low:
                return f"it falls from {low_budget.value:.2f} at {small} to {high_budget.value:.2f} at {large}"
    largest, last, _ = budgets[-1]
    if last.value < MASKING_SUCCESS:
        return f"{last.value:.2f} at the largest budget ({largest}), below {MASKING_SUCCESS}"
    return ""


def _not_measurable(rows: pd.DataFrame) -> list[str]:
    """One line per (dataset, model, attack, eps) with not-measurable cells: the detectors (and the feature
    measurements) and the successful AEs there were."""
    lines = []
    keys = ["dataset", "model", "attack", rows["eps"].fillna("")]
    for (dataset, model, attack, eps), group in rows.groupby(keys, sort=False):
        what = [
            "the feature measurements" if not name else name.upper() + (f" ({arm})" if isinstance(arm, str) else "")
            for name, arm in zip(group["detector"], group["arm"], strict=True)
        ]
        successful = group.loc[group["detector"].ne(""), "value"]
        count = f" ({int(successful.max())} successful AEs)" if len(successful) else ""
        setting = f"{attack}" + (f" eps {eps}" if eps else "")
        lines.append(
            f"Not measurable on {dataset} ({model}) at {setting}{count}: {', '.join(dict.fromkeys(what))} "
            "(too few examples; the reasons are in the section 'Not measurable')."
        )
    return lines
