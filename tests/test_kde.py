"""Gaussian KDE log density (engine.ops.kde) against sklearn KernelDensity and the fp64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KernelDensity
from support import TOL, assert_output, assert_rel, put, skip_slow, tensor

from engine import reference
from engine.ops.kde import kde_log_density

# (N, M, d, bandwidth): single rows/columns, several query tiles (> 256) and reference tiles (> 512), and one
# above kMinParallelMultiplyAdds = 1e7 (N M d), the OpenMP path.
SHAPES = [(1, 1, 1, 0.5), (41, 57, 7, 1.0), (300, 700, 17, 2.5), (9, 30, 3, 0.05), (300, 700, 50, 5.0)]


def sklearn_log_density(x: np.ndarray, ref: np.ndarray, bandwidth: float) -> np.ndarray:
    model = KernelDensity(kernel="gaussian", bandwidth=bandwidth).fit(ref.astype(np.float64))
    return model.score_samples(x.astype(np.float64))


def assert_log_close(actual, expected, rtol: float, what: str = "log density") -> None:
    """|a - e| <= rtol * max(max|e|, 1): relative to the largest log density."""
    assert_rel(actual, expected, rtol, floor=1.0, scale="max", what=what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,m,d,bandwidth", SHAPES)
def test_kde_matches_sklearn(backend, dtype, n, m, d, bandwidth):
    skip_slow(backend, n * m * d)
    rng = np.random.default_rng(n + m + d)
    ref = rng.normal(size=(m, d)).astype(dtype)
    x = (ref[rng.integers(m, size=n)] + 0.5 * rng.normal(size=(n, d))).astype(dtype)
    xin = put(x, backend)
    got = kde_log_density(xin, put(ref, backend), bandwidth, backend=backend)
    assert_output(got, xin, dtype, (n,))
    assert_log_close(got, sklearn_log_density(x, ref, bandwidth), TOL[dtype].value, "vs sklearn")
    want = reference.kde_log_density(torch.from_numpy(x), torch.from_numpy(ref), bandwidth).numpy()
    assert_log_close(got, want, TOL[dtype].value, "vs reference")


def test_offset_data_in_float32(backend):
    """Features 1000 away from the origin: centring keeps float32 within tolerance of the float64 result."""
    rng = np.random.default_rng(1)
    ref = 1000 + rng.normal(size=(200, 16))
    x = ref[:50] + 0.3 * rng.normal(size=(50, 16))
    x32, ref32 = x.astype(np.float32), ref.astype(np.float32)
    got = kde_log_density(put(x32, backend), put(ref32, backend), 0.5, backend=backend)
    assert_log_close(got, sklearn_log_density(x32, ref32, 0.5), TOL[np.float32].value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_far_queries_stay_finite(backend, dtype):
    """Every kernel value underflows (exp(-1e5)); the max-shifted log-sum-exp still gives the exact log density."""
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(600, 4))
    x, ref = (ref[:5] + 60.0).astype(dtype), ref.astype(dtype)
    got = kde_log_density(put(x, backend), put(ref, backend), 0.1, backend=backend)
    want = sklearn_log_density(x, ref, 0.1)
    assert torch.isfinite(torch.as_tensor(got)).all() and np.all(want < -1e5)
    assert_log_close(got, want, TOL[dtype].value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_kinds_strides_and_empty(backend, dtype):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(40, 20)).astype(dtype)
    want = sklearn_log_density(base[::2, ::2], base[:, 1::2], 0.7)
    x, ref = put(base, backend)[::2, ::2], put(base, backend)[:, 1::2]  # non-contiguous views
    assert not (x.flags.c_contiguous if isinstance(x, np.ndarray) else x.is_contiguous())
    got = kde_log_density(x, ref, 0.7, backend=backend)
    assert_output(got, x, dtype, (20,))
    assert_log_close(got, want, TOL[dtype].value)
    xt = tensor(base[::2, ::2], backend).T.contiguous().T  # column-major torch tensor
    out = kde_log_density(xt, tensor(base[:, 1::2], backend), np.float32(0.7), backend=backend)
    assert_output(out, xt, dtype, (20,))
    assert_log_close(out, want, max(TOL[dtype].value, 1e-7))  # bandwidth given as float32(0.7)
    assert kde_log_density(put(np.zeros((0, 10), dtype), backend), ref, 1.0, backend=backend).shape == (0,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_and_torch_backends_agree(dtype):
    rng = np.random.default_rng(4)
    ref = (5 + rng.normal(size=(530, 33))).astype(dtype)
    x = (5 + rng.normal(size=(270, 33))).astype(dtype)
    cpu = kde_log_density(x, ref, 1.3, backend="cpu")
    assert_log_close(cpu, kde_log_density(x, ref, 1.3, backend="torch"), TOL[dtype].value)


def test_bad_input(backend):
    rng = np.random.default_rng(5)
    x, ref = rng.normal(size=(5, 3)), rng.normal(size=(10, 3))
    for bad in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="bandwidth must be a positive finite number"):
            kde_log_density(x, ref, bad, backend=backend)
    with pytest.raises(TypeError, match="bandwidth must be a number"):
        kde_log_density(x, ref, "wide", backend=backend)
    with pytest.raises(TypeError, match="bandwidth must be a number"):
        kde_log_density(x, ref, True, backend=backend)
    with pytest.raises(ValueError, match=r"ref must have shape \(M, 3\)"):
        kde_log_density(x, ref[:, :1], 1.0, backend=backend)
    with pytest.raises(ValueError, match="ref must have at least 1 row"):
        kde_log_density(x, ref[:0], 1.0, backend=backend)
    nan = x.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        kde_log_density(nan, ref, 1.0, backend=backend)
    with pytest.raises(TypeError, match="ref has dtype"):
        kde_log_density(x, ref.astype(np.float32), 1.0, backend=backend)
    with pytest.raises(ValueError, match="bandwidth=1e-30 is too small for torch.float32"):
        kde_log_density(x.astype(np.float32), ref.astype(np.float32), 1e-30, backend=backend)
    tiny = kde_log_density(put(x, backend), put(x, backend), 1e-30, backend=backend)  # fine in float64
    assert torch.isfinite(torch.as_tensor(tiny)).all()


def test_cpp_side_validation():
    from engine import _C

    ref = np.zeros((4, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="bandwidth must be a positive finite number"):
        _C.kde(ref, ref, -1.0)
    with pytest.raises(ValueError, match="ref must have at least 1 row"):
        _C.kde(ref, ref[:0], 1.0)
    with pytest.raises(TypeError):  # mixed dtypes are never converted silently
        _C.kde(ref, ref.astype(np.float64), 1.0)
    with pytest.raises(ValueError, match="bandwidth=1e-30 is too small"):
        _C.kde(ref, ref, 1e-30)
