"""A model that resists is a result: success rates with exact binomial intervals, detection marked not measurable
(too few successful AEs, or fewer examples than a detector needs), the run going on, and the report's lines on
resisted budgets and possible gradient masking (engine.report.robustness) -- on hand-made rows, on the detection
protocol, and end to end on a tiny run."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from statsmodels.stats.proportion import proportion_confint

from engine.cli import main
from engine.detectors import KD, LID, Features, ProtocolSplit, TooFewExamples, run_protocol
from engine.metrics import binomial_ci
from engine.report.robustness import MASKING_SUCCESS, RESISTED_SUCCESS, robustness_lines
from engine.runs.schema import CI_LEVEL, Metric, row
from engine.runs.stages.attack import success_row

BASE = {"dataset": "d", "model": "m", "attack": "pgd", "detector": "", "hfc": False, "variant": ""}


def success(eps: str, successes: int, trials: int = 100, **columns: Any) -> dict[str, Any]:
    return success_row(successes, trials, **{**BASE, "eps": eps, **columns})


def test_binomial_interval_matches_statsmodels() -> None:
    for k, n in ((0, 13), (3, 13), (13, 13), (50, 120), (1, 1)):
        assert binomial_ci(k, n) == pytest.approx(proportion_confint(k, n, alpha=0.05, method="beta"), abs=1e-9)
    assert np.isnan(binomial_ci(0, 0)).all()
    with pytest.raises(ValueError, match="need 0 <= successes <= trials .*, got 4, 3"):
        binomial_ci(4, 3)


def test_success_row_counts_its_attacks_with_an_interval() -> None:
    found = success("1/256", 2, 40)
    assert found["metric"] == Metric.ATTACK_SUCCESS_RATE and found["value"] == 2 / 40
    assert (found["ci_low"], found["ci_high"]) == pytest.approx(proportion_confint(2, 40, method="beta"))
    assert (found["n_pos"], found["n_neg"], found["ci_level"], found["eps_value"]) == (2, 38, CI_LEVEL, 1 / 256)


def test_resisted_budgets_are_named_with_their_interval() -> None:
    rows = [success("1/256", 2), success("2/256", 49), success("8/256", 100), success("8/256", 10, hfc=True)]
    lines = robustness_lines(rows)
    resisted = [line for line in lines if line.startswith("The model resisted")]
    assert len(resisted) == 1
    low, high = binomial_ci(2, 100)
    assert f"eps 1/256 (success 0.02 [{low:.2f}, {high:.2f}], 2 of 100 images)" in resisted[0]
    assert "2/256 (success 0.49" in resisted[0] and "8/256" not in resisted[0]  # 0.49 < 0.5 <= 1.0
    assert f"fewer than {RESISTED_SUCCESS:.0%}" in resisted[0]
    assert not any("gradient masking" in line for line in lines)  # success reaches 1 at the largest budget


def test_gradient_masking_flags_a_plateau_below_one_and_a_fall() -> None:
    plateau = [success("2/256", 60), success("8/256", int(100 * MASKING_SUCCESS) - 1)]
    (line,) = [x for x in robustness_lines(plateau) if "gradient masking" in x]
    assert "(2/256 0.60, 8/256 0.89)" in line and f"below {MASKING_SUCCESS}" in line
    at_threshold = [success("2/256", 60), success("8/256", int(100 * MASKING_SUCCESS))]
    assert not any("gradient masking" in x for x in robustness_lines(at_threshold))
    falls = [success("2/256", 99), success("4/256", 80), success("8/256", 95)]  # 0.80's interval is below 0.99's
    (line,) = [x for x in robustness_lines(falls) if "gradient masking" in x]
    assert "it falls from 0.99 at 2/256 to 0.80 at 4/256" in line
    within_noise = [success("2/256", 97, 100), success("8/256", 95, 100)]  # the intervals overlap
    assert not any("gradient masking" in x for x in robustness_lines(within_noise))


def test_not_measurable_rows_make_one_line_per_setting() -> None:
    cell = {**BASE, "eps": "1/256", "arm": "same"}
    rows = [row(Metric.NOT_MEASURABLE, 0, **{**cell, "detector": name}) for name in ("kd", "lid")]
    rows.append(row(Metric.NOT_MEASURABLE, 0, **cell))  # the features stage's
    (line,) = robustness_lines(rows)
    assert line.startswith("Not measurable on d (m) at pgd eps 1/256 (0 successful AEs): KD (same), LID (same)")
    assert "the feature measurements" in line


def features(n: int, rng: np.random.Generator, shift: float = 0.0) -> Features:
    logits = np.tile([5.0, 0.0], (n, 1))
    return Features(logits, {"f": rng.normal(shift, 1.0, (n, 4)).astype(np.float32)}, labels=np.zeros(n, int))


def test_protocol_raises_too_few_examples_without_a_successful_fit_ae_and_for_lids_k() -> None:
    rng = np.random.default_rng(0)
    clean, adversarial = features(40, rng), features(40, rng, shift=3.0)
    with pytest.raises(TooFewExamples, match="the attack succeeded on none of the 28 images of the fit split"):
        run_protocol([KD()], clean, adversarial, np.zeros(40, bool), train=clean, n_boot=0)
    fit_only = np.zeros(40, bool)
    fit_only[ProtocolSplit.make(np.ones(40, bool), 0.7, 0).fit] = True  # the split run_protocol draws (seed 0)
    result = run_protocol([KD()], clean, adversarial, fit_only, train=clean, n_boot=0)  # degrades: no successful row
    assert {r["subset"] for r in result.to_rows() if r["attack"] == "attack"} == {"failed", "all"}
    with pytest.raises(TooFewExamples, match=r"LID needs more than k\+1=31 clean examples, got 28"):
        run_protocol([LID(k=30, batch_size=100)], clean, adversarial, np.ones(40, bool), n_boot=0)
    result = run_protocol([LID(k=5)], clean, adversarial, np.ones(40, bool), n_boot=0)  # a k the data allow
    assert result.value("lid") > 0.9


TINY = {
    "name": "resists",
    "datasets": [{"name": "fundus-synth", "task": "binary", "n": 400, "image_size": 32}],
    "model": {"width": 0.125, "epochs": 2, "batch_size": 32},
    "attacks": ["pgd"],
    "eps": ["1/1048576", "8/256"],  # the first far too small to flip (almost) any prediction: the model resists it
    "headline": {"eps": "1/1048576"},
    "attack": {"steps": 3, "pool": 60, "batch_size": 60},
    "hfc": {
        "n_components": 1,
        "steps": 3,
        "fixed_weights": [],
        "adaptive": False,
        "calibration": {"images": 20, "grid": [1.0, 0.1]},
    },
    "detectors": ["kd", "lid"],
    "detector": {"bootstrap": 10, "train_limit": 100, "arms": None, "lid": {"k": 60}},  # LID: more than the pool
    "studies": [],
}


@pytest.mark.slow
def test_a_run_on_a_model_that_resists_completes_with_its_results(tmp_path, capsys) -> None:
    path = tmp_path / "resists.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs")}))
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "runs" / "resists" / "results.csv")
    assert (frame["seed"] == 0).all()
    plain = frame[(frame["metric"] == "attack_success_rate") & ~frame["hfc"].astype(bool)]
    (tiny,) = plain[plain["eps"] == "1/1048576"].itertuples()
    assert tiny.value < RESISTED_SUCCESS and tiny.value == tiny.n_pos / (tiny.n_pos + tiny.n_neg)
    assert (tiny.ci_low, tiny.ci_high) == pytest.approx(binomial_ci(int(tiny.n_pos), int(tiny.n_pos + tiny.n_neg)))
    assert tiny.ci_level == CI_LEVEL
    unmeasured = frame[(frame["metric"] == "not_measurable") & frame["detector"].notna()]
    assert set(zip(unmeasured["detector"], unmeasured["eps"], strict=True)) == {
        ("kd", "1/1048576"),
        ("lid", "1/1048576"),
        ("lid", "8/256"),  # LID: k + 1 > clean examples
    }
    kd = frame[(frame["detector"] == "kd") & (frame["eps"] == "8/256") & (frame["metric"] == "auroc")]
    assert set(kd["subset"]) >= {"successful", "paired", "change"} and kd["n_pos"].notna().all()
    assert "The model resisted pgd on fundus-synth:binary (resnet18) at eps 1/1048576 (success 0.00" in out
    assert "Not measurable on fundus-synth:binary (resnet18) at pgd eps 8/256" in out
    html = (tmp_path / "runs" / "resists" / "report.html").read_text()
    assert "LID needs more than k+1=61 clean examples" in html and "The model resisted pgd" in html
    assert "so the smallest weight is used" in html  # the HFC weight's calibration could not reach its target
    assert "HFC w0" not in html  # no weight-0 set: no caption explaining one
