"""Squared Mahalanobis distances (engine.ops.mahalanobis) against sklearn, scipy, the fp64 reference and autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import EmpiricalCovariance
from support import TOL, assert_output, assert_rel, class_data, put, skip_slow, tensor, to_numpy

from engine import reference
from engine.ops.mahalanobis import mahalanobis

# (N, C, d): single row/class/column, more rows than one C++ tile (256), and one above
# kMinParallelMultiplyAdds = 1e7 (N d (d + C)), the OpenMP path.
SHAPES = [(1, 1, 1), (41, 3, 7), (300, 5, 17), (9, 1, 3), (3000, 5, 60)]


def sklearn_per_class(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """How a user gets N x C from sklearn: one EmpiricalCovariance.mahalanobis call per class mean."""
    cov = EmpiricalCovariance().fit(np.random.default_rng(0).normal(size=(5, x.shape[1])))
    cov.precision_ = precision.astype(np.float64)
    columns = []
    for mu in means:
        cov.location_ = mu.astype(np.float64)
        columns.append(cov.mahalanobis(x.astype(np.float64)))
    return np.stack(columns, axis=1)


def assert_distances(actual, expected, rtol: float, what: str = "squared distances") -> None:
    """|a - e| <= rtol * max(max|e|, 1): relative to the largest distance."""
    assert_rel(actual, expected, rtol, floor=1.0, scale="max", what=what)


def reference_of(*arrays: np.ndarray) -> np.ndarray:
    """engine.reference.mahalanobis of numpy ``(x, means, precision)``."""
    return reference.mahalanobis(*(torch.from_numpy(a) for a in arrays)).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,c,d", SHAPES)
def test_matches_sklearn_scipy_and_reference(backend, dtype, n, c, d):
    skip_slow(backend, n * d * (d + c))
    rng = np.random.default_rng(n + c + d)
    x, means, precision = (a.astype(dtype) for a in class_data(rng, n, c, d))
    xin = put(x, backend)
    got = mahalanobis(xin, put(means, backend), put(precision, backend), backend=backend)
    assert_output(got, xin, dtype, (n, c))
    assert_distances(got, sklearn_per_class(x, means, precision), TOL[dtype].value, "vs sklearn")
    assert_distances(got, reference_of(x, means, precision), TOL[dtype].value, "vs reference")
    p64 = precision.astype(np.float64)
    assert_distances(to_numpy(got)[0, 0], scipy_mahalanobis(x[0], means[0], p64) ** 2, TOL[dtype].value, "vs scipy")


def test_offset_ill_conditioned_float32(backend):
    """ReLU-like features ~100 away from the origin, condition number 1e4: float32 within 1e-4 of float64."""
    rng = np.random.default_rng(1)
    x, means, precision = (a.astype(np.float32) for a in class_data(rng, 200, 5, 24, offset=100.0, cond=1e4))
    got = mahalanobis(*(put(a, backend) for a in (x, means, precision)), backend=backend)
    assert_distances(got, reference_of(x, means, precision), TOL[np.float32].value)


def test_several_layers_in_one_call(backend):
    rng = np.random.default_rng(2)
    shapes = ((30, 2, 5), (0, 3, 4), (7, 1, 9))
    layers = [tuple(put(a, backend) for a in class_data(rng, n, c, d)) for n, c, d in shapes]
    xs, ms, ps = (list(a) for a in zip(*layers, strict=True))
    got = mahalanobis(xs, ms, ps, backend=backend)
    assert isinstance(got, list) and [tuple(g.shape) for g in got] == [(30, 2), (0, 3), (7, 1)]
    for i, (g, (x, m, p)) in enumerate(zip(got, layers, strict=True)):
        assert_rel(g, mahalanobis(x, m, p, backend=backend), 1e-12, what=f"layer {i}")
    assert mahalanobis([], [], [], backend=backend) == []


def test_non_symmetric_precision_uses_its_symmetric_part(backend):
    rng = np.random.default_rng(3)
    x, means, precision = class_data(rng, 20, 2, 6)
    skew = rng.normal(size=(6, 6))
    lopsided = precision + skew - skew.T  # same quadratic form
    got = mahalanobis(*(put(a, backend) for a in (x, means, lopsided)), backend=backend)
    assert_distances(got, reference_of(x, means, lopsided), 1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_kinds_strides_and_empty(backend, dtype):
    rng = np.random.default_rng(4)
    x, means, precision = (a.astype(dtype) for a in class_data(rng, 40, 3, 10))
    wide = put(np.repeat(x, 2, axis=1), backend)[:, ::2]  # non-contiguous view equal to x
    assert not (wide.flags.c_contiguous if isinstance(wide, np.ndarray) else wide.is_contiguous())
    want = sklearn_per_class(x, means, precision)
    got = mahalanobis(wide, put(means, backend), put(precision, backend), backend=backend)
    assert_output(got, wide, dtype, (40, 3))
    assert_distances(got, want, TOL[dtype].value)
    xt = tensor(x, backend)
    out = mahalanobis(xt, tensor(means, backend), tensor(precision.T, backend).T, backend=backend)
    assert_output(out, xt, dtype, (40, 3))
    assert_distances(out, want, TOL[dtype].value)
    empty = put(x[:0], backend)
    got = mahalanobis(empty, put(means, backend), put(precision, backend), backend=backend)
    assert_output(got, empty, dtype, (0, 3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_and_torch_backends_agree(dtype):
    rng = np.random.default_rng(5)
    x, means, precision = (a.astype(dtype) for a in class_data(rng, 270, 4, 33, offset=20.0, cond=100.0))
    cpu = mahalanobis(x, means, precision, backend="cpu")
    assert_distances(cpu, mahalanobis(x, means, precision, backend="torch"), TOL[dtype].value)


def test_gradients_match_float64_autograd(backend):
    rng = np.random.default_rng(6)
    x, means, precision = class_data(rng, 25, 3, 6)
    precision = precision + 0.1 * rng.normal(size=precision.shape)  # non-symmetric, still positive definite
    upstream = rng.normal(size=(25, 3))
    ours = [tensor(a, backend, requires_grad=True) for a in (x, means, precision)]
    (mahalanobis(*ours, backend=backend) * tensor(upstream, backend)).sum().backward()
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, means, precision)]
    diff = theirs[0][:, None] - theirs[1][None]
    (torch.einsum("ncd,de,nce->nc", diff, theirs[2], diff) * torch.from_numpy(upstream)).sum().backward()
    for name, a, b in zip(("x", "means", "precision"), ours, theirs, strict=True):
        assert_rel(a.grad, b.grad, 1e-10, atol=1e-10, what=f"gradient of {name}")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), c=st.integers(1, 4), d=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_identity_precision_is_squared_euclidean(backend, n, c, d, seed):
    rng = np.random.default_rng(seed)
    x, means = rng.normal(size=(n, d)), 5 * rng.normal(size=(c, d))
    got = mahalanobis(put(x, backend), put(means, backend), put(np.eye(d), backend), backend=backend)
    assert_distances(got, cdist(x, means, "sqeuclidean"), 1e-10)


def test_not_positive_definite_precision_raises(backend):
    rng = np.random.default_rng(7)
    x, means, precision = (put(a, backend) for a in class_data(rng, 10, 2, 4))
    singular = put(np.diag([1.0, 1.0, 0.0, 1.0]), backend)
    with pytest.raises(ValueError, match=r"precision is not positive definite \(leading minor 3"):
        mahalanobis(x, means, singular, backend=backend)
    with pytest.raises(ValueError, match=r"precision\[1\] is not positive definite"):
        mahalanobis([x, x], [means, means], [precision, -precision], backend=backend)


def test_bad_input(backend):
    rng = np.random.default_rng(7)
    x, means, precision = class_data(rng, 10, 2, 4)
    means32 = put(means.astype(np.float32), backend)
    x, means, precision = (put(a, backend) for a in (x, means, precision))
    with pytest.raises(ValueError, match=r"means must have shape \(C, 4\)"):
        mahalanobis(x, means[:, :3], precision, backend=backend)
    with pytest.raises(ValueError, match=r"precision must have shape \(4, 4\)"):
        mahalanobis(x, means, precision[:3], backend=backend)
    with pytest.raises(ValueError, match=r"means\[1\] must have shape"):
        mahalanobis([x, x], [means, means[:, :2]], [precision, precision], backend=backend)
    with pytest.raises(ValueError, match="precision must be a list with one entry per layer"):
        mahalanobis([x, x], [means, means], [precision], backend=backend)
    nan = to_numpy(precision).copy()
    nan[0, 1] = np.nan
    with pytest.raises(ValueError, match="precision contains NaN or inf"):
        mahalanobis(x, means, put(nan, backend), backend=backend)
    with pytest.raises(TypeError, match="has dtype"):
        mahalanobis(x, means32, precision, backend=backend)
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
