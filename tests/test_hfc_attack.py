"""The HFC add-on: gradient against fp64 reference formulas, per-class mixtures, storage, and its effect."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_attacks import make_data, one_thread, train_tiny  # noqa: F401  (one_thread: autouse fixture)

from engine import reference
from engine.attacks import BIM, HFC, PGD, CWLinf, fit_class_mixtures, fit_hfc_gmms, load_hfc_gmms, save_hfc_gmms
from engine.attacks.hfc import extract_features
from engine.errors import UserError

LAYERS = ["relu1", "relu2"]


@pytest.fixture(scope="module")
def fitted():
    model, _ = train_tiny(3)
    train = make_data(3, 240, seed=0)
    gmms = fit_hfc_gmms(model, train, LAYERS, n_components=2, seed=0, reg_covar=1e-4)
    x, y = make_data(3, 24, seed=5)
    return model, gmms, x, y


def reference_feature_grad(h: torch.Tensor, gm, mode: str) -> torch.Tensor:
    """d term / d h for one layer from engine.reference (fp64)."""
    means, chol, weights = (torch.tensor(a) for a in (gm.means, gm.precisions_cholesky, gm.weights))
    if mode == "loglik":
        return -reference.gmm_log_prob_grad(h, means, chol, weights)[1]
    _, comp = reference.gmm_nearest(h, means, chol, weights)
    diff = h.double() - means[comp]
    y = torch.einsum("nd,nde->ne", diff, chol[comp])
    return 2 * torch.einsum("ne,nde->nd", y, chol[comp]) / h.shape[1]


@pytest.mark.parametrize("mode", ["nearest", "loglik"])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_hfc_gradient_matches_reference(fitted, mode, loss) -> None:
    model, gmms, x, y = fitted
    model64 = copy.deepcopy(model).double()
    x64 = x.double()
    target = (y + 1) % 3
    lam = 0.7
    hfc = HFC(gmms, lam=lam, mode=mode)
    attack = BIM(model64, eps=0.1, steps=1, targeted=True, loss=loss, kappa=2.0, constraint=hfc)
    grad, _ = attack.input_grad(x64, None, target)

    # reference: CE/CW through the model by autograd, plus the GMM terms' fp64 feature gradients chained through
    feats = {}
    hooks = [getattr(model64, n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o)) for n in LAYERS]
    xr = x64.clone().requires_grad_(True)
    logits = model64(xr)
    for h in hooks:
        h.remove()
    if loss == "ce":
        objective = F.cross_entropy(logits, target, reduction="sum")
    else:
        own = logits.gather(1, target[:, None])[:, 0]
        other = logits.masked_fill(F.one_hot(target, 3).bool(), -torch.inf).amax(1)
        objective = (other - own + 2.0).clamp_min(0).sum()
    for name in LAYERS:
        pooled = feats[name].mean(dim=(2, 3))
        g = torch.zeros_like(pooled)
        for c in range(3):
            rows = target == c
            g[rows] = reference_feature_grad(pooled[rows].detach(), gmms[name][c], mode)
        objective = objective + lam * (pooled * g).sum()
    (ref_grad,) = torch.autograd.grad(objective, xr)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)


def test_hfc_loss_values_use_target_class(fitted) -> None:
    model, gmms, x, y = fitted
    feats, _, _ = extract_features(model, (x, y), LAYERS)
    classes = (y + 2) % 3
    got = HFC(gmms, mode="loglik", lam=2.0).loss(feats, classes)
    expected = torch.zeros(len(y), dtype=torch.float64)
    for name in LAYERS:
        for c in range(3):
            rows = classes == c
            gm = gmms[name][c]
            args = (torch.tensor(a) for a in (gm.means, gm.precisions_cholesky, gm.weights))
            expected[rows] -= reference.gmm_log_prob(feats[name][rows], *args)
    torch.testing.assert_close(got.double(), 2.0 * expected, rtol=1e-4, atol=1e-3)
    lls = HFC(gmms).log_likelihood(feats, classes)
    torch.testing.assert_close(torch.as_tensor(sum(lls.values())), -expected, rtol=1e-6, atol=1e-6)


def test_hfc_hides_adversarial_features(fitted) -> None:
    """Same eps and steps: HFC features are far more likely under the target class's mixtures, success stays high."""
    model, gmms, x, y = fitted
    target = (y + 1) % 3
    hfc = HFC(gmms, lam=1.0, mode="loglik")
    plain = PGD(model, eps=0.15, steps=40, targeted=True)(x, target)
    with_hfc = PGD(model, eps=0.15, steps=40, targeted=True, constraint=hfc)(x, target)
    ll = {}
    for name, res in [("plain", plain), ("hfc", with_hfc)]:
        feats, _, _ = extract_features(model, (res.adv, target), LAYERS)
        ll[name] = float(torch.as_tensor(sum(hfc.log_likelihood(feats, target).values())).mean())
    print(
        f"mean target-class log-likelihood: plain {ll['plain']:.1f}, HFC {ll['hfc']:.1f}; "
        f"success plain {plain.success_rate:.2f}, HFC {with_hfc.success_rate:.2f}"
    )
    assert plain.success_rate >= 0.9 and with_hfc.success_rate >= 0.8
    assert ll["hfc"] > ll["plain"] + 20


def test_untargeted_hfc_uses_the_other_class() -> None:
    model, _ = train_tiny(2)
    train = make_data(2, 120, seed=0)
    gmms = fit_hfc_gmms(model, train, "relu*", n_components=1, reg_covar=1e-4)
    assert list(gmms) == LAYERS and all(len(v) == 2 for v in gmms.values())
    x, y = make_data(2, 10, seed=3)
    res = CWLinf(model, eps=0.15, steps=20, constraint=HFC(gmms, layers=["relu2"]))(x, y)
    assert res.success_rate >= 0.8 and res.target is None


def test_mixtures_fitted_on_given_features_equal_those_of_the_extracting_fit(fitted) -> None:
    model, gmms, _, _ = fitted
    feats, _, labels = extract_features(model, make_data(3, 240, seed=0), LAYERS)
    given = fit_class_mixtures(feats, labels, 3, n_components=2, seed=0, reg_covar=1e-4)
    assert list(given) == LAYERS
    for name in LAYERS:
        for ours, theirs in zip(given[name], gmms[name], strict=True):
            torch.testing.assert_close(torch.tensor(ours.means), torch.tensor(theirs.means))
    with pytest.raises(UserError, match=r"labels must be in \[0, 2\)"):
        fit_class_mixtures(feats, labels, 2)


def test_save_load_round_trip(fitted, tmp_path) -> None:
    model, gmms, x, y = fitted
    save_hfc_gmms(gmms, tmp_path / "gmms")
    loaded = load_hfc_gmms(tmp_path / "gmms")
    assert list(loaded) == list(gmms)
    for name in gmms:
        for a, b in zip(gmms[name], loaded[name], strict=True):
            assert (a.means == b.means).all() and (a.precisions_cholesky == b.precisions_cholesky).all()
    feats, _, _ = extract_features(model, (x, y), LAYERS)
    torch.testing.assert_close(HFC(loaded).loss(feats, y), HFC(gmms).loss(feats, y))
    with pytest.raises(UserError, match="save_hfc_gmms"):
        load_hfc_gmms(tmp_path / "missing")


def test_bad_arguments(fitted) -> None:
    model, gmms, x, y = fitted
    with pytest.raises(ValueError, match="layers"):
        HFC(gmms, layers=["relu9"])
    with pytest.raises(ValueError, match="mode"):
        HFC(gmms, mode="farthest")
    with pytest.raises(ValueError, match="lam"):
        HFC(gmms, lam=-1)
    with pytest.raises(TypeError, match="gmms"):
        HFC([gmms["relu1"]])
    with pytest.raises(TypeError, match="one per class"):
        HFC({"relu1": gmms["relu1"][0]})
    xs, ys = make_data(3, 12, seed=1)
    with pytest.raises(ValueError, match="labels must be in"):
        fit_hfc_gmms(model, (xs, ys + 5), LAYERS, n_components=2)  # rare classes: tests/test_foreign_models.py
