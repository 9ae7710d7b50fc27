"""HFC mode "typical": loss and feature gradient against float64 torch.distributions, its reference statistics,
argument checks, and an attack using it on a tiny model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from support import TOL, device_for, random_mixture, samples
from test_attacks import check_linf, make_data, one_thread, train_tiny  # noqa: F401  (one_thread: autouse fixture)
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from engine.attacks import HFC, HFC_MODES, PGD, fit_hfc_gmms, typical_reference
from engine.attacks.hfc import extract_features
from engine.metrics.significance import MAD_TO_SD

LAYERS = ["relu1", "relu2"]


def torch_log_prob(gm, h: torch.Tensor) -> torch.Tensor:
    """log p(h) under ``gm`` by torch.distributions, in float64 (autograd to h)."""
    means, chol, weights = (torch.tensor(a) for a in (gm.means, gm.precisions_cholesky, gm.weights))
    components = MultivariateNormal(means, precision_matrix=chol @ chol.transpose(1, 2))
    return MixtureSameFamily(Categorical(probs=weights), components).log_prob(h)


def class_log_prob(per_class, h: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch_log_prob(per_class[int(c)], row[None])[0] for row, c in zip(h, classes, strict=True)])


def mixtures(rng: np.random.Generator, k: int, dims: dict[str, int], num_classes: int = 2):
    return {name: [random_mixture(rng, k, d, offset=c) for c in range(num_classes)] for name, d in dims.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("d", [1, 5])
def test_loss_and_gradient_match_torch_distributions(backend, dtype, k, d) -> None:
    rng = np.random.default_rng(100 * k + d)
    dims = {"a": d, "b": 3}
    gmms = mixtures(rng, k, dims)
    n = 7
    classes = torch.as_tensor(rng.integers(2, size=n))
    feats64 = {name: torch.tensor(samples(rng, gmms[name][0], n, scale=1.5)) for name in dims}
    typical = {name: (rng.normal(-8.0, 3.0, size=2), rng.uniform(0.5, 2.0, size=2)) for name in dims}
    weights, lam = [0.7, 1.3], 0.5

    leaves64 = {name: f.clone().requires_grad_(True) for name, f in feats64.items()}
    expected = torch.zeros(n, dtype=torch.float64)
    for (name, h), w in zip(leaves64.items(), weights, strict=True):
        median, scale = (torch.tensor(a)[classes] for a in typical[name])
        distance = (class_log_prob(gmms[name], h, classes) - median).abs() / scale
        assert float(distance.detach().min()) > 1e-2  # away from the kink, so float32 keeps every sign
        expected = expected + lam * w * distance
    expected_grads = torch.autograd.grad(expected.sum(), list(leaves64.values()))

    hfc = HFC(gmms, lam=lam, mode="typical", weights=weights, typical=typical, backend=backend)
    device = device_for(backend)
    leaves = {name: f.to(device=device, dtype=dtype).requires_grad_(True) for name, f in feats64.items()}
    got = hfc.loss(leaves, classes.to(device))
    grads = torch.autograd.grad(got.sum(), list(leaves.values()))
    assert got.dtype == dtype and got.shape == (n,)
    tol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), expected, rtol=tol.value, atol=tol.value)
    for g, ref in zip(grads, expected_grads, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double().cpu(), ref, rtol=tol.grad, atol=tol.grad * float(ref.abs().max()))


def test_typical_reference_is_median_and_scaled_mad(caplog) -> None:
    rng = np.random.default_rng(3)
    dims = {"a": 4, "b": 1}
    gmms = mixtures(rng, 2, dims, num_classes=3)
    labels = np.array([0] * 9 + [1] * 6 + [2] * 3)  # class 2 is below min_images=5
    feats = {name: samples(rng, gmms[name][0], len(labels), scale=1.2) for name in dims}
    with caplog.at_level(logging.WARNING, logger="engine.attacks"):
        ref = typical_reference(gmms, feats, torch.as_tensor(labels))
    assert "classes [2]" in caplog.text
    assert list(ref) == list(dims)
    for name in dims:
        log_p = class_log_prob(gmms[name], torch.tensor(feats[name]), torch.as_tensor(labels)).numpy()
        for c, rows in [(0, labels == 0), (1, labels == 1), (2, np.ones(len(labels), dtype=bool))]:
            median = np.median(log_p[rows])
            np.testing.assert_allclose(ref[name][0][c], median, rtol=1e-10)
            np.testing.assert_allclose(ref[name][1][c], MAD_TO_SD * np.median(np.abs(log_p[rows] - median)), rtol=1e-9)


def test_bad_arguments() -> None:
    rng = np.random.default_rng(5)
    gmms = mixtures(rng, 2, {"a": 3, "b": 2})
    typical = {name: (np.zeros(2), np.ones(2)) for name in gmms}
    assert "typical" in HFC_MODES
    with pytest.raises(TypeError, match="typical_reference"):
        HFC(gmms, mode="typical")
    with pytest.raises(ValueError, match="only used by mode='typical'"):
        HFC(gmms, mode="loglik", typical=typical)
    with pytest.raises(ValueError, match="no entry for the constrained layer 'b'"):
        HFC(gmms, mode="typical", typical={"a": typical["a"]})
    HFC(gmms, layers=["a"], mode="typical", typical={"a": typical["a"]})  # only the constrained layers are needed
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        HFC(gmms, mode="typical", typical={**typical, "a": (np.zeros(3), np.ones(3))})
    with pytest.raises(ValueError, match="scales > 0"):
        HFC(gmms, mode="typical", typical={**typical, "a": (np.zeros(2), np.array([1.0, 0.0]))})
    with pytest.raises(TypeError, match="pair"):
        HFC(gmms, mode="typical", typical={**typical, "a": 3.0})
    with pytest.raises(ValueError, match="weights"):
        HFC(gmms, mode="typical", typical=typical, weights=[1.0])
    feats = {name: samples(rng, gmms[name][0], 10) for name in gmms}
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match="min_images"):
        typical_reference(gmms, feats, labels, min_images=1)
    with pytest.raises(ValueError, match="at least 5"):
        typical_reference(gmms, {k: v[:4] for k, v in feats.items()}, labels[:4])
    with pytest.raises(ValueError, match="labels must be in"):
        typical_reference(gmms, feats, labels + 1)
    with pytest.raises(ValueError, match="no entry for the mixture layer 'b'"):
        typical_reference(gmms, {"a": feats["a"]}, labels)
    with pytest.raises(ValueError, match="integer"):
        typical_reference(gmms, feats, labels.astype(float))


def test_typical_attack_runs_and_keeps_features_typical() -> None:
    """Same eps and steps: the typical-mode AEs sit closer to the target class's clean median than plain AEs."""
    model, _ = train_tiny(3)
    gmms = fit_hfc_gmms(model, make_data(3, 240, seed=0), LAYERS, n_components=2, seed=0, reg_covar=1e-4)
    feats, _, labels = extract_features(model, make_data(3, 60, seed=11), LAYERS)
    hfc = HFC(gmms, lam=1.0, mode="typical", typical=typical_reference(gmms, feats, labels))
    x, y = make_data(3, 24, seed=5)
    target = (y + 1) % 3
    plain = PGD(model, eps=0.15, steps=40, targeted=True)(x, target)
    typical = PGD(model, eps=0.15, steps=40, targeted=True, constraint=hfc)(x, target)
    check_linf(typical.adv, x, 0.15)
    assert typical.loss_history.shape == (40,) and torch.isfinite(typical.loss_history).all()
    distance = {}
    for name, res in [("plain", plain), ("typical", typical)]:
        adv_feats, _, _ = extract_features(model, (res.adv, target), LAYERS)
        distance[name] = float(hfc.loss(adv_feats, target).mean())
    print(f"mean typical distance: plain {distance['plain']:.2f}, typical {distance['typical']:.2f}")
    assert typical.success_rate >= 0.8
    assert distance["typical"] < 0.5 * distance["plain"]
