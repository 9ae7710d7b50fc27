"""Universal perturbations on tiny 2- and 5-class models: fooling vs noise, budgets, targets, metrics, DeepFool;
the classic DeepFool-UAP against a direct per-image loop."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, confusion_matrix
from test_attacks import make_data, one_thread, train_tiny  # noqa: F401  (one_thread: autouse fixture)
from torch import nn

from engine.attacks import noise_like
from engine.attacks.deepfool import deepfool
from engine.attacks.uap import (
    _sgd_objective,
    data_free_uap,
    deepfool_uap,
    deepfool_uap_batched,
    evaluate_uap,
    sgd_uap,
    targeted_uap,
)

EPS = 0.05


@pytest.fixture(scope="module")
def graded():
    model, acc = train_tiny(5, n=400, steps=200)
    assert acc > 0.85
    return model, make_data(5, 160, seed=11), make_data(5, 160, seed=12)


@pytest.fixture(scope="module")
def binary():
    model, acc = train_tiny(2, n=200, steps=150)
    assert acc > 0.95
    return model, make_data(2, 80, seed=11), make_data(2, 80, seed=12)


def noise_fooling_rate(model: nn.Module, heldout, eps: float) -> float:
    x, _ = heldout
    with torch.no_grad():
        clean = model(x).argmax(1)
        rates = [float((model(noise_like(x, eps, seed=s)).argmax(1) != clean).float().mean()) for s in range(3)]
    return max(rates)


@pytest.mark.parametrize("method", ["deepfool", "deepfool_batched", "sgd", "sgd_margin", "data_free"])
def test_uap_beats_random_noise(graded, method) -> None:
    model, fit, heldout = graded
    if method == "deepfool":
        result = deepfool_uap(model, fit, eps=EPS, heldout=heldout, max_passes=4)
    elif method == "deepfool_batched":
        result = deepfool_uap_batched(model, fit, eps=EPS, heldout=heldout, max_passes=4)
    elif method == "sgd":
        result = sgd_uap(model, fit, eps=EPS, heldout=heldout, epochs=4)
    elif method == "sgd_margin":
        result = sgd_uap(model, fit, eps=EPS, heldout=heldout, epochs=4, loss="margin", schedule="linear")
    else:
        result = data_free_uap(model, (1, 8, 8), eps=EPS, heldout=heldout, steps=60)
    noise = noise_fooling_rate(model, heldout, EPS)
    assert result.fooling_rate >= noise + 0.25, (result.fooling_rate, noise)
    assert result.perturbation.shape == (1, 8, 8)
    assert float(result.perturbation.abs().max()) <= EPS
    assert result.kappa < result.clean_kappa - 0.3  # grading collapses under attack
    assert result.confusion.shape == (5, 5) and result.confusion.sum() == len(heldout[1])
    assert result.history and result.seconds > 0


def test_l2_budget_and_binary_model(binary) -> None:
    model, fit, heldout = binary
    for fn in (deepfool_uap, deepfool_uap_batched, sgd_uap, partial(sgd_uap, loss="margin")):
        result = fn(model, fit, eps=1.2, norm="l2", heldout=heldout)
        assert float(result.perturbation.norm()) <= 1.2 * (1 + 1e-6)
        assert result.fooling_rate >= noise_fooling_rate(model, heldout, 0.15) + 0.3
        assert result.confusion.shape == (2, 2)


def test_targeted_uaps(graded, binary) -> None:
    model, fit, heldout = graded
    for result in [
        targeted_uap(model, fit, target=1, eps=0.1, heldout=heldout, max_passes=3),
        sgd_uap(model, fit, target=1, eps=0.1, heldout=heldout, epochs=3),
        sgd_uap(model, fit, target=1, eps=0.1, heldout=heldout, epochs=3, loss="margin"),
    ]:
        assert result.target == 1 and result.targeted_success_rate >= 0.9
        assert float(result.perturbation.abs().max()) <= 0.1
    model2, fit2, heldout2 = binary
    result = targeted_uap(model2, fit2, target=0, eps=0.1, heldout=heldout2)
    assert result.targeted_success_rate >= 0.95


def direct_deepfool_uap(model, x, eps, max_passes, delta, seed, max_iter=50):
    """Moosavi-Dezfooli et al.'s loop written out: one image at a time, a DeepFool step from x + v for each image
    v does not fool (kept when DeepFool converged), projection after each step, fit-set fooling after each pass."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.zeros(x.shape[1:])
    with torch.no_grad():
        clean = model(x).argmax(1)
    rates = []
    for _ in range(max_passes):
        for k in torch.randperm(len(x), generator=gen).tolist():
            start = (x[k : k + 1] + v).clamp(0, 1)
            with torch.no_grad():
                fooled = int(model(start).argmax(1)) != int(clean[k])
            if not fooled:
                r, converged, _ = deepfool(model, start, max_iter=max_iter)
                if bool(converged[0]):
                    v = (v + r[0]).clamp(-eps, eps)
        with torch.no_grad():
            rates.append(float((model((x + v).clamp(0, 1)).argmax(1) != clean).float().mean()))
        if rates[-1] >= 1 - delta:
            break
    return v, rates


@pytest.mark.filterwarnings("ignore:.*only one label in common")  # kappa of a single held-out image
@pytest.mark.parametrize(("n", "delta", "eps"), [(1, 0.2, 0.0625), (13, 0.2, 0.0625), (40, 0.05, 0.03125)])
def test_classic_deepfool_uap_is_the_per_image_loop(graded, n, delta, eps) -> None:
    model, (x, y), _ = graded
    v, rates = direct_deepfool_uap(model, x[:n], eps, max_passes=3, delta=delta, seed=4)
    result = deepfool_uap(model, (x[:n], y[:n]), eps=eps, delta=delta, max_passes=3, seed=4)
    torch.testing.assert_close(result.perturbation, v, rtol=0, atol=0)
    assert [h["fit_rate"] for h in result.history] == pytest.approx(rates)
    one = deepfool_uap_batched(model, (x[:n], y[:n]), eps=eps, delta=delta, max_passes=3, seed=4, batch_size=1)
    torch.testing.assert_close(one.perturbation, v, rtol=0, atol=0)  # batches of one: the same loop
    if n == 40:  # the batched variant sums a batch's steps from one v: a different perturbation
        batched = deepfool_uap_batched(model, (x[:n], y[:n]), eps=eps, delta=delta, max_passes=3, seed=4)
        assert not torch.equal(batched.perturbation, v)
    again = deepfool_uap(model, (x[:n], y[:n]), eps=eps, delta=delta, max_passes=3, seed=5)
    assert n == 1 or not torch.equal(again.perturbation, v)  # the seed orders the images


def test_delta_stops_early(graded) -> None:
    model, fit, heldout = graded
    result = deepfool_uap(model, fit, eps=0.1, heldout=heldout, delta=0.5, max_passes=10)
    assert len(result.history) < 10 and result.history[-1]["fit_rate"] >= 0.5
    sgd = sgd_uap(model, fit, eps=0.1, heldout=heldout, delta=0.5, epochs=10)
    assert len(sgd.history) < 10 and sgd.history[-1]["fit_rate"] >= 0.5
    assert all(h["fit_rate"] < 0.5 for h in sgd.history[:-1])


def test_margin_objective_and_its_clamp() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 4.0, 1.0], [2.0, 2.5, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 0])
    # margins z_0 - max_{k!=0} z_k: 2, -4 (fooled by more than kappa: clamped, no gradient), -0.5
    value = _sgd_objective(logits, labels, "margin", False, 10.0, 1.0)
    assert float(value.detach()) == pytest.approx(2.0 - 1.0 - 0.5)
    (grad,) = torch.autograd.grad(value, logits)
    torch.testing.assert_close(grad, torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [1.0, -1.0, 0.0]]))
    targeted = _sgd_objective(logits, torch.tensor([1, 1, 1]), "margin", True, 10.0, 1.0)
    assert float(targeted.detach()) == pytest.approx(2.0 - 1.0 - 0.5)  # max_{k!=1} z_k - z_1, clamped at -1


def test_linear_schedule_halves_the_second_step(graded) -> None:
    model, (x, y), _ = graded
    fit = (x[:64], y[:64])
    for schedule, allowed in (("constant", (0.0, 0.01, 0.02)), ("linear", (0.0, 0.005, 0.01, 0.015))):
        v = sgd_uap(model, fit, eps=0.1, step_size=0.01, batch_size=32, epochs=1, schedule=schedule).perturbation
        values = torch.tensor(sorted(set(v.abs().flatten().tolist())))
        near = (values[:, None] - torch.tensor(allowed)[None]).abs().amin(1)
        assert float(near.max()) < 1e-6, (schedule, values)
        assert float(v.abs().max()) > 0.012  # both steps taken in the same direction somewhere


def test_evaluate_uap_matches_sklearn(graded) -> None:
    model, _, (x, y) = graded
    v = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.05
    metrics = evaluate_uap(model, v, (x, y))
    with torch.no_grad():
        clean = model(x).argmax(1).numpy()
        adv = model((x + v).clamp(0, 1)).argmax(1).numpy()
    assert metrics["fooling_rate"] == pytest.approx((clean != adv).mean())
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(y.numpy(), adv, weights="quadratic"))
    assert metrics["clean_kappa"] == pytest.approx(cohen_kappa_score(y.numpy(), clean, weights="quadratic"))
    np.testing.assert_array_equal(metrics["confusion"], confusion_matrix(y.numpy(), adv, labels=range(5)))
    zero = evaluate_uap(model, torch.zeros(1, 8, 8), (x, y), target=2)
    assert zero["fooling_rate"] == 0.0 and zero["kappa"] == zero["clean_kappa"]
    assert zero["targeted_success_rate"] == pytest.approx((clean == 2).mean())


def test_deepfool_on_linear_model_is_the_hyperplane_projection() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).double()
    x = torch.rand(7, 3, 2, 2, dtype=torch.float64)
    r, converged, iterations = deepfool(model, x, overshoot=0.02)
    w = (model[1].weight[1] - model[1].weight[0]).detach()
    f = (model(x)[:, 1] - model(x)[:, 0]).detach()
    label = model(x).argmax(1)
    sign = torch.where(label == 0, 1.0, -1.0).double()  # step toward the other class
    expected = 1.02 * ((f.abs() / w.norm() + 1e-4) / w.norm() * sign)[:, None] * w  # LTS4: (dist + 1e-4) w/|w|
    assert bool(converged.all()) and bool((iterations == 1).all())
    torch.testing.assert_close(r.flatten(1), expected)


def test_deepfool_takes_the_clean_logits_from_its_first_iteration() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    _, converged, iterations = deepfool(model, torch.rand(5, 3, 2, 2, dtype=torch.float64))
    assert bool(converged.all()) and bool((iterations == 1).all())  # linear: one step crosses
    assert calls == [5, 5]  # iteration 0 (the clean logits) and the check after the step; no extra clean pass


def test_deepfool_batch_equals_per_sample(graded) -> None:
    model, (x, _), _ = graded
    r, converged, iterations = deepfool(model, x[:12])
    for i in range(12):
        ri, ci, ii = deepfool(model, x[i : i + 1])
        torch.testing.assert_close(r[i : i + 1], ri, rtol=1e-4, atol=1e-6)
        assert bool(ci[0] == converged[i]) and int(ii[0]) == int(iterations[i])


def test_bad_arguments(graded) -> None:
    model, fit, heldout = graded
    with pytest.raises(ValueError, match="target"):
        targeted_uap(model, fit, target=7, eps=0.1)
    with pytest.raises(ValueError, match="heldout"):
        data_free_uap(model, (1, 8, 8), eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        sgd_uap(model, fit, eps="ten")
    with pytest.raises(ValueError, match="norm"):
        deepfool_uap(model, fit, norm="l1")
    with pytest.raises(ValueError, match="batch_size"):
        deepfool_uap_batched(model, fit, batch_size=0)
    with pytest.raises(ValueError, match="data must hold images"):
        sgd_uap(model, (fit[0] * 3, fit[1]), eps=0.1)
    with pytest.raises(ValueError, match="loss"):
        sgd_uap(model, fit, eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="schedule"):
        sgd_uap(model, fit, eps=0.1, schedule="cosine")
    with pytest.raises(ValueError, match="kappa"):
        sgd_uap(model, fit, eps=0.1, loss="margin", kappa=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        deepfool(model, fit[0][:2], max_iter=0)
