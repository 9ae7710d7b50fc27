"""The HFC reference settings: its mixture fit (BayesianGaussianMixture, n_init, max_iter, augmented training
features) and the classification losses of its two CW-Linf variants (docs/methods.md, HFC)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture, GaussianMixture
from test_attacks import make_data, one_thread, train_tiny  # noqa: F401  (one_thread: autouse fixture)

from engine.attacks import BIM, HFC, HFC_REFERENCE_AUGMENT, CWLinf, fit_hfc_gmms
from engine.attacks.base import logit_gap
from engine.attacks.hfc import extract_features
from engine.models import Augment

LAYERS = ["relu1", "relu2"]
IDENTITY = Augment(hflip=False, vflip=False, max_rotate_deg=0.0, max_shift=0.0, brightness=0.0, contrast=0.0)


@pytest.fixture(scope="module")
def tiny():
    model, _ = train_tiny(3)
    train = make_data(3, 120, seed=0)
    feats, _, labels = extract_features(model, train, LAYERS)
    return model, train, feats, labels


def same_fit(a, b) -> bool:
    return all(
        np.array_equal(x.means, y.means) and np.array_equal(x.precisions_cholesky, y.precisions_cholesky)
        for name in a
        for x, y in zip(a[name], b[name], strict=True)
    )


def assert_fit_matches(gmms, feats, labels, estimator) -> None:
    """Each (layer, class) mixture equals ``estimator()`` fitted on that class's rows of ``feats``."""
    for name in LAYERS:
        for c, gm in enumerate(gmms[name]):
            sk = estimator().fit(feats[name][labels == c].double().numpy())
            np.testing.assert_allclose(gm.means, sk.means_, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(gm.weights, sk.weights_ / sk.weights_.sum(), rtol=1e-10)


def test_reference_bayesian_fit_passes_n_init_and_max_iter(tiny) -> None:
    model, train, feats, labels = tiny
    gmms = fit_hfc_gmms(model, train, LAYERS, n_components=2, bayesian=True, seed=3, n_init=2, max_iter=1000)
    assert_fit_matches(
        gmms, feats, labels, lambda: BayesianGaussianMixture(n_components=2, n_init=2, max_iter=1000, random_state=3)
    )
    with pytest.warns(ConvergenceWarning):  # max_iter reaches sklearn
        fit_hfc_gmms(model, train, ["relu2"], n_components=2, bayesian=True, max_iter=1)


def test_augment_zero_is_the_fit_on_the_training_images(tiny) -> None:
    model, train, feats, labels = tiny
    gmms = fit_hfc_gmms(model, train, LAYERS, n_components=2, seed=1, reg_covar=1e-4, augment=0)
    assert same_fit(gmms, fit_hfc_gmms(model, train, LAYERS, n_components=2, seed=1, reg_covar=1e-4))
    assert_fit_matches(gmms, feats, labels, lambda: GaussianMixture(n_components=2, random_state=1, reg_covar=1e-4))


def test_augmented_fit_is_deterministic_per_seed(tiny) -> None:
    model, train, _, _ = tiny
    assert HFC_REFERENCE_AUGMENT.hflip and HFC_REFERENCE_AUGMENT.vflip and HFC_REFERENCE_AUGMENT.max_shift == 12 / 256

    def fit(**kwargs):
        return fit_hfc_gmms(model, train, LAYERS, n_components=2, reg_covar=1e-4, **kwargs)

    augmented = fit(seed=0, augment=1)
    assert same_fit(augmented, fit(seed=0, augment=1))
    assert not same_fit(augmented, fit(seed=1, augment=1))
    assert not same_fit(augmented, fit(seed=0))


def test_augment_fits_that_many_copies_of_every_image(tiny) -> None:
    """With an identity augmentation, augment=2 is the fit on the training features stacked twice."""
    model, train, feats, labels = tiny
    gmms = fit_hfc_gmms(model, train, LAYERS, n_components=2, seed=2, reg_covar=1e-4, augment=2, augmentation=IDENTITY)
    doubled = {name: torch.cat([f, f]) for name, f in feats.items()}
    assert_fit_matches(
        gmms, doubled, torch.cat([labels, labels]), lambda: GaussianMixture(2, random_state=2, reg_covar=1e-4)
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"augment": -1}, ValueError, "augment must be an int >= 0"),
        ({"augment": True}, ValueError, "augment must be an int >= 0"),
        ({"augment": 1.0}, ValueError, "augment must be an int >= 0"),
        ({"augment": 1, "augmentation": "flip"}, TypeError, "augmentation must be an engine.models.Augment"),
    ],
)
def test_bad_augment_arguments(tiny, kwargs, error, match) -> None:
    model, train, _, _ = tiny
    with pytest.raises(error, match=match):
        fit_hfc_gmms(model, train, LAYERS, **kwargs)


@pytest.fixture(scope="module")
def constrained(tiny):
    model, train, _, _ = tiny
    hfc = HFC(fit_hfc_gmms(model, train, LAYERS, n_components=1, reg_covar=1e-4), lam=0.5)
    x, y = make_data(3, 12, seed=9)
    return model, hfc, x, (y + 1) % 3


def test_journal_hfc_cw_as_run_is_hfc_bim(constrained) -> None:
    """The TMI code's HFC-CW falls back to cross-entropy: CWLinf(loss="ce") + HFC is HFC-BIM, whatever kappa."""
    model, hfc, x, target = constrained
    options = {"eps": "4/256", "steps": 8, "step_size": "1/256", "targeted": True, "constraint": hfc}
    cw = CWLinf(model, loss="ce", kappa=100.0, **options)(x, target)
    bim = BIM(model, **options)(x, target)
    assert torch.equal(cw.adv, bim.adv)


def test_miccai_hfc_cw_is_the_margin_with_confidence_10(constrained) -> None:
    model, hfc, x, target = constrained
    attack = CWLinf(model, eps="4/256", targeted=True, kappa=10.0, constraint=hfc)
    assert attack.loss_kind == "cw"
    got, _ = attack.objective(x, None, target)
    feats, logits, _ = extract_features(model, (x, target), LAYERS)
    expected = torch.clamp(logit_gap(logits, target) + 10.0, min=0.0) + hfc.loss(feats, target)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)
