"""Squared Mahalanobis distances (engine.ops.mahalanobis) against sklearn, scipy, the fp64 reference and autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from scipy.spatial.distance import cdist
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import EmpiricalCovariance

from engine import reference
from engine.ops.mahalanobis import mahalanobis

BACKENDS = ["cpu", "torch"]
RTOL = {np.float32: 1e-4, np.float64: 1e-10}
# (N, C, d): single row/class/column, more rows than one C++ tile (256), and one above
# kMinParallelMultiplyAdds = 1e7 (N d (d + C)), the OpenMP path.
SHAPES = [(1, 1, 1), (41, 3, 7), (300, 5, 17), (9, 1, 3), (3000, 5, 60)]


def class_data(rng: np.random.Generator, n: int, c: int, d: int, offset: float = 0.0, cond: float = 10.0):
    """Features of C classes, their means, and the tied precision (eigenvalues log-spaced over [1, cond])."""
    means = offset + 3 * rng.normal(size=(c, d))
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    covariance = (basis / np.logspace(0, np.log10(cond), d)) @ basis.T
    labels = rng.integers(c, size=n)
    x = means[labels] + rng.multivariate_normal(np.zeros(d), covariance, size=n)
    return x, means, np.linalg.inv(covariance)


def sklearn_per_class(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """How a user gets N x C from sklearn: one EmpiricalCovariance.mahalanobis call per class mean."""
    cov = EmpiricalCovariance().fit(np.random.default_rng(0).normal(size=(5, x.shape[1])))
    cov.precision_ = precision.astype(np.float64)
    columns = []
    for mu in means:
        cov.location_ = mu.astype(np.float64)
        columns.append(cov.mahalanobis(x.astype(np.float64)))
    return np.stack(columns, axis=1)


def assert_rel(actual, expected, rtol: float) -> None:
    """|a - e| <= rtol * max(|e|, 1) elementwise."""
    assert_allclose(actual, expected, rtol=0, atol=rtol * max(1.0, float(np.abs(expected).max())))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,c,d", SHAPES)
def test_matches_sklearn_scipy_and_reference(backend, dtype, n, c, d):
    rng = np.random.default_rng(n + c + d)
    x, means, precision = (a.astype(dtype) for a in class_data(rng, n, c, d))
    got = mahalanobis(x, means, precision, backend=backend)
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == (n, c)
    assert_rel(got, sklearn_per_class(x, means, precision), RTOL[dtype])
    want = reference.mahalanobis(*(torch.from_numpy(a) for a in (x, means, precision))).numpy()
    assert_rel(got, want, RTOL[dtype])
    p64 = precision.astype(np.float64)
    assert_rel(got[0, 0], scipy_mahalanobis(x[0], means[0], p64) ** 2, RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_ill_conditioned_float32(backend):
    """ReLU-like features ~100 away from the origin, condition number 1e4: float32 within 1e-4 of float64."""
    rng = np.random.default_rng(1)
    x, means, precision = class_data(rng, 200, 5, 24, offset=100.0, cond=1e4)
    want = reference.mahalanobis(*(torch.from_numpy(a.astype(np.float32)) for a in (x, means, precision))).numpy()
    got = mahalanobis(*(a.astype(np.float32) for a in (x, means, precision)), backend=backend)
    assert_rel(got, want, RTOL[np.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_layers_in_one_call(backend):
    rng = np.random.default_rng(2)
    layers = [class_data(rng, n, c, d) for n, c, d in ((30, 2, 5), (0, 3, 4), (7, 1, 9))]
    xs, ms, ps = (list(a) for a in zip(*layers, strict=True))
    got = mahalanobis(xs, ms, ps, backend=backend)
    assert isinstance(got, list) and [g.shape for g in got] == [(30, 2), (0, 3), (7, 1)]
    for g, (x, m, p) in zip(got, layers, strict=True):
        assert_allclose(g, mahalanobis(x, m, p, backend=backend), rtol=1e-12)
    assert mahalanobis([], [], []) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_symmetric_precision_uses_its_symmetric_part(backend):
    rng = np.random.default_rng(3)
    x, means, precision = class_data(rng, 20, 2, 6)
    skew = rng.normal(size=(6, 6))
    lopsided = precision + skew - skew.T  # same quadratic form
    want = reference.mahalanobis(*(torch.from_numpy(a) for a in (x, means, lopsided))).numpy()
    assert_rel(mahalanobis(x, means, lopsided, backend=backend), want, 1e-10)


def test_input_kinds_strides_and_empty():
    rng = np.random.default_rng(4)
    x, means, precision = class_data(rng, 40, 3, 10)
    wide = np.repeat(x, 2, axis=1)[:, ::2]  # non-contiguous view equal to x
    assert not wide.flags.c_contiguous
    want = sklearn_per_class(x, means, precision)
    assert_rel(mahalanobis(wide, means, precision), want, 1e-10)
    out = mahalanobis(torch.from_numpy(x), torch.from_numpy(means), torch.from_numpy(precision.T.copy()).T)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert_rel(out.numpy(), want, 1e-10)
    assert mahalanobis(x[:0], means, precision).shape == (0, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_and_torch_backends_agree(dtype):
    rng = np.random.default_rng(5)
    x, means, precision = (a.astype(dtype) for a in class_data(rng, 270, 4, 33, offset=20.0, cond=100.0))
    cpu = mahalanobis(x, means, precision, backend="cpu")
    assert_rel(cpu, mahalanobis(x, means, precision, backend="torch"), RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64_autograd(backend):
    rng = np.random.default_rng(6)
    x, means, precision = class_data(rng, 25, 3, 6)
    precision = precision + 0.1 * rng.normal(size=precision.shape)  # non-symmetric, still positive definite
    upstream = torch.from_numpy(rng.normal(size=(25, 3)))
    ours = [torch.tensor(a, requires_grad=True) for a in (x, means, precision)]
    (mahalanobis(*ours, backend=backend) * upstream).sum().backward()
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, means, precision)]
    diff = theirs[0][:, None] - theirs[1][None]
    (torch.einsum("ncd,de,nce->nc", diff, theirs[2], diff) * upstream).sum().backward()
    for a, b in zip(ours, theirs, strict=True):
        assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), c=st.integers(1, 4), d=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_identity_precision_is_squared_euclidean(n, c, d, seed):
    rng = np.random.default_rng(seed)
    x, means = rng.normal(size=(n, d)), 5 * rng.normal(size=(c, d))
    for backend in BACKENDS:
        assert_rel(mahalanobis(x, means, np.eye(d), backend=backend), cdist(x, means, "sqeuclidean"), 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    rng = np.random.default_rng(7)
    x, means, precision = class_data(rng, 10, 2, 4)
    singular = np.diag([1.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"precision is not positive definite \(leading minor 3"):
        mahalanobis(x, means, singular, backend=backend)
    with pytest.raises(ValueError, match=r"precision\[1\] is not positive definite"):
        mahalanobis([x, x], [means, means], [precision, -precision], backend=backend)
    with pytest.raises(ValueError, match=r"means must have shape \(C, 4\)"):
        mahalanobis(x, means[:, :3], precision, backend=backend)
    with pytest.raises(ValueError, match=r"precision must have shape \(4, 4\)"):
        mahalanobis(x, means, precision[:3], backend=backend)
    with pytest.raises(ValueError, match=r"means\[1\] must have shape"):
        mahalanobis([x, x], [means, means[:, :2]], [precision, precision], backend=backend)
    with pytest.raises(ValueError, match="precision must be a list with one entry per layer"):
        mahalanobis([x, x], [means, means], [precision], backend=backend)
    nan = precision.copy()
    nan[0, 1] = np.nan
    with pytest.raises(ValueError, match="precision contains NaN or inf"):
        mahalanobis(x, means, nan, backend=backend)
    with pytest.raises(TypeError, match="has dtype"):
        mahalanobis(x, means.astype(np.float32), precision, backend=backend)
    with pytest.raises(ValueError, match="means must have shape"):
        mahalanobis(x, means[:0], precision, backend=backend)


def test_cpp_side_validation():
    from engine import _C

    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="not positive definite"):
        _C.mahalanobis([(x, x[:1], np.zeros((2, 2)))])
    with pytest.raises(ValueError, match=r"precision must have shape \(2, 2\) \(layer 1\)"):
        _C.mahalanobis([(x, x[:1], np.eye(2)), (x, x[:1], np.eye(3))])
    with pytest.raises(TypeError):  # mixed dtypes are never converted silently
        _C.mahalanobis([(x, x[:1].astype(np.float32), np.eye(2))])
