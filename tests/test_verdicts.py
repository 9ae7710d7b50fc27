"""The verdict rules (engine.report.verdicts) on hand-made rows: one test per rule, at and beside each threshold."""

from __future__ import annotations

from typing import Any

import pytest

from engine.report.verdicts import (
    APPLICABLE_AUROC,
    DEFEATED_CHANGE,
    DEFEATED_TPR,
    MIN_DEFEATED,
    SCHEDULE_ONLY,
    evidence,
    rows_frame,
    verdicts,
)
from engine.runs.schema import Metric, Subset, row

DETECTORS = ("kd", "bu", "lid", "maha", "svm", "dnn", "dnr")


def detector_rows(
    name: str,
    plain: tuple[float, float, float] = (0.99, 0.97, 1.0),
    change: tuple[float, float, float] = (-0.4, -0.5, -0.3),
    tpr: float = 0.2,
    variant: str = "",
    seed: int = 0,
    arm: str = "same",
) -> list[dict[str, Any]]:
    """The rows a detect cell writes for one detector, plain set and one HFC set."""
    base = {"dataset": "d", "model": "m", "attack": "pgd", "eps": "8/256", "detector": name, "arm": arm, "seed": seed}
    hfc = {**base, "hfc": True, "variant": variant}
    rows = [row(Metric.AUROC, change[0], subset=Subset.CHANGE, ci_low=change[1], ci_high=change[2], **hfc),
            row(Metric.AUROC, plain[0] + change[0], subset=Subset.PAIRED, ci_low=0.0, ci_high=1.0, **hfc),
            row(Metric.TPR_AT_TNR90, tpr, subset=Subset.PAIRED, ci_low=0.0, ci_high=1.0, **hfc)]  # fmt: skip
    if variant == "":
        rows.append(row(Metric.AUROC, plain[0], subset=Subset.SUCCESSFUL, ci_low=plain[1], ci_high=plain[2],
                        hfc=False, variant="", **base))  # fmt: skip
    return rows


def success_rows(plain: float = 1.0, hfc: float = 0.98, seed: int = 0, variant: str = "") -> list[dict[str, Any]]:
    base = {"dataset": "d", "model": "m", "attack": "pgd", "eps": "8/256", "detector": "", "seed": seed}
    out = [row(Metric.ATTACK_SUCCESS_RATE, hfc, hfc=True, variant=variant, **base)]
    if variant == "":
        out.append(row(Metric.ATTACK_SUCCESS_RATE, plain, hfc=False, variant="", **base))
    return out


def claim(rows: list[dict[str, Any]], name: str) -> Any:
    found = [v for v in verdicts(rows, "pgd", "8/256") if v.claim == name]
    assert len(found) == 1, [v.claim for v in verdicts(rows, "pgd", "8/256")]
    return found[0]


def test_applicable_needs_the_plain_interval_above_chance() -> None:
    rows = detector_rows("kd", plain=(0.6, APPLICABLE_AUROC, 0.7)) + detector_rows("lid", plain=(0.6, 0.51, 0.7))
    found = evidence(rows_frame(rows))
    assert not found["kd"].applicable  # lower bound at chance: not above it
    assert found["lid"].applicable


def test_defeated_needs_both_sizes() -> None:
    rows = (
        detector_rows("kd", change=(-0.3, -0.4, DEFEATED_CHANGE), tpr=DEFEATED_TPR)  # both at the threshold
        + detector_rows("lid", change=(-0.3, -0.4, DEFEATED_CHANGE), tpr=DEFEATED_TPR + 0.01)  # TPR too high
        + detector_rows("svm", change=(-0.3, -0.4, DEFEATED_CHANGE + 0.01), tpr=0.1)  # change too small
        + detector_rows("dnr", plain=(0.995, 0.99, 1.0), change=(-0.01, -0.015, -0.005), tpr=0.95)  # a sign only
    )
    found = evidence(rows_frame(rows))
    assert found["kd"].defeated
    assert not found["lid"].defeated
    assert not found["svm"].defeated
    assert not found["dnr"].defeated


def test_hiding_holds_with_five_applicable_and_defeated() -> None:
    rows = [r for d in DETECTORS[:MIN_DEFEATED] for r in detector_rows(d)] + success_rows()
    rows += [r for d in DETECTORS[MIN_DEFEATED:] for r in detector_rows(d, change=(0.0, -0.05, 0.05), tpr=0.9)]
    verdict = claim(rows, "hidden by HFC")
    assert verdict.holds is True
    assert f"{MIN_DEFEATED} of 7 applicable detectors defeated" in verdict.text
    assert "KD plain 0.99, HFC 0.59, change -0.40 [-0.50, -0.30], HFC TPR@90%TNR 0.20 (defeated)" in verdict.text


def test_hiding_fails_with_four() -> None:
    rows = [r for d in DETECTORS[: MIN_DEFEATED - 1] for r in detector_rows(d)] + success_rows()
    rows += [r for d in DETECTORS[MIN_DEFEATED - 1 :] for r in detector_rows(d, change=(-0.05, -0.08, -0.02))]
    assert claim(rows, "hidden by HFC").holds is False


def test_inapplicable_detectors_are_not_counted() -> None:
    rows = [r for d in DETECTORS[: MIN_DEFEATED - 1] for r in detector_rows(d)] + success_rows()
    rows += detector_rows("dnn", plain=(0.4, 0.3, 0.5))  # defeated by the sizes, but below chance on plain AEs
    verdict = claim(rows, "hidden by HFC")
    assert verdict.holds is False
    assert f"{MIN_DEFEATED - 1} of {MIN_DEFEATED - 1} applicable" in verdict.text
    assert "DNN" in claim(rows, "easy to detect").text.split("Not applicable")[1]


def test_hiding_by_failed_attacks_does_not_hold() -> None:
    rows = [r for d in DETECTORS for r in detector_rows(d)] + success_rows(hfc=0.85)
    verdict = claim(rows, "hidden by HFC")
    assert verdict.holds is False
    assert "failed attacks" in verdict.text


def test_several_seeds_judge_on_the_between_seed_interval() -> None:
    # every seed's image CI is below the threshold, but the seeds disagree: the between-seed interval is wide
    rows = []
    for seed, change in enumerate((-0.4, -0.05, -0.45, 0.0, -0.4)):
        for d in DETECTORS:
            rows += detector_rows(d, change=(change, change - 0.05, -0.2), seed=seed)
        rows += success_rows(seed=seed)
    found = evidence(rows_frame(rows))
    assert found["kd"].change.seeds == 5
    assert found["kd"].change.value == pytest.approx(-0.26)
    assert found["kd"].change.high > DEFEATED_CHANGE
    verdict = claim(rows, "hidden by HFC")
    assert verdict.holds is False
    assert "5 seeds" in verdict.text


def test_attribution_counts_detectors_the_schedule_alone_does_not_defeat() -> None:
    rows = [r for d in DETECTORS for r in detector_rows(d)] + success_rows()
    schedule_defeats = DETECTORS[:3]
    for d in DETECTORS:
        change, tpr = ((-0.4, -0.5, -0.3), 0.2) if d in schedule_defeats else ((-0.02, -0.05, 0.01), 0.9)
        rows += detector_rows(d, change=change, tpr=tpr, variant=SCHEDULE_ONLY)
    rows += success_rows(variant=SCHEDULE_ONLY)
    verdict = claim(rows, "constraint, not schedule")
    assert verdict.holds is False  # 7 - 3 = 4 < 5
    assert "of the 7 detectors HFC defeats, 4 are not defeated by the weight-0 arm" in verdict.text
    rows = [r for r in rows if not (r.get("variant") == SCHEDULE_ONLY and r["detector"] in schedule_defeats[:2])]
    assert claim(rows, "constraint, not schedule").holds is True


def test_without_a_weight_0_set_the_drop_is_said_to_be_unattributed() -> None:
    rows = [r for d in DETECTORS for r in detector_rows(d)] + success_rows()
    verdict = claim(rows, "constraint, not schedule")
    assert verdict.holds is None
    assert verdict.text.startswith("The drop is not attributed on d (pgd at eps 8/256")
    assert "no weight-0 set" in verdict.text


def test_arms_are_judged_separately() -> None:
    rows = success_rows()
    rows += [r for d in DETECTORS for r in detector_rows(d, arm="same")]
    rows += [r for d in DETECTORS for r in detector_rows(d, arm="unconstrained", change=(0.0, -0.05, 0.05), tpr=0.9)]
    hidden = {v.arm: v.holds for v in verdicts(rows, "pgd", "8/256") if v.claim == "hidden by HFC"}
    assert hidden == {"same": True, "unconstrained": False}


def test_the_engines_own_defences_do_not_count_toward_hiding() -> None:
    rows = [r for d in DETECTORS[: MIN_DEFEATED - 1] for r in detector_rows(d)] + success_rows()
    rows += detector_rows("typicality")  # defeated, but not one of the HFC paper's detectors
    verdict = claim(rows, "hidden by HFC")
    assert verdict.holds is False and "TYPICALITY" not in verdict.text


def test_still_caught_names_the_configurations_and_the_adaptive_outcome() -> None:
    rows = [r for d in DETECTORS for r in detector_rows(d)] + success_rows()
    rows += detector_rows("typicality", arm="same", change=(0.0, -0.02, 0.02), tpr=0.95)
    rows += detector_rows("typicality", arm="same", change=(-0.4, -0.5, -0.3), tpr=0.1, variant="adaptive")
    verdict = claim(rows, "still caught")
    assert verdict.holds is True
    assert verdict.text.count("TYPICALITY on the 'same' layers") == 1
    assert "the adaptive attack defeats them all" in verdict.text
    rows = [r for r in rows if r["variant"] != "adaptive"]
    rows += detector_rows("typicality", arm="same", change=(0.0, -0.02, 0.02), tpr=0.9, variant="adaptive")
    assert "adaptive TPR 0.90" in claim(rows, "still caught").text
    none = [r for d in DETECTORS for r in detector_rows(d)] + success_rows()
    assert claim(none, "still caught").holds is False


def test_caught_needs_more_than_half_of_the_aes_at_90_tnr() -> None:
    rows = detector_rows("kd", change=(-0.05, -0.09, -0.01), tpr=DEFEATED_TPR) + success_rows()
    found = evidence(rows_frame(rows))["kd"]
    assert not found.defeated and not found.caught  # its AUROC barely fell, but it flags only half of the AEs
    rows = detector_rows("kd", change=(-0.3, -0.4, -0.2), tpr=DEFEATED_TPR + 0.01) + success_rows()
    assert evidence(rows_frame(rows))["kd"].caught


def test_mechanism_reads_the_deepest_layers_loglikelihood() -> None:
    base = {"dataset": "d", "model": "m", "detector": "", "variant": ""}
    loglik = {"layer1": (-1.0, -2.0, -1.5), "layer4": (-10.0, -500.0, -20.0)}  # clean, plain, HFC; deepest last
    rows = [r for d in DETECTORS for r in detector_rows(d)] + success_rows()
    for layer, (clean, plain, hfc) in loglik.items():
        rows.append(row(Metric.FEATURE_LOGLIK, clean, layer=layer, attack="", hfc=False, **base))
        for value, on_hfc in ((plain, False), (hfc, True)):
            rows.append(row(Metric.FEATURE_LOGLIK, value, layer=layer, attack="pgd", eps="8/256", hfc=on_hfc, **base))
    verdict = claim(rows, "mechanism")
    assert verdict.holds is True
    assert "(layer4)" in verdict.text
    assert "HFC AEs -20.0, plain AEs -500.0, clean images under their own class -10.0" in verdict.text
