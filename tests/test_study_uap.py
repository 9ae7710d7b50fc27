"""The UAP study's per-seed protocol and statistics: each seed trains its own baselines; kappa changes by a paired
image bootstrap per seed, combined over seeds (against numpy on hand-made predictions); the clean-performance tests
over seeds (against scipy and statsmodels); the tiny study end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t
from scipy.stats import ttest_rel
from statsmodels.stats.weightstats import ttost_paired

from engine.runs import ROW_COLUMNS, STUDIES, Artifacts, RunContext
from engine.runs.overrides import merge
from engine.runs.studies import UAP_DEFAULTS, UAP_TINY, run_uap_study
from engine.runs.studies.uap_analysis import clean_comparisons, combine_seeds, kappa_gains, paired_kappa_changes

K = 5


def numpy_kappa(y: np.ndarray, pred: np.ndarray) -> float:
    """Quadratic-weighted kappa from its definition: 1 - sum(W O) / sum(W E)."""
    observed = np.zeros((K, K))
    np.add.at(observed, (y, pred), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / len(y)
    weights = (np.arange(K)[:, None] - np.arange(K)[None, :]) ** 2 / (K - 1) ** 2
    return 1 - (weights * observed).sum() / (weights * expected).sum()


def noisy(y: np.ndarray, flip: float, rng: np.random.Generator) -> np.ndarray:
    """``y`` with a share ``flip`` of its grades moved by one."""
    moved = np.clip(y + rng.choice([-1, 1], len(y)), 0, K - 1)
    return np.where(rng.random(len(y)) < flip, moved, y)


def direct_changes(y, base, tuned, n_boot, seed):
    """Per seed: whole-pool change and its replicates, the images drawn as resample_kappas draws them (one index
    set per replicate, shared by both models and every seed)."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(y), len(y)) for _ in range(n_boot)]
    point = np.array([numpy_kappa(y, t) - numpy_kappa(y, b) for b, t in zip(base, tuned, strict=True)])
    reps = [
        [numpy_kappa(y[i], t[i]) - numpy_kappa(y[i], b[i]) for i in draws] for b, t in zip(base, tuned, strict=True)
    ]
    return point, np.array(reps)


@pytest.fixture(scope="module")
def graded():
    """Labels of 60 images and, per condition, (baseline, fine-tuned) predictions for 3 seeds."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, K, 60)
    conditions = {
        name: (np.stack([noisy(y, fb, rng) for _ in range(3)]), np.stack([noisy(y, ft, rng) for _ in range(3)]))
        for name, fb, ft in (("sgd_uap", 0.8, 0.2), ("pgd", 0.5, 0.45))
    }
    return y, conditions


def test_paired_kappa_changes_and_their_combination_match_numpy(graded):
    y, conditions = graded
    changes = paired_kappa_changes(y, conditions, K, n_boot=150, seed=7)
    for name, (base, tuned) in conditions.items():
        point, reps = direct_changes(y, base, tuned, 150, 7)
        np.testing.assert_allclose(changes[name][0], point, atol=1e-12)
        np.testing.assert_allclose(changes[name][1], reps, atol=1e-12)
        out = combine_seeds(point, reps)
        half = student_t.ppf(0.975, 2) * np.sqrt(point.var(ddof=1) / 3 + reps.mean(0).var(ddof=1))
        mean = point.mean()
        assert (out["mean"], out["low"], out["high"]) == pytest.approx((mean, mean - half, mean + half), abs=1e-12)
        for p, r, seed in zip(point, reps, out["per_seed"], strict=True):
            assert (seed["change"], seed["low"], seed["high"]) == pytest.approx((p, *np.quantile(r, [0.025, 0.975])))
    assert changes["sgd_uap"][0].min() > 0  # fewer flipped grades after fine-tuning: a gain in every seed
    with pytest.raises(ValueError, match="seeds >= 2"):
        combine_seeds(point[:1], reps[:1])


def _payload(y, runs_per_model, **config):
    cfg = merge(UAP_DEFAULTS, {"bootstrap": 150, **config}, name="uap config")
    return {
        "config": cfg,
        "labels": y.tolist(),
        "classes": [str(c) for c in range(K)],
        "relations": {"sgd_uap": "unseen_family", "pgd": "per_image"},
        "models": [{"name": name, "runs": runs} for name, runs in runs_per_model.items()],
    }


def test_kappa_gains_combine_each_condition_and_average_relations_within_seed_and_replicate(graded):
    y, conditions = graded
    runs = [
        {
            label: {
                "attacks": [
                    {"attack": a, "eps": "x", "kappa": numpy_kappa(y, p[side][s]), "pred": p[side][s]}
                    for a, p in conditions.items()
                ]
            }
            for side, label in ((0, "baseline"), (1, "finetuned"))
        }
        for s in range(3)
    ]
    gains, summary = kappa_gains(_payload(y, {"m": runs}, seed=7))
    direct = {name: direct_changes(y, *pair, 150, 7) for name, pair in conditions.items()}
    assert [g["attack"] for g in gains] == list(conditions)
    for g in gains:
        expected = combine_seeds(*direct[g["attack"]])
        assert [g["gain"][key] for key in ("mean", "low", "high")] == pytest.approx(
            [expected[key] for key in ("mean", "low", "high")], abs=1e-12
        )
    assert set(summary) == {"unseen_family", "per_image", "held_out"}
    assert summary["per_image"]["low"] == pytest.approx(combine_seeds(*direct["pgd"])["low"], abs=1e-12)
    # held out = both conditions: averaged within each seed and each replicate, then combined over seeds
    pooled = combine_seeds(*(np.mean([direct[name][i] for name in direct], axis=0) for i in (0, 1)))
    held = summary["held_out"]
    assert held["conditions"] == 2 and [held[key] for key in ("mean", "low", "high")] == pytest.approx(
        [pooled[key] for key in ("mean", "low", "high")], abs=1e-12
    )


def test_clean_tests_over_seeds_match_scipy_and_statsmodels(graded):
    y, _ = graded
    rng = np.random.default_rng(5)
    base = [noisy(y, 0.3, rng) for _ in range(4)]
    tuned = [noisy(y, 0.28, rng) for _ in range(4)]
    runs = [
        {"baseline": {"clean_pred": b.tolist()}, "finetuned": {"clean_pred": t.tolist()}}
        for b, t in zip(base, tuned, strict=True)
    ]
    payload = {**_payload(y, {"m": runs}), "ensemble": {"baseline": base, "finetuned": tuned}}
    clean = clean_comparisons(payload)
    assert [c["tuned"] for c in clean] == ["m+uap-ft", "ensemble(uap-ft)"]
    kb, kt = np.array([numpy_kappa(y, p) for p in base]), np.array([numpy_kappa(y, p) for p in tuned])
    seeds = clean[0]["seeds"]
    np.testing.assert_allclose(seeds["per_seed"], kt - kb, atol=1e-12)
    assert seeds["tost"]["n"] == 4 and clean[0]["kappa_baseline"]["mean"] == pytest.approx(kb.mean())
    p, lower, upper = ttost_paired(kt, kb, -0.02, 0.02)
    assert (seeds["tost"]["p"], seeds["tost"]["p_lower"], seeds["tost"]["p_upper"]) == pytest.approx(
        (p, lower[1], upper[1]), rel=1e-9
    )
    assert seeds["ttest"]["p"] == pytest.approx(ttest_rel(kt, kb).pvalue, rel=1e-9)
    assert clean[0]["folds"]["tost"]["n"] == UAP_DEFAULTS["clean_test"]["folds"]
    assert clean[1]["seeds"]["tost"] == clean[0]["seeds"]["tost"]  # same predictions, same test
    same = clean_comparisons({**payload, "ensemble": {"baseline": base, "finetuned": [b.copy() for b in base]}})
    assert same[1]["seeds"]["diff"]["mean"] == 0 and same[1]["folds"]["diff"]["mean"] == 0


def test_seeds_and_bootstrap_below_two_name_their_key(tmp_path):
    for key in ("seeds", "bootstrap"):
        with pytest.raises(ValueError, match=f"uap config: {key} must be an int >= 2"):
            run_uap_study({key: 1}, tmp_path)


@pytest.mark.slow
def test_tiny_study_trains_baselines_per_seed_end_to_end(tmp_path):
    result = run_uap_study(UAP_TINY, tmp_path)
    assert result.rows and all(
        set(r) <= set(ROW_COLUMNS) and r["detector"] == "" and isinstance(r["value"], float) for r in result.rows
    )
    payload = result.payload
    cfg = payload["config"]
    assert payload["seeds"] == [0, 1] and [m["name"] for m in payload["models"]] == ["resnet18#0", "resnet18#1"]
    ctx = RunContext(Artifacts(tmp_path), progress=False)
    splits = ctx.splits(cfg["dataset"], cfg["split"], cfg["seed"])
    for m, model_cfg in zip(payload["models"], cfg["models"], strict=True):
        refs = [r["baseline_model"] for r in m["runs"]]
        assert refs == [ctx.trained(splits, model_cfg, seed) for seed in payload["seeds"]]  # cached, seeded by seed
        first, second = (ctx.model(ref).state_dict() for ref in refs)
        assert not all(torch.equal(v, second[k]) for k, v in first.items())
        files = sorted(tmp_path.glob(f"models/{m['name'].replace('#', '_')}-uap-finetuned-*/finetuned.pt"))
        tuned = [torch.load(f, weights_only=True)["state_dict"] for f in files]
        assert len(tuned) == 2 and not all(torch.equal(v, tuned[1][k]) for k, v in tuned[0].items())  # per seed
    assert payload["relations"] == {
        "deepfool_uap": "unseen_family",
        "sgd_uap": "seen",
        "data_free_uap": "unseen_family",
        "sgd_uap_l2": "unseen_norm",
        "pgd": "per_image",
    }
    assert len(payload["ensemble"]["baseline"]) == len(payload["ensemble"]["finetuned"]) == 2
    assert set(payload["summary"]) == {"seen", "unseen_norm", "unseen_family", "per_image", "held_out"}
    held = payload["summary"]["held_out"]
    assert held["conditions"] == 2 * 4 and held["low"] <= held["mean"] <= held["high"] and len(held["per_seed"]) == 2
    assert [c["tuned"] for c in payload["clean"]] == ["resnet18#0+uap-ft", "resnet18#1+uap-ft", "ensemble(uap-ft)"]
    assert all(c["seeds"]["tost"]["n"] == 2 and c["folds"]["tost"]["n"] == 3 for c in payload["clean"])
    assert {("tost_p_clean_kappa", "folds"), ("tost_p_clean_kappa", "seeds"), ("ttest_p_clean_kappa", "seeds")} <= {
        (r["metric"], r["subset"]) for r in result.rows
    }
    html = "".join(s.render() for s in STUDIES["uap"].sections(payload))
    assert "TOST" in html and "unseen family" in html and "per seed" in html and "<img" in html
