"""The typicality detector against a direct sklearn/numpy computation: the predicted class's mixture
log-likelihood, robust z against correctly classified clean reference images of that class (all classes for a rare
one), two-sided; save/load; what it needs; its errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from engine.detectors import DETECTORS, Detector, Features, Typicality
from engine.metrics import auroc
from engine.mixture import GaussianMixture

DIMS = {"a": 24, "b": 3}
CLASSES = 3
MAD_TO_SD = 1.482602218505602


def centres(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: 4.0 * rng.normal(size=(CLASSES, d)) for name, d in DIMS.items()}


def draw(rng, mu, labels, preds=None, at_mode: bool = False) -> Features:
    """Features of images of ``labels`` (predicted ``preds``, default the labels): Gaussian around the class centre,
    or exactly at it (the densest point of the class) with ``at_mode``."""
    preds = labels if preds is None else preds
    pooled = {n: m[labels] + (0.0 if at_mode else rng.normal(size=(len(labels), m.shape[1]))) for n, m in mu.items()}
    return Features(4.0 * np.eye(CLASSES)[preds], pooled, labels=labels)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    mu = centres(rng)
    train = draw(rng, mu, np.repeat(np.arange(CLASSES), 400))
    sk = {name: [SkGaussianMixture(2, random_state=0).fit(train.pooled[name][train.labels == c])
                 for c in range(CLASSES)] for name in DIMS}  # fmt: skip
    mixtures = {name: [GaussianMixture.from_sklearn(g) for g in per_class] for name, per_class in sk.items()}
    # validation: class 2 has only 3 correctly classified images (and 4 misclassified ones, left out)
    labels = np.r_[np.repeat([0, 1], 60), np.full(7, 2)]
    preds = labels.copy()
    preds[[0, 1, 60]] = [1, 2, 0]
    preds[-4:] = 0
    reference = draw(rng, mu, labels, preds)
    clean_labels = rng.integers(0, CLASSES, 200)
    return {
        "mu": mu,
        "sk": sk,
        "mixtures": mixtures,
        "reference": reference,
        "clean": draw(rng, mu, clean_labels),
        "too_typical": draw(rng, mu, clean_labels[:100], at_mode=True),
        "test": draw(rng, mu, rng.integers(0, CLASSES, 50)),
    }


def expected_scores(case, x: Features) -> np.ndarray:
    """|ll - median| / (1.4826 MAD) per layer, straight from sklearn and numpy."""
    ref = case["reference"]
    correct = ref.preds == ref.labels
    out = np.empty((len(x), len(DIMS)))
    for j, name in enumerate(DIMS):
        gms = case["sk"][name]
        own = {c: gms[c].score_samples(ref.pooled[name][correct & (ref.labels == c)]) for c in range(CLASSES)}
        pooled = np.concatenate(list(own.values()))
        for i in range(len(x)):
            c = x.preds[i]
            values = own[c] if len(own[c]) >= 5 else pooled  # class 2: 3 reference images -> all classes
            median = np.median(values)
            scale = MAD_TO_SD * np.median(np.abs(values - median))
            ll = gms[c].score_samples(x.pooled[name][i : i + 1])[0]
            out[i, j] = abs(ll - median) / scale
    return out


def fitted(case) -> Typicality:
    det = Typicality().set_reference(case["mixtures"], case["reference"])
    return det.fit(None, case["clean"], case["too_typical"])


def test_scores_equal_sklearn_and_numpy_and_flag_the_too_typical(case, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.detectors"):
        det = fitted(case)
    assert "classes [2] have < 5" in caplog.text
    assert DETECTORS["typicality"] is Typicality and det.layers_ == ["a", "b"]
    assert det.needs().pooled == ("a", "b") and not det.needs().gradients and not det.needs().dropout
    for x in (case["test"], case["too_typical"]):
        np.testing.assert_allclose(det.layer_scores(x), expected_scores(case, x), rtol=1e-7)
    # a feature at its class's densest point is far MORE likely than clean images, and scores high for that
    clean, typical = det.layer_scores(case["clean"])[:, 0], det.layer_scores(case["too_typical"])[:, 0]
    assert np.quantile(typical, 0.1) > np.quantile(clean, 0.95)
    ll_mode = case["sk"]["a"][0].score_samples(case["mu"]["a"][:1])[0]
    ll_clean = case["sk"]["a"][0].score_samples(case["clean"].pooled["a"][case["clean"].preds == 0])
    assert ll_mode > ll_clean.max()  # the likelihood itself (KD's side) ranks it the most normal of all
    assert auroc(det.score(case["test"]), det.score(case["too_typical"])) > 0.95


def test_save_load_round_trip(case, tmp_path) -> None:
    det = fitted(case)
    path = det.save(tmp_path / "typicality")
    with np.load(path / "arrays.npz", allow_pickle=False) as data:
        assert data["state/median"].shape == data["state/scale"].shape == (2, CLASSES)
    loaded = Detector.load(path)
    assert type(loaded) is Typicality and loaded.get_params() == det.get_params()
    assert loaded.needs().pooled == ("a", "b")
    for x in (case["test"], case["too_typical"]):
        np.testing.assert_allclose(loaded.score(x), det.score(x), rtol=1e-12)
        np.testing.assert_allclose(loaded.layer_scores(x), det.layer_scores(x), rtol=1e-12)


def test_layers_and_errors(case) -> None:
    with pytest.raises(ValueError, match=r"set_reference\(mixtures, reference\) before fit"):
        Typicality().fit(None, case["clean"], case["too_typical"])
    one = Typicality(layers="b").set_reference(case["mixtures"], case["reference"])
    one.fit(None, case["clean"], case["too_typical"])
    np.testing.assert_allclose(one.layer_scores(case["test"])[:, 0], expected_scores(case, case["test"])[:, 1])
    with pytest.raises(ValueError, match=r"layers \['c'\] have no mixture"):
        only_a = {"a": case["mixtures"]["a"]}
        extra = Features(case["clean"].logits, {**case["clean"].pooled, "c": case["clean"].pooled["b"]})
        Typicality(layers=["a", "c"]).set_reference(only_a, case["reference"]).fit(None, extra, extra)
    with pytest.raises(ValueError, match="one mixture per class"):
        Typicality().set_reference({"a": case["mixtures"]["a"], "b": case["mixtures"]["b"][:2]}, case["reference"])
    with pytest.raises(TypeError, match=r"mixtures\['a'\]\[0\] must be an engine.GaussianMixture"):
        Typicality().set_reference({"a": [case["sk"]["a"][0]]}, case["reference"])
    with pytest.raises(TypeError, match="reference must be"):
        Typicality().set_reference(case["mixtures"], case["reference"].pooled)
    with pytest.raises(ValueError, match="min_reference"):
        Typicality(min_reference=1)
    det = fitted(case)
    four = Features(np.eye(4)[[3, 0]], {n: v[:2] for n, v in case["test"].pooled.items()})
    with pytest.raises(ValueError, match="predicted class 3 has no mixture"):
        det.score(four)
