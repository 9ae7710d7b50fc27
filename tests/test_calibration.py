"""Choosing the HFC weight: bisection over the grid, on validation images disjoint from the attacked test pool;
and the reference's nearest-component term, normalised per layer, against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.attacks import HFC
from engine.mixture import GaussianMixture
from engine.models import build_model
from engine.runs import Artifacts, RunContext
from engine.runs.config import DEFAULTS, QUICK
from engine.runs.stages.calibrate import (
    MIN_CALIBRATION_IMAGES,
    CalibrateInputs,
    bisection_trials,
    calibration_images,
    calibration_limit,
    largest_passing,
)
from engine.runs.stages.model import OnModel

GRID = [1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001]


@pytest.mark.parametrize("threshold", [5.0, 1.0, 0.3, 0.05, 0.002, 0.0005])
def test_bisection_finds_the_largest_passing_weight(threshold):
    calls = []

    def rate(lam):  # success falls as the weight grows: 1 up to the threshold, 0.5 above it
        return 1.0 if lam <= threshold else 0.5

    def success(lam):
        calls.append(lam)
        return rate(lam)

    lam, trials = largest_passing(GRID, success, target=0.9)
    passing = [w for w in GRID if w <= threshold]
    assert lam == (max(passing) if passing else min(GRID))
    assert len(calls) <= bisection_trials(GRID) and trials == {w: rate(w) for w in calls}


@pytest.mark.parametrize("size", range(1, 10))
def test_bisection_trials_bound_every_threshold(size):
    grid = [2.0**-i for i in range(size)]

    def trials(threshold: float) -> int:
        _, tried = largest_passing(grid, lambda lam: float(lam <= threshold), target=0.9)
        return len(tried)

    # every outcome: the largest passing weight is each weight of the grid, or none passes
    assert max(trials(t) for t in [*grid, 0.0]) == bisection_trials(grid)


def calibrate_inputs(**calibration):
    settings = {**DEFAULTS["hfc"]["calibration"], **calibration}
    return CalibrateInputs(dataset={}, split={}, seed=0, dataset_label="d", model_label="m", model_cell="",
                           attack="pgd", eps="8/256", label="x", pool=None, steps=10, travel=2.0, targeted=True,
                           batch_size=8, options={}, **settings)  # fmt: skip


def test_calibration_images_are_proportional_to_the_pool():
    default = calibrate_inputs()
    assert calibration_limit(default, DEFAULTS["attack"]["pool"]) == 100  # the default audit keeps its 100
    assert calibration_limit(default, QUICK["attack"]["pool"]) == 80  # 2 x 160 / 4 trials
    assert calibration_limit(default, 28) == 14
    assert calibration_limit(calibrate_inputs(max_cost=1.0), 28) == MIN_CALIBRATION_IMAGES  # 7 is below the floor
    for pool in range(1, 400, 7):
        for max_cost in (0.5, 1.0, 3.0):
            inputs = calibrate_inputs(max_cost=max_cost)
            limit = calibration_limit(inputs, pool)
            assert MIN_CALIBRATION_IMAGES <= limit <= 100 or limit == 100
            if limit > MIN_CALIBRATION_IMAGES:  # the trials together cost at most max_cost attacks on the pool
                assert limit * bisection_trials(inputs.grid) <= max_cost * pool


def test_calibration_images_come_from_the_validation_split_never_the_pool(tmp_path):
    spec, split = {"name": "fundus-synth", "task": "binary", "n": 200, "image_size": 16}, {"val": 0.2, "test": 0.2}
    ctx = RunContext(Artifacts(tmp_path), progress=False)
    torch.manual_seed(0)
    model = build_model("resnet18", 2, width=0.0625, small_stem=True).eval()
    inputs = OnModel(dataset=spec, split=split, seed=0, dataset_label="fundus", model_label="m", model_cell="")
    x_cal, _ = calibration_images(ctx, inputs, model, 30)
    pool, _ = ctx.pool(spec, split, 0, None)
    val = torch.stack([im for im, _ in ctx.splits(spec, split, 0).val])
    flat = x_cal.flatten(1)
    assert 0 < len(x_cal) <= 30
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.cdist(flat, val.flatten(1), compute_mode=exact).min(1).values.max() == 0  # all validation images
    assert torch.cdist(flat, pool.flatten(1), compute_mode=exact).min() > 0  # none in the attacked pool


def test_nearest_term_is_normalised_per_layer_by_hand():
    rng = np.random.default_rng(0)
    gmms, feats = {}, {}
    for name, d in (("narrow", 3), ("wide", 7)):
        k = 2
        means = rng.normal(size=(k, d))
        factors = np.stack([np.triu(rng.normal(size=(d, d))) * 0.3 + np.eye(d) for _ in range(k)])
        gmms[name] = [GaussianMixture(means, factors, [0.4, 0.6])]
        feats[name] = torch.from_numpy(rng.normal(size=(5, d)))
    loss = HFC(gmms, lam=1.0, mode="nearest").loss(feats, torch.zeros(5, dtype=torch.long)).numpy()
    expected = np.zeros(5)
    for name, (gm,) in gmms.items():
        h = feats[name].numpy()
        d = h.shape[1]
        for i in range(5):  # the most likely component (log weight + log det - distance / 2), then its distance / d
            z = [(h[i] - gm.means[c]) @ gm.precisions_cholesky[c] for c in range(2)]
            score = [np.log(gm.weights[c]) + np.log(np.diag(gm.precisions_cholesky[c])).sum() - 0.5 * z[c] @ z[c]
                     for c in range(2)]  # fmt: skip
            best = int(np.argmax(score))
            expected[i] += z[best] @ z[best] / d
    np.testing.assert_allclose(loss, expected, rtol=1e-6)

