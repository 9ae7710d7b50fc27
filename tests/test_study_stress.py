"""The stress study (paper A): verdict rules on hand-made measurements (accuracy gap, seeds), snapshot matching,
train()'s step snapshots, and the study end to end on tiny settings (seeds, both image variants, resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.attacks import PGD
from engine.data import as_tensors
from engine.metrics import mean_ci, mean_pairwise_cosine, relative_deviation
from engine.models import FeatureExtractor, evaluate, load_model
from engine.runs import ROW_COLUMNS, STUDIES, Artifacts, ResultStore, RunContext
from engine.runs.overrides import merge
from engine.runs.studies import STRESS_DEFAULTS, STRESS_TINY, matched_models, run_stress_study
from engine.runs.studies.stress import match_snapshots
from engine.runs.studies.stress_report import (
    MAX_ACCURACY_GAP,
    VARIANTS,
    seeds_verdict,
    stress_sections,
    stress_verdict,
)

EPS = "4/256"

# ---------------------------------------------------------------------------------------------------------------
# Verdict rules on hand-made measurements: two layers, one eps, tight bootstrap replicates around the points.


def _measured(label, group, accuracy, deviation, seed=0):
    """A (payload entry, replicates) pair whose PGD deviation is ``deviation`` on both variants and layers, with
    aligned PGD shifts (cosine 0.9) and unaligned noise shifts (0.0)."""
    rng = np.random.default_rng(seed)
    results, replicates = [], {}
    for variant in VARIANTS:
        for attack, dev, cos in (("pgd", deviation, 0.9), ("noise", deviation / 100, 0.0)):
            results.append(
                {"attack": attack, "eps": EPS, "variant": variant, "success_rate": 0.9 if attack == "pgd" else None,
                 "n": 50, "deviation": [dev, dev], "cosine": [cos, cos], "maha_auroc": [0.8, 0.8],
                 "maha_ratio": [2.0, 2.0]}
            )  # fmt: skip
            noise = 1 + 0.01 * rng.standard_normal(200)
            replicates[(variant, attack, EPS)] = {
                "deviation_mean": dev * noise,
                "deviation_deep": dev * noise,
                "cosine_deep": cos + 0.01 * rng.standard_normal(200),
            }
    entry = {"label": label, "group": group, "step": 4, "val_accuracy": accuracy, "accuracy": accuracy,
             "n_test": 200, "n_correct": 150, "layers": ["a", "b"], "results": results}  # fmt: skip
    return entry, replicates


def _seed(medical_deviation, medical_accuracy=0.9, natural_accuracy=0.9, seed=0):
    measured = [
        _measured("fundus", "medical", medical_accuracy, medical_deviation, seed),
        _measured("natural", "natural", natural_accuracy, 1.0, seed),
    ]
    return {"seed": seed, "datasets": [entry for entry, _ in measured], "verdict": stress_verdict(measured)}


def _payload(runs):
    config = {"eps": [EPS], "match_accuracy": True, "match_every": 4}
    return {"config": config, "seeds": [r["seed"] for r in runs], "runs": runs, "verdict": seeds_verdict(runs)}


def _html(payload):
    return "".join(s.render() for s in stress_sections(payload))


def test_accuracy_gap_beyond_the_limit_makes_vulnerability_undecidable():
    assert MAX_ACCURACY_GAP == 0.05
    matched = _seed(3.0, 0.90, 0.88)["verdict"]
    assert matched["medical_more_vulnerable"] == "holds" and matched["accuracy_gap"] == pytest.approx(0.02)
    run = _seed(3.0, 0.90, 0.80)  # the natural model 0.1 below: the same deviations can no longer be compared
    verdict = run["verdict"]
    assert verdict["medical_more_vulnerable"] is None and verdict["accuracy_gap"] == pytest.approx(0.1)
    assert verdict["binary_shifts_aligned"] == "holds"  # alignment is judged within each model
    assert verdict["per_eps"][0]["ratios"]["fooled"]["fundus"]["deviation_mean"][0] == pytest.approx(3.0)
    payload = _payload([run])
    assert payload["verdict"]["medical_more_vulnerable"] is None and payload["verdict"]["confounded_seeds"] == [0]
    html = _html(payload)
    assert "cannot be decided (on seed(s) 0 the matched models&#x27; clean test accuracies differ by more" in html
    assert "fundus 0.900 / 0.900, natural 0.800 / 0.800 (test spread 0.100, more than 0.05)" in html


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ((3.0, 3.0, 3.0), "holds"),
        ((3.0, 1.0, 3.0), "not shown"),  # one seed's interval contains 1
        ((3.0, 0.5, 3.0), "reversed"),  # one seed's interval lies below 1
    ],
)
def test_vulnerability_holds_only_when_it_holds_on_every_seed(ratios, expected):
    runs = [_seed(r, seed=s) for s, r in enumerate(ratios)]
    verdict = _payload(runs)["verdict"]
    assert verdict["medical_more_vulnerable"] == expected and verdict["confounded_seeds"] == []
    across = verdict["ratios_over_seeds"][0]["ratios"]
    points = [run["verdict"]["per_eps"][0]["ratios"]["fooled"]["fundus"]["deviation_mean"][0] for run in runs]
    assert points == pytest.approx(list(ratios))
    assert across["fooled"]["fundus"]["deviation_mean"] == mean_ci(points)
    assert set(across) == set(VARIANTS)


def test_one_confounded_seed_makes_the_verdict_undecidable_and_the_report_shows_every_seed():
    runs = [_seed(3.0, seed=0), _seed(3.0, 0.9, 0.8, seed=1), _seed(0.5, seed=2)]
    payload = _payload(runs)
    verdict = payload["verdict"]
    assert verdict["medical_more_vulnerable"] is None and verdict["confounded_seeds"] == [1]
    assert verdict["binary_shifts_aligned"] == "holds" and verdict["natural_shifts_aligned"] == "holds"
    html = _html(payload)
    assert "seed 0 holds, seed 1 cannot be decided, seed 2 reversed" in html
    assert "mean (t interval)" in html and "all attacked images" in html and html.count("<img") == 4


def test_match_snapshots_picks_the_closest_to_the_weakest_models_best():
    curves = [[0.5, 0.7, 0.9, 0.85], [0.6, 0.8, 0.8, 0.75], [0.55, 0.95]]
    assert match_snapshots(curves) == [3, 2, 1]  # target 0.8; ties go to the latest snapshot
    assert match_snapshots([[0.7, 0.6]]) == [0]


# ---------------------------------------------------------------------------------------------------------------
# Step snapshots and matching on tiny models


def _tiny_splits(ctx, name="fundus-synth"):
    spec = {"name": name, "n": 80, "image_size": 16, **({"task": "binary"} if name == "fundus-synth" else {})}
    return ctx.splits(spec, {"val": 0.15, "test": 0.15}, 0)


def test_step_snapshots_leave_training_unchanged_and_keep_their_validation_metrics(tmp_path):
    ctx = RunContext(Artifacts(tmp_path), progress=False)
    splits = _tiny_splits(ctx)
    cfg = {"arch": "resnet18", "width": 0.0625, "small_stem": True, "epochs": 2, "batch_size": 16, "dropout": 0.2}
    plain = load_model(ctx.artifacts.path(ctx.trained(splits, cfg, seed=1)))
    final = ctx.artifacts.path(ctx.trained(splits, {**cfg, "snapshot_every": 2}, seed=1))
    snapped = load_model(final)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, snapped.state_dict()[key], rtol=0, atol=0)
    steps = len(splits.train) // 16  # steps per epoch
    snaps = [s for record in snapped.meta["history"] for s in record["snapshots"]]
    assert [s["step"] for s in snaps] == list(range(2, 2 * steps + 1, 2))
    assert [s["epoch"] for s in snaps] == [(s["step"] - 1) // steps for s in snaps]
    last = snaps[-1]
    model = load_model(final.parent / "steps" / f"{last['step']}.pt")
    assert model.meta["step_metrics"] == last
    assert evaluate(model, splits.val, batch_size=128)["accuracy"] == pytest.approx(last["val_accuracy"])
    with pytest.raises(ValueError, match="snapshot_every"):
        ctx.trained(splits, {**cfg, "snapshot_every": 0}, seed=1)


def test_matched_models_measure_the_chosen_step_snapshot(tmp_path):
    ctx = RunContext(Artifacts(tmp_path), progress=False)
    cfg = merge(STRESS_DEFAULTS, STRESS_TINY, name="stress config")
    chosen = matched_models(cfg, ctx, seed=1)
    finals = [load_model(ctx.artifacts.path(c["ref"]).parents[1] / "model.pt").meta for c in chosen]
    curves = [[s for record in meta["history"] for s in record["snapshots"]] for meta in finals]
    picks = match_snapshots([[s["val_accuracy"] for s in curve] for curve in curves])
    for c, curve, pick in zip(chosen, curves, picks, strict=True):
        assert c["step"] == curve[pick]["step"] and c["ref"].endswith(f"steps/{c['step']}.pt")
        assert ctx.model(c["ref"]).meta["step_metrics"]["val_accuracy"] == c["val_accuracy"]
    unmatched = matched_models({**cfg, "match_accuracy": False}, ctx, seed=1)
    assert all(c["step"] is None and c["ref"].endswith("model.pt") for c in unmatched)


def test_config_errors_name_the_key(tmp_path):
    for key, value in (("seeds", 0), ("match_every", "4"), ("match_every", True)):
        with pytest.raises(ValueError, match=f"stress config: {key} must be an int >= 1"):
            run_stress_study({key: value}, tmp_path)
    with pytest.raises(ValueError, match="match_every=1000 exceeds the optimisation steps"):
        run_stress_study({**STRESS_TINY, "seeds": 1, "match_every": 1000}, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The study end to end (tiny settings)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stress")
    cfg = merge(STRESS_DEFAULTS, {**STRESS_TINY, "pool": 40}, name="stress config")
    return workdir, cfg, run_stress_study(cfg, workdir)


@pytest.mark.slow
def test_stress_study_end_to_end_and_resume(tiny, tmp_path):
    workdir, cfg, result = tiny
    assert result.rows
    for r in result.rows:
        assert set(r) <= set(ROW_COLUMNS) and r["detector"] == "" and isinstance(r["value"], float)
    measured = {(r["metric"], r["subset"], r["layer"]) for r in result.rows}
    for metric in ("feature_deviation", "shift_cosine", "maha_auroc", "maha_distance_ratio"):
        assert {(metric, "successful", "layer4.1.relu2"), (metric, "all", "layer4.1.relu2")} <= measured
    assert {r["attack"] for r in result.rows} == {"", "pgd", "noise"}
    payload = result.payload
    assert payload["seeds"] == [0, 1] and [run["seed"] for run in payload["runs"]] == [0, 1]
    accuracy = next(r for r in result.rows if r["metric"] == "clean_accuracy" and r["dataset"] == "natural")
    per_seed = [run["datasets"][1]["accuracy"] for run in payload["runs"]]
    assert accuracy["value"] == pytest.approx(np.mean(per_seed)) and accuracy["ci_low"] <= accuracy["value"]
    words = {"holds", "not shown", "reversed", "undecided", None}
    assert {payload["verdict"][claim] for claim in ("medical_more_vulnerable", "binary_shifts_aligned")} <= words
    html = "".join(s.render() for s in STUDIES["stress"].sections(payload))
    assert "Claim" in html and "matched on validation accuracy" in html and "2 training seeds" in html
    with ResultStore(tmp_path / "store") as store:
        store.commit("stress", "study", payload, result.rows)
        assert len(store.rows()) == len(result.rows)
    checkpoints = sorted(workdir.glob("models/*/model.pt"))
    assert len(checkpoints) == 2 * 2  # datasets x seeds
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    again = run_stress_study(cfg, workdir)
    assert [p.stat().st_mtime_ns for p in checkpoints] == stamps  # reused, not retrained
    assert again.rows == result.rows


@pytest.mark.slow
def test_fooled_variant_keeps_the_successful_aes_and_attacked_keeps_all(tiny):
    workdir, cfg, result = tiny
    ctx = RunContext(Artifacts(workdir), progress=False)
    seed = 1
    chosen = matched_models(cfg, ctx, seed)[0]
    entry = result.payload["runs"][seed]["datasets"][0]
    model = ctx.model(chosen["ref"])
    x, y = as_tensors(chosen["splits"].test, cfg["pool"])
    keep = model(x).argmax(1) == y
    adv = PGD(model, eps=cfg["eps"][0], steps=cfg["pgd_steps"], seed=seed)(x[keep], y[keep])
    ok = adv.success
    assert 2 <= int(ok.sum()) < int(keep.sum()), "the check needs both failed and successful AEs"
    layer = cfg["layers"][-1]
    extractor = FeatureExtractor(model, [layer])
    with torch.no_grad():
        clean = extractor(x[keep])[1][layer].double().numpy()
        shifted = extractor(adv.adv)[1][layer].double().numpy()
    extractor.remove()
    for variant, rows in (("fooled", ok.numpy()), ("attacked", np.ones(len(ok), bool))):
        pgd = next(r for r in entry["results"] if r["attack"] == "pgd" and r["variant"] == variant)
        assert pgd["n"] == int(rows.sum()) and pgd["success_rate"] == pytest.approx(float(ok.float().mean()))
        expected = float(np.mean(relative_deviation(clean[rows], shifted[rows])))
        assert pgd["deviation"][-1] == pytest.approx(expected, rel=1e-5)
        cosine = mean_pairwise_cosine(shifted[rows] - clean[rows], y[keep][rows].numpy())
        assert pgd["cosine"][-1] == pytest.approx(cosine, abs=1e-6)
