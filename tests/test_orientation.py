"""A single-score detector is oriented by its fit-split rank AUROC, not by a logistic regression's mean fit; the
sign survives save/load (older saves keep their LR); the protocol reports the other orientation's AUROC."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from engine.detectors import DETECTORS, Detector, Features, LayerCombiner, run_protocol
from engine.metrics import auroc
from engine.metrics.paired import image_bootstrap


def heavy_tailed(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(clean, AE) scores: most AEs score *lower* than clean images, a tenth of them enormously higher, so the AE
    mean is the higher one while their ranks are mostly the lower ones."""
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=n)
    adversarial = np.where(rng.random(n) < 0.1, 40.0 + rng.normal(size=n), rng.normal(-0.8, 1.0, n))
    return clean, adversarial


class OneColumn(Detector):
    """A single-score detector whose raw score is pooled feature ``s`` itself."""

    name = "one-column"

    def _resolve_layers(self, feats: Features) -> list[str]:
        return ["s"]

    def _fit(self, clean, adversarial, noise, train):
        return self._fit_scores(clean, adversarial, noise)

    def _layer_scores(self, x: Features) -> np.ndarray:
        return x.layer("s").astype(np.float64)

    def _state(self):
        return {}

    def _set_state(self, arrays):
        pass


def features(scores: np.ndarray) -> Features:
    return Features(np.zeros((len(scores), 2)), {"s": scores[:, None]}, labels=np.zeros(len(scores), int))


def test_rank_orientation_where_the_mean_points_the_other_way() -> None:
    clean, adversarial = heavy_tailed(400, 0)
    test_clean, test_adv = heavy_tailed(400, 1)
    scores, labels = np.r_[clean, adversarial][:, None], np.r_[np.zeros(400), np.ones(400)]
    # the logistic regression the multi-column combiner uses orients this column by the mean: the wrong way
    z = (scores - scores.mean()) / scores.std()
    lr = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced").fit(z, labels)
    assert lr.coef_[0, 0] > 0
    lr_auc = auroc(*(lr.decision_function((s[:, None] - scores.mean()) / scores.std()) for s in (test_clean, test_adv)))
    assert lr_auc < 0.4
    combiner = LayerCombiner().fit(scores, labels)
    assert combiner.sign == -1.0 and combiner.coef is None
    assert auroc(clean, adversarial) < 0.5  # the fit-split rank AUROC that chose the sign
    rank_auc = auroc(combiner(test_clean[:, None]), combiner(test_adv[:, None]))
    assert rank_auc == pytest.approx(1 - lr_auc) and rank_auc > 0.6
    np.testing.assert_allclose(combiner(test_adv[:, None]), -(test_adv - scores.mean()) / scores.std())
    # ties at 0.5 keep the score's own direction; several columns keep the logistic regression
    assert LayerCombiner().fit(np.ones((4, 1)), np.r_[0, 0, 1, 1]).sign == 1.0
    two = LayerCombiner().fit(np.c_[scores, np.random.default_rng(2).normal(size=800)], labels)
    assert two.sign is None and two.coef.shape == (2,)
    with pytest.raises(ValueError, match="scores must be"):
        LayerCombiner().fit(scores[:, 0], labels)


def test_single_column_detector_sign_round_trips_and_old_saves_load(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(DETECTORS, OneColumn.name, OneColumn)  # registered for this test: Detector.load finds it
    clean, adversarial = heavy_tailed(300, 3)
    det = OneColumn().fit(None, features(clean), features(adversarial))
    test_clean, test_adv = heavy_tailed(300, 4)
    assert det.combiner_.sign == -1.0
    assert auroc(det.score(features(test_clean)), det.score(features(test_adv))) > 0.6
    path = det.save(tmp_path / "det")
    with np.load(path / "arrays.npz", allow_pickle=False) as data:
        assert float(data["combiner/sign"]) == -1.0 and "combiner/coef" not in data.files
    loaded = Detector.load(path)
    assert loaded.combiner_.sign == -1.0
    np.testing.assert_array_equal(loaded.score(features(test_adv)), det.score(features(test_adv)))
    # a detector saved before rank orientation stored the LR's coef and intercept: it loads and scores with them
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((path / "config.json").read_text())
    mean, scale = det.combiner_.mean, det.combiner_.scale
    lr = {"coef": np.array([0.5]), "intercept": np.array(0.25), "mean": mean, "scale": scale}
    np.savez(old / "arrays.npz", **{f"combiner/{k}": v for k, v in lr.items()})
    legacy = Detector.load(old)
    assert legacy.combiner_.sign is None
    np.testing.assert_allclose(legacy.score(features(test_adv)), 0.5 * (test_adv - mean[0]) / scale[0] + 0.25)
    assert json.loads((path / "config.json").read_text())["detector"] == "OneColumn"


def test_protocol_reports_the_reversed_auroc() -> None:
    n = 200
    clean, adversarial = heavy_tailed(n, 5)
    rng = np.random.default_rng(6)
    noise = clean + 0.05 * rng.normal(size=n)
    transfer = adversarial + rng.normal(size=n)
    success = rng.random(n) < 0.8
    result = run_protocol(
        [OneColumn()],
        features(clean),
        features(adversarial),
        success,
        noise=features(noise),
        transfer={"other": (features(transfer), success)},
        n_boot=200,
        seed=2,
    )
    rows = {(r["attack"], r["subset"], r["metric"]): r for r in result.to_rows()}
    scores = result.scores["one-column"]
    positives = {}
    for name in ("attack", "other"):
        for subset in ("successful", "failed", "all"):
            keep = {"successful": scores.success[name], "failed": ~scores.success[name]}.get(subset)
            values = scores.adversarial[name]
            positives[(name, subset)] = values if keep is None else np.where(keep, values, np.nan)
    # the AUROC of the negated scores, bootstrapped on the same resampled images
    negated = image_bootstrap(
        -scores.negatives,
        {k: -v for k, v in positives.items()},
        [(("attack", "successful"), ("other", "successful"))],
        n_boot=200,
        seed=2,
    )
    for (name, subset), metrics in negated.sets.items():
        row = rows[(name, subset, "auroc_reversed")]
        assert row["value"] == pytest.approx(1 - rows[(name, subset, "auroc")]["value"], abs=1e-12)
        np.testing.assert_allclose([row["value"], row["ci_low"], row["ci_high"]], metrics["auroc"], atol=1e-12)
        assert row["n_pos"] == rows[(name, subset, "auroc")]["n_pos"]
    sides = negated.paired[(("attack", "successful"), ("other", "successful"))]
    for side, attack, subset in ((("attack", "successful"), "attack", "paired"), ("change", "other", "change")):
        row = rows[(attack, subset, "auroc_reversed")]
        np.testing.assert_allclose([row["value"], row["ci_low"], row["ci_high"]], sides[side]["auroc"], atol=1e-12)
    assert result.value("one-column", "auroc") > 0.5  # rank-oriented on the fit split
