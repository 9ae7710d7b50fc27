"""Studies: the stress-test metrics on models with known answers, kappa/t-test against sklearn/scipy, UAP
fine-tuning, the ensemble, and both study functions end to end on tiny settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from scipy.stats import t as student_t
from scipy.stats import ttest_rel
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.weightstats import DescrStatsW, ttost_paired

from engine.detectors import TiedGaussian
from engine.metrics import (
    mean_ci,
    mean_pairwise_cosine,
    paired_ttest,
    relative_deviation,
    resample_kappas,
    tost_paired,
    weighted_pairwise_cosine,
)
from engine.metrics.roc import bootstrap_weights
from engine.models import build_model, load_model
from engine.runs import Artifacts, RunContext
from engine.runs.overrides import merge
from engine.runs.studies import (
    Ensemble,
    craft_uap,
    run_stress_study,
    run_uap_study,
    uap_finetune,
)

# ---------------------------------------------------------------------------------------------------------------
# Stress metrics on a linear model: f(x) = W x, so f(x + d) - f(x) = W d for every x.


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "d_in", "d_out"), [(1, 1, 1), (7, 5, 3), (41, 13, 9)])
def test_relative_deviation_of_a_linear_layer_by_hand(dtype, n, d_in, d_out):
    rng = np.random.default_rng(n + d_in)
    w = rng.normal(size=(d_out, d_in)).astype(dtype)
    x = rng.uniform(0.1, 1.0, size=(n, d_in)).astype(dtype)
    delta = rng.uniform(-0.01, 0.01, size=(n, d_in)).astype(dtype)
    clean, shifted = x @ w.T, (x + delta) @ w.T
    expected = [
        np.sqrt(np.sum((w.astype(np.float64) @ delta[i]) ** 2)) / np.sqrt(np.sum(clean[i] ** 2)) for i in range(n)
    ]
    np.testing.assert_allclose(relative_deviation(clean, shifted), expected, rtol=1e-3 if dtype == np.float32 else 1e-9)


def test_relative_deviation_zero_clean_feature_is_nan_and_bad_shapes_raise():
    out = relative_deviation(np.array([[0.0, 0.0], [3.0, 4.0]]), np.array([[1.0, 0.0], [3.0, 5.0]]))
    assert np.isnan(out[0]) and out[1] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="same shape"):
        relative_deviation(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="clean"):
        relative_deviation(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        relative_deviation(np.full((2, 2), np.nan), np.ones((2, 2)))


def test_fixed_direction_through_a_linear_model_has_cosine_one():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4).double()
    x = torch.rand(25, 6, dtype=torch.float64)
    direction = torch.randn(6, dtype=torch.float64)
    scales = torch.rand(25, 1, dtype=torch.float64) + 0.1  # same direction, different step lengths
    with torch.no_grad():
        shifts = layer(x + scales * direction) - layer(x)
    assert mean_pairwise_cosine(shifts.numpy()) == pytest.approx(1.0, abs=1e-12)
    # opposite directions for two classes: pooled alignment is low, within-class alignment is 1
    signs = np.where(np.arange(25) % 2 == 0, 1.0, -1.0)[:, None]
    flipped = shifts.numpy() * signs
    assert mean_pairwise_cosine(flipped) < 0.0
    assert mean_pairwise_cosine(flipped, groups=(signs[:, 0] > 0).astype(int)) == pytest.approx(1.0, abs=1e-12)


def _cosine_loop(s, groups):
    total, pairs = 0.0, 0
    for i in range(len(s)):
        for j in range(len(s)):
            if i != j and groups[i] == groups[j] and np.linalg.norm(s[i]) > 0 and np.linalg.norm(s[j]) > 0:
                total += s[i] @ s[j] / (np.linalg.norm(s[i]) * np.linalg.norm(s[j]))
                pairs += 1
    return total / pairs


@pytest.mark.parametrize(("n", "d"), [(3, 1), (9, 1), (17, 5)])
def test_mean_pairwise_cosine_matches_a_double_loop(n, d):
    rng = np.random.default_rng(d)
    s = rng.normal(size=(n, d))
    s[0] = 0.0  # a zero shift has no direction and is left out
    groups = rng.integers(0, 2, size=n)
    groups[:3] = [0, 1, 1]
    assert mean_pairwise_cosine(s) == pytest.approx(_cosine_loop(s, np.zeros(n)), abs=1e-12)
    assert mean_pairwise_cosine(s, groups) == pytest.approx(_cosine_loop(s, groups), abs=1e-12)
    assert np.isnan(mean_pairwise_cosine(rng.normal(size=(1, d))))
    with pytest.raises(ValueError, match="groups"):
        mean_pairwise_cosine(s, groups[:-1])


def test_weighted_pairwise_cosine_is_the_cosine_of_the_resample_without_self_pairs():
    rng = np.random.default_rng(5)
    s, groups = rng.normal(size=(11, 4)), rng.integers(0, 3, 11)
    s[3] = 0.0
    weights = bootstrap_weights(rng, 11, 6)
    weights[0] = 1.0  # the sample itself
    weights[1] = 0.0
    weights[1, [0, 0, 0]] = 3.0  # one row drawn three times: no pair of distinct rows
    out = weighted_pairwise_cosine(s, groups, weights)
    assert out[0] == pytest.approx(mean_pairwise_cosine(s, groups), abs=1e-12) and np.isnan(out[1])
    for b in range(2, 6):  # expand the resample and drop pairs of two draws of the same row
        rows = np.repeat(np.arange(11), weights[b].astype(int))
        total = pairs = 0.0
        for i in range(len(rows)):
            for j in range(len(rows)):
                a, c = rows[i], rows[j]
                if a != c and groups[a] == groups[c] and a != 3 and c != 3:
                    total += s[a] @ s[c] / (np.linalg.norm(s[a]) * np.linalg.norm(s[c]))
                    pairs += 1
        assert out[b] == pytest.approx(total / pairs, abs=1e-12)
    with pytest.raises(ValueError, match="weights"):
        weighted_pairwise_cosine(s, groups, np.ones(11))


@pytest.mark.parametrize("d", [1, 6])
def test_tied_gaussian_distance_matches_scipy_and_outliers_score_higher(d):
    rng = np.random.default_rng(d)
    labels = np.repeat([0, 1, 2], 40)
    feats = rng.normal(size=(120, d)) + labels[:, None] * 3.0
    model = TiedGaussian(reg=1e-3).fit(feats, labels)
    centred = feats - model.means[labels]
    cov = centred.T @ centred / len(feats)
    precision = np.linalg.inv(cov + 1e-3 * np.trace(cov) / d * np.eye(d))
    np.testing.assert_allclose(model.precision, precision, rtol=1e-10)
    query = rng.normal(size=(5, d))
    expected = [min(scipy_mahalanobis(q, mu, precision) ** 2 for mu in model.means) for q in query]
    np.testing.assert_allclose(model.min_distance(query), expected, rtol=1e-6)
    assert model.min_distance(feats + 50.0).mean() > 10 * model.min_distance(feats).mean()
    with pytest.raises(ValueError, match="columns"):
        model.min_distance(np.ones((2, d + 1)))
    with pytest.raises(ValueError, match="not fitted"):
        TiedGaussian().min_distance(query)


# ---------------------------------------------------------------------------------------------------------------
# Kappa over resamples and the paired t-test


@pytest.mark.parametrize("resampling", ["folds", "bootstrap"])
def test_resampled_kappas_match_sklearn_on_the_same_indices(resampling):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 60)
    a = np.clip(y + rng.integers(-1, 2, 60), 0, 4)
    b = rng.integers(0, 5, 60)
    out = resample_kappas(y, {"a": a, "b": b}, resampling, n=6, seed=3, num_classes=5)
    gen = np.random.default_rng(3)
    if resampling == "folds":
        sets = np.array_split(gen.permutation(60), 6)
    else:
        sets = [gen.integers(0, 60, 60) for _ in range(6)]
    for name, pred in (("a", a), ("b", b)):
        expected = [cohen_kappa_score(y[i], pred[i], weights="quadratic", labels=np.arange(5)) for i in sets]
        np.testing.assert_allclose(out[name], expected, rtol=1e-12)
    assert out["a"].mean() > out["b"].mean()
    with pytest.raises(ValueError, match="resampling"):
        resample_kappas(y, {"a": a}, "jackknife")
    with pytest.raises(ValueError, match="n must be"):
        resample_kappas(y, {"a": a}, "folds", n=61)
    with pytest.raises(ValueError, match="preds"):
        resample_kappas(y, {"a": a[:-1]})


def test_paired_ttest_matches_scipy_and_drops_nan_pairs():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=12), rng.normal(size=12) + 0.8
    out = paired_ttest(a, b)
    ref = ttest_rel(a, b)
    assert out["t"] == pytest.approx(ref.statistic, rel=1e-12) and out["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert out["significant"] == (ref.pvalue < 0.05) and out["mean_diff"] == pytest.approx(np.mean(a - b))
    a_nan = np.r_[a, np.nan]
    assert paired_ttest(a_nan, np.r_[b, 0.0])["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    with pytest.raises(ValueError, match="same length"):
        paired_ttest(a, b[:-1])
    with pytest.raises(ValueError, match="at least 2"):
        paired_ttest([1.0], [2.0])


@pytest.mark.parametrize(
    ("shift", "sd", "n", "margin"),
    [
        (0.0, 0.01, 10, 0.02),
        (0.03, 0.01, 10, 0.02),
        (-0.05, 0.01, 7, 0.02),
        (0.005, 0.05, 3, 0.02),
        (0.1, 1.0, 40, 0.5),
    ],
)
def test_tost_paired_matches_statsmodels(shift, sd, n, margin):
    rng = np.random.default_rng(n)
    b = rng.normal(0.8, 0.05, n)
    a = b + shift + rng.normal(0, sd, n)
    out = tost_paired(a, b, margin)
    p, lower, upper = ttost_paired(a, b, -margin, margin)
    assert out["p"] == pytest.approx(p, rel=1e-10)
    assert out["p_lower"] == pytest.approx(lower[1], rel=1e-10) and out["p_upper"] == pytest.approx(upper[1], rel=1e-10)
    low, high = DescrStatsW(a - b).tconfint_mean(alpha=0.10)  # TOST at 0.05 <=> the 90% interval inside the margin
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((low, high), rel=1e-10)
    assert out["decision"] == ("equivalent" if p < 0.05 else out["decision"])
    assert (out["decision"] == "equivalent") == (-margin < low and high < margin)
    assert (out["decision"] == "lower") == (high < -margin) and (out["decision"] == "higher") == (low > margin)


def test_tost_known_cases_and_bad_input():
    b = np.linspace(0.7, 0.9, 12)
    assert tost_paired(b + 0.001 * np.sin(np.arange(12)), b, 0.02)["decision"] == "equivalent"
    assert tost_paired(b - 0.1 + 0.001 * np.sin(np.arange(12)), b, 0.02)["decision"] == "lower"
    assert tost_paired(b + 0.1 * np.sin(np.arange(12)), b, 0.02)["decision"] == "inconclusive"  # too noisy
    with pytest.raises(ValueError, match="margin"):
        tost_paired(b, b, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        tost_paired([1.0, np.nan], [1.0, 2.0], 0.1)


@pytest.mark.parametrize("n", [2, 5, 17])
def test_mean_ci_is_the_student_t_interval(n):
    x = np.random.default_rng(n).normal(3.0, 2.0, n)
    out = mean_ci(np.r_[x, np.nan])  # NaN (a condition without a value) is left out
    low, high = student_t.interval(0.95, n - 1, loc=x.mean(), scale=x.std(ddof=1) / np.sqrt(n))
    assert (out["mean"], out["low"], out["high"], out["n"]) == pytest.approx((x.mean(), low, high, n), rel=1e-12)
    assert (out["low"], out["high"]) == pytest.approx(DescrStatsW(x).tconfint_mean(alpha=0.05), rel=1e-12)
    one = mean_ci([0.4])
    assert one["mean"] == 0.4 and np.isnan(one["low"]) and np.isnan(one["high"])


# ---------------------------------------------------------------------------------------------------------------
# UAP fine-tuning and the ensemble


def _tiny_model(classes=3, size=16, arch="resnet18", **options):
    torch.manual_seed(0)
    defaults = (
        {"width": 0.0625, "small_stem": True} if arch == "resnet18" else {"width": 0.0625, "pool_size": 1, "hidden": 8}
    )
    return build_model(arch, classes, **{**defaults, **options}).eval()


def test_uap_finetune_changes_the_weights_of_a_copy_only():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 3, 16, 16, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    tuned, history = uap_finetune(
        model,
        (x, y),
        ["sgd", "data_free"],
        "8/255",
        epochs=2,
        regenerate_every=1,
        batch_size=8,
        fit=8,
        lr=1e-2,
        uap_options={"sgd": {"epochs": 1}, "data_free": {"steps": 2}},
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    changed = [k for k, v in tuned.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "net.conv1.weight" in changed and "net.fc.weight" in changed
    assert [h["epoch"] for h in history] == [1, 2] and all(
        set(h["fooling_rate"]) == {"sgd", "data_free"} for h in history
    )
    assert all(np.isfinite(h["loss"]) for h in history) and not tuned.training
    with pytest.raises(ValueError, match="methods"):
        uap_finetune(model, (x, y), ["fgsm"], "8/255")
    with pytest.raises(ValueError, match="mix"):
        uap_finetune(model, (x, y), ["sgd"], "8/255", mix=1.5)


def test_craft_uap_data_free_on_vgg_uses_its_activations_and_respects_eps():
    model = _tiny_model(arch="vgg16_bn", size=32)
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 3, (6,))
    result = craft_uap(model, "data_free", (x, y), "4/255", options={"steps": 2})
    assert result.perturbation.shape == (3, 32, 32) and float(result.perturbation.abs().max()) <= 4 / 255
    with pytest.raises(ValueError, match="target"):
        craft_uap(model, "targeted", (x, y), "4/255")
    with pytest.raises(ValueError, match="method"):
        craft_uap(model, "pgd", (x, y), "4/255")


def test_ensemble_is_the_mean_softmax():
    a, b = _tiny_model(), _tiny_model(width=0.125)
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        expected = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
        torch.testing.assert_close(torch.exp(Ensemble([a, b])(x)), expected)
    with pytest.raises(ValueError, match="members"):
        Ensemble([])


# ---------------------------------------------------------------------------------------------------------------
# The studies end to end (tiny settings)


def test_craft_uap_depends_on_its_seed():
    model = _tiny_model()
    x, y = torch.rand(10, 3, 16, 16), torch.randint(0, 3, (10,))
    for kind, options in (
        ("deepfool", {"max_passes": 1}),
        ("sgd", {"epochs": 1, "batch_size": 3}),
        ("data_free", {"steps": 3}),
    ):
        a, b, c = (craft_uap(model, kind, (x, y), "8/255", options=options, seed=s).perturbation for s in (0, 0, 1))
        assert torch.equal(a, b) and not torch.equal(a, c), kind


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown stress config key 'epoch'"):
        merge({"epochs": 1}, {"epoch": 2}, name="stress config")
    with pytest.raises(ValueError, match="unknown stress config key 'model.widht'"):
        run_stress_study({"model": {"widht": 0.5}}, tmp_path)
    with pytest.raises(ValueError, match="group"):
        run_stress_study({"datasets": [{"name": "natural", "group": "photo"}]}, tmp_path)
    with pytest.raises(ValueError, match="methods"):
        run_uap_study({"methods": ["fgsm"]}, tmp_path)


def test_uap_finetune_is_deterministic_for_a_seed_with_dropout():
    model = _tiny_model(dropout=0.5)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(12, 3, 16, 16, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    options = {"sgd": {"epochs": 1}}
    runs = [
        uap_finetune(model, (x, y), ["sgd"], "4/255", epochs=1, batch_size=6, fit=6, seed=5, uap_options=options)
        for _ in range(2)
    ]
    for key, value in runs[0][0].state_dict().items():
        torch.testing.assert_close(value, runs[1][0].state_dict()[key], rtol=0, atol=0)


def test_trained_model_does_not_depend_on_the_global_generator(tmp_path):
    spec = {"name": "fundus-synth", "task": "binary", "n": 80, "image_size": 16}
    cfg = {"arch": "resnet18", "width": 0.0625, "small_stem": True, "epochs": 1, "batch_size": 32}
    models = []
    for i in range(2):
        ctx = RunContext(Artifacts(tmp_path / str(i)), progress=False)
        splits = ctx.splits(spec, {"val": 0.15, "test": 0.15}, 0)
        torch.manual_seed(100 + i)  # whatever ran before must not change the weights
        models.append(load_model(ctx.artifacts.path(ctx.trained(splits, cfg, seed=0))))
    for key, value in models[0].state_dict().items():
        torch.testing.assert_close(value, models[1].state_dict()[key], rtol=0, atol=0)
