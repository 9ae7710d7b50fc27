"""Gaussian KDE log density (engine.ops.kde) against sklearn KernelDensity and the fp64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.neighbors import KernelDensity

from engine import reference
from engine.ops.kde import kde_log_density

BACKENDS = ["cpu", "torch"]
# Relative tolerance (of max(|log p|, 1)) per dtype; DESIGN.md "Numerics".
RTOL = {np.float32: 1e-4, np.float64: 1e-10}
# (N, M, d, bandwidth): single rows/columns, several query tiles (> 256) and reference tiles (> 512), and one
# above kMinParallelMultiplyAdds = 1e7 (N M d), the OpenMP path.
SHAPES = [(1, 1, 1, 0.5), (41, 57, 7, 1.0), (300, 700, 17, 2.5), (9, 30, 3, 0.05), (300, 700, 50, 5.0)]


def sklearn_log_density(x: np.ndarray, ref: np.ndarray, bandwidth: float) -> np.ndarray:
    model = KernelDensity(kernel="gaussian", bandwidth=bandwidth).fit(ref.astype(np.float64))
    return model.score_samples(x.astype(np.float64))


def assert_log_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """|a - e| <= rtol * max(|e|, 1) elementwise."""
    assert_allclose(actual, expected, rtol=0, atol=rtol * max(1.0, float(np.abs(expected).max())))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,m,d,bandwidth", SHAPES)
def test_kde_matches_sklearn(backend, dtype, n, m, d, bandwidth):
    rng = np.random.default_rng(n + m + d)
    ref = rng.normal(size=(m, d)).astype(dtype)
    x = (ref[rng.integers(m, size=n)] + 0.5 * rng.normal(size=(n, d))).astype(dtype)
    got = kde_log_density(x, ref, bandwidth, backend=backend)
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == (n,)
    assert_log_close(got, sklearn_log_density(x, ref, bandwidth), RTOL[dtype])
    want = reference.kde_log_density(torch.from_numpy(x), torch.from_numpy(ref), bandwidth).numpy()
    assert_log_close(got, want, RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_data_in_float32(backend):
    """Features 1000 away from the origin: centring keeps float32 within tolerance of the float64 result."""
    rng = np.random.default_rng(1)
    ref = 1000 + rng.normal(size=(200, 16))
    x = ref[:50] + 0.3 * rng.normal(size=(50, 16))
    got = kde_log_density(x.astype(np.float32), ref.astype(np.float32), 0.5, backend=backend)
    want = sklearn_log_density(x.astype(np.float32), ref.astype(np.float32), 0.5)
    assert_log_close(got, want, RTOL[np.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_far_queries_stay_finite(backend, dtype):
    """Every kernel value underflows (exp(-1e5)); the max-shifted log-sum-exp still gives the exact log density."""
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(600, 4))
    x = ref[:5] + 60.0
    got = kde_log_density(x.astype(dtype), ref.astype(dtype), 0.1, backend=backend)
    want = sklearn_log_density(x.astype(dtype), ref.astype(dtype), 0.1)
    assert np.all(np.isfinite(got)) and np.all(want < -1e5)
    assert_log_close(got, want, RTOL[dtype])


def test_input_kinds_strides_and_empty():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(40, 20))
    x, ref = base[::2, ::2], base[:, 1::2]
    assert not x.flags.c_contiguous
    want = sklearn_log_density(x, ref, 0.7)
    assert_log_close(kde_log_density(x, ref, 0.7), want, RTOL[np.float64])
    out = kde_log_density(torch.from_numpy(x), torch.from_numpy(ref), np.float32(0.7))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert_log_close(out.numpy(), want, 1e-7)  # bandwidth given as float32(0.7)
    assert kde_log_density(np.zeros((0, 10)), ref, 1.0).shape == (0,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_and_torch_backends_agree(dtype):
    rng = np.random.default_rng(4)
    ref = (5 + rng.normal(size=(530, 33))).astype(dtype)
    x = (5 + rng.normal(size=(270, 33))).astype(dtype)
    cpu = kde_log_density(x, ref, 1.3, backend="cpu")
    assert_log_close(cpu, kde_log_density(x, ref, 1.3, backend="torch"), RTOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
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
    assert np.all(np.isfinite(kde_log_density(x, x, 1e-30, backend=backend)))  # fine in float64


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
