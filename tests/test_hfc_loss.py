"""engine.ops.gmm.hfc_loss: values and gradients against the fp64 reference, autograd behaviour, one fused call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import TOL, assert_rel, column_major, random_mixture, ref_args, samples, tensor

from engine import reference
from engine.ops import _backend
from engine.ops.gmm import hfc_loss


def make_layers(seed: int, n: int, dims=(3, 8, 5), k: int = 3, n_classes: int = 0):
    """Features (float64 numpy) per layer and mixtures per layer (or per layer and class)."""
    rng = np.random.default_rng(seed)
    gmms, feats = [], []
    for d in dims:
        if n_classes:
            per_class = [random_mixture(rng, k, d) for _ in range(n_classes)]
            gmms.append(per_class)
            feats.append(samples(rng, per_class[0], n))
        else:
            gmms.append(random_mixture(rng, k, d))
            feats.append(samples(rng, gmms[-1], n))
    return feats, gmms


def expected_terms(feats, gmms, mode, weights, classes=None):
    """Per-sample loss (N,) and per-layer gradients from engine.reference (fp64), row by row per class."""
    n = feats[0].shape[0]
    total = np.zeros(n)
    grads = []
    for f, gm, w in zip(feats, gmms, weights, strict=True):
        d = f.shape[1]
        grad = np.zeros_like(f)
        groups = (
            [(np.arange(n), gm)] if classes is None else [(np.flatnonzero(classes == c), gm[c]) for c in set(classes)]
        )
        for rows, mixture in groups:
            x = torch.from_numpy(f[rows])
            if mode == "loglik":
                value, g = reference.gmm_log_prob_grad(x, *ref_args(mixture))
                total[rows] -= w * value.numpy()
                grad[rows] = -w * g.numpy()
            else:
                q, comp = reference.gmm_nearest(x, *ref_args(mixture))
                total[rows] += w * q.numpy() / d
                u = mixture.precisions_cholesky[comp.numpy()]
                y = np.einsum("nd,nde->ne", f[rows] - mixture.means[comp.numpy()], u)
                grad[rows] = w * 2 * np.einsum("ne,nde->nd", y, u) / d
        grads.append(grad)
    return total, grads


@pytest.mark.parametrize("layout", ["contiguous", "column-major"])
@pytest.mark.parametrize("mode", ["loglik", "nearest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradient_match_reference(backend, mode, dtype, layout):
    feats, gmms = make_layers(1, 23)
    weights = [0.5, 2.0, 1.0]
    xs = [tensor(f, backend, dtype) for f in feats]
    if layout == "column-major":  # non-contiguous leaves
        xs = [column_major(x) for x in xs]
    xs = [x.requires_grad_(True) for x in xs]
    loss = hfc_loss(xs, gmms, mode=mode, weights=weights, backend=backend)
    upstream = 2.5
    (loss * upstream).backward()
    exact = [x.detach().cpu().double().numpy() for x in xs]
    total, grads = expected_terms(exact, gmms, mode, weights)
    rtol = TOL[dtype].value
    assert loss.dtype == dtype and loss.shape == () and loss.device == xs[0].device
    assert_rel(loss, total.sum(), rtol, what="loss")
    for i, (x, g) in enumerate(zip(xs, grads, strict=True)):
        assert x.grad.shape == x.shape and x.grad.device == x.device
        assert_rel(x.grad, upstream * g, 10 * rtol, atol=10 * rtol * np.abs(g).max(), what=f"grad of layer {i}")
        assert_rel(x.grad, upstream * g, TOL[dtype].grad, scale="max", floor=1e-300, what=f"grad {i}, max-norm")


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_per_class_mixtures_and_reductions(backend, reduction):
    feats, gmms = make_layers(2, 17, dims=(4, 6), n_classes=3)
    classes = np.random.default_rng(0).integers(3, size=17)
    classes[0] = 2  # class 1 may be absent; class 2 present
    xs = [tensor(f, backend, requires_grad=True) for f in feats]
    out = hfc_loss(xs, gmms, classes=tensor(classes, backend), reduction=reduction, backend=backend)
    total, grads = expected_terms(feats, gmms, "loglik", [1.0, 1.0], classes)
    upstream = torch.linspace(-1.0, 3.0, 17, dtype=torch.float64) if reduction == "none" else torch.tensor(-0.7)
    out.backward(tensor(upstream, backend, torch.float64))
    scale = {"sum": 1.0, "mean": 1.0 / 17, "none": 1.0}[reduction]
    expected_value = total if reduction == "none" else total.sum() * scale
    assert_rel(out, expected_value, 1e-10, what="loss")
    row_scale = upstream.numpy()[:, None] if reduction == "none" else upstream.item() * scale
    for i, (x, g) in enumerate(zip(xs, grads, strict=True)):
        assert_rel(x.grad, row_scale * g, 1e-8, atol=1e-12, what=f"grad of layer {i}")


@pytest.mark.parametrize("mode", ["loglik", "nearest"])
def test_gradcheck_float64(mode):
    feats, gmms = make_layers(3, 4, dims=(2, 3), k=2)
    xs = tuple(torch.tensor(f, requires_grad=True) for f in feats)
    assert torch.autograd.gradcheck(lambda *f: hfc_loss(list(f), gmms, mode=mode, weights=[1.0, 0.3]), xs)
    assert torch.autograd.gradcheck(lambda *f: hfc_loss(list(f), gmms, mode=mode, reduction="none"), xs)


def test_all_layers_and_classes_in_one_kernel_call(monkeypatch):
    calls = []
    impl = _backend._REGISTRY["gmm"]["cpu"]

    def counting(layers, mode, need_grad):
        calls.append((len(layers), need_grad))
        return impl(layers, mode, need_grad)

    monkeypatch.setitem(_backend._REGISTRY["gmm"], "cpu", counting)
    feats, gmms = make_layers(4, 12, dims=(3, 5), n_classes=2)
    classes = np.array([0, 1] * 6)
    hfc_loss([torch.tensor(f, requires_grad=True) for f in feats], gmms, classes=classes, backend="cpu").backward()
    hfc_loss([torch.tensor(f) for f in feats], gmms, classes=classes.tolist(), backend="cpu")
    assert calls == [(4, True), (4, False)]  # 2 layers x 2 classes per call; no gradient work without autograd


def test_only_layers_requiring_grad_get_gradients_and_empty_batch(backend):
    feats, gmms = make_layers(5, 6, dims=(3, 4))
    a = tensor(feats[0], backend, requires_grad=True)
    b = tensor(feats[1], backend)
    hfc_loss([a, b], gmms, backend=backend).backward()
    assert a.grad is not None and b.grad is None
    empty = [tensor(np.zeros((0, 3)), backend, requires_grad=True), tensor(np.zeros((0, 4)), backend)]
    assert hfc_loss(empty, gmms, reduction="mean", backend=backend).item() == 0.0
    assert hfc_loss(empty, gmms, reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"mode": "closest"}, ValueError, "mode must be one of"),
        ({"reduction": "max"}, ValueError, "reduction must be one of"),
        ({"weights": [1.0]}, ValueError, "weights must be 2 finite numbers"),
        ({"weights": [1.0, float("nan")]}, ValueError, "weights must be 2 finite numbers"),
        ({"gmms_len": 1}, ValueError, "gmms must be a sequence with one entry per layer"),
        ({"rows": 5}, ValueError, "features.1. has 5 rows"),
        ({"dim": 7}, ValueError, r"features\[1\] must have shape \(N, 4\)"),
        ({"nan": True}, ValueError, r"features\[0\] contains NaN or inf"),
        ({"dtype": torch.float32}, TypeError, "features.1. has dtype torch.float32"),
        ({"per_class": True}, ValueError, "classes .N,. is required"),
        ({"per_class": True, "classes": [0, 5, 0, 0, 0, 0]}, ValueError, r"classes must lie in \[0, 2\)"),
        ({"per_class": True, "classes": [0.5] * 6}, ValueError, "classes must be an integer array of shape"),
        ({"features": torch.zeros(6, 3)}, TypeError, "features must be a non-empty sequence"),
        ({"backend": "nope"}, ValueError, "backend must be 'auto' or one of"),
    ],
)
def test_bad_input_raises(kwargs, error, match):
    rng = np.random.default_rng(0)
    n = 6
    gmms = [random_mixture(rng, 2, 3), random_mixture(rng, 2, 4)]
    second = torch.zeros(kwargs.get("rows", n), kwargs.get("dim", 4), dtype=kwargs.get("dtype", torch.float64))
    feats = [torch.zeros(n, 3, dtype=torch.float64), second]
    if kwargs.get("nan"):
        feats[0][0, 0] = float("nan")
    if kwargs.get("per_class"):
        gmms = [[g, g] for g in gmms]
    call = {k: kwargs[k] for k in ("mode", "reduction", "weights", "classes", "backend") if k in kwargs}
    with pytest.raises(error, match=match):
        hfc_loss(kwargs.get("features", feats), gmms[: kwargs.get("gmms_len", 2)], **call)
