"""GMM kernels (engine.ops.gmm) against sklearn, the fp64 reference and fp64 torch autograd, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from support import (
    TOL,
    assert_output,
    assert_rel,
    column_major,
    put,
    random_mixture,
    ref_args,
    rounded,
    samples,
    tensor,
    to_numpy,
)

from engine import reference
from engine.mixture import GaussianMixture
from engine.ops import _backend
from engine.ops.gmm import gmm_log_prob, gmm_log_prob_grad, gmm_nearest

SHAPES = [(1, 1, 1), (41, 7, 3), (130, 17, 5), (9, 3, 1)]


def relu_features(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """GAP-like features: nonnegative, per-channel offsets 50..100, strongly correlated, two clusters."""
    mixing = rng.normal(size=(d, d)) * np.logspace(0, -2, d)[:, None]
    cluster = rng.integers(2, size=n)[:, None] * rng.normal(scale=3.0, size=d)
    return np.maximum(rng.uniform(50, 100, size=d) + cluster + rng.normal(size=(n, d)) @ mixing, 0.0)


def assert_log_prob(actual, expected, dtype, what: str = "log_prob") -> None:
    """Log-probs (or squared distances): |a - e| <= tol * max(|e|, 1) elementwise."""
    assert_rel(actual, expected, TOL[dtype].value, floor=1.0, what=what)


def assert_grad(actual, expected, dtype, what: str = "grad") -> None:
    """Gradients: per-row relative error of the row norms."""
    assert_rel(actual, expected, TOL[dtype].grad, scale="row", floor=1e-12, what=what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_log_prob_and_grad_match_reference(backend, dtype, n, d, k):
    rng = np.random.default_rng(n * 100 + d * 10 + k)
    gmm = random_mixture(rng, k, d)
    x = samples(rng, gmm, n).astype(dtype)
    x64 = torch.from_numpy(x.astype(np.float64))
    ref_value, ref_grad = reference.gmm_log_prob_grad(x64, *ref_args(gmm))
    xin = put(x, backend)
    value, grad = gmm_log_prob_grad(xin, gmm, backend=backend)
    assert_output(value, xin, dtype, (n,))
    assert_output(grad, xin, dtype, (n, d))
    assert_log_prob(value, ref_value, dtype)
    assert_grad(grad, ref_grad, dtype)
    assert_log_prob(gmm_log_prob(xin, gmm, backend=backend), ref_value, dtype, "log_prob only")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_nearest_matches_reference(backend, dtype, n, d, k):
    rng = np.random.default_rng(7 + n + d + k)
    gmm = random_mixture(rng, k, d)
    x = samples(rng, gmm, n).astype(dtype)
    ref_q, ref_k = reference.gmm_nearest(torch.from_numpy(x), *ref_args(gmm))
    xin = put(x, backend)
    q, comp = gmm_nearest(xin, gmm, backend=backend)
    assert_output(q, xin, dtype, (n,))
    assert_output(comp, xin, np.int64, (n,))
    np.testing.assert_array_equal(to_numpy(comp), ref_k.numpy())
    assert_log_prob(q, ref_q, dtype, "sq_mahalanobis")


@pytest.fixture(scope="module")
def realistic() -> tuple[np.ndarray, SkGaussianMixture, GaussianMixture]:
    """ReLU-like offset features, sklearn's mixture fitted on them and its conversion."""
    rng = np.random.default_rng(3)
    feats = relu_features(rng, 400, 24)
    sk = SkGaussianMixture(4, covariance_type="full", reg_covar=1e-4, random_state=0).fit(feats)
    return feats, sk, GaussianMixture.from_sklearn(sk)


def test_matches_sklearn_on_realistic_offset_features_float32(backend, realistic):
    """Fitted on ReLU-like offset features. Rounding the means (~75) to float32 alone moves log p by ~3e-4 nats
    here, so the kernel is held to 1e-4 against the exact float32 problem and must add little to that error."""
    feats, sk, gmm = realistic
    x = feats[:60].astype(np.float32)
    ref_value = reference.gmm_log_prob(torch.from_numpy(x), *ref_args(gmm))
    assert_rel(sk.score_samples(x.astype(np.float64)), ref_value, 1e-10, floor=1.0, what="sklearn vs reference")
    assert_float32_close(x, gmm, backend)


def assert_float32_close(x: np.ndarray, gmm: GaussianMixture, backend: str) -> None:
    """Float32 kernel vs the exact answer for float32-rounded inputs (DESIGN tolerances), and its error against the
    fp64 parameters at most 1.5x what rounding the parameters alone causes."""
    x64 = torch.from_numpy(x.astype(np.float64))
    exact_value, exact_grad = reference.gmm_log_prob_grad(x64, *ref_args(rounded(gmm, np.float32)))
    value, grad = gmm_log_prob_grad(put(x, backend), gmm, backend=backend)
    assert_log_prob(value, exact_value, np.float32)
    assert_grad(grad, exact_grad, np.float32)
    ref_value = reference.gmm_log_prob(x64, *ref_args(gmm)).numpy()
    inherent = np.abs(exact_value.numpy() - ref_value).max()
    assert np.abs(to_numpy(value) - ref_value).max() <= 1.5 * inherent + 1e-5


def test_uncentred_form_fails_but_centred_kernel_passes(backend):
    """x P x - 2 x P mu + mu P mu in float32 loses whole nats at offset ~100; centring first does not."""
    rng = np.random.default_rng(11)
    gmm = random_mixture(rng, 2, 16, cond=1e3, offset=100.0, spread=0.5)
    x = samples(rng, gmm, 50, scale=0.05).astype(np.float32)
    ref = reference.gmm_log_prob(torch.from_numpy(x), *ref_args(gmm)).numpy()
    means, chol, log_norm = (t for t in gmm.tensors(torch.float32))
    xt = torch.from_numpy(x)
    precision = chol @ chol.transpose(1, 2)
    quad = (
        torch.einsum("nd,kde,ne->nk", xt, precision, xt)
        - 2 * torch.einsum("nd,kde,ke->nk", xt, precision, means)
        + torch.einsum("kd,kde,ke->k", means, precision, means)
    )
    uncentred = torch.logsumexp(log_norm - 0.5 * quad, dim=1).numpy()
    assert np.abs(uncentred - ref).max() > 0.5  # the naive form is off by whole nats
    assert_log_prob(gmm_log_prob(put(x, backend), gmm, backend=backend), ref, np.float32, f"centred {backend}")


def test_ill_conditioned_covariance(backend):
    rng = np.random.default_rng(5)
    gmm = random_mixture(rng, 3, 12, cond=1e6, offset=50.0)
    x = samples(rng, gmm, 40, scale=0.002).astype(np.float32)
    assert_float32_close(x, gmm, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_torch_input_returns_torch(backend, dtype):
    """Column-major, every other row, d over one 16-wide tile, offset and condition number 1e4: torch in, torch
    out on the input's device, against the exact problem for ``dtype``-rounded parameters."""
    rng = np.random.default_rng(2)
    gmm = random_mixture(rng, 3, 17, cond=1e4, offset=10.0, spread=1.0, lowest=1e-2)
    big = column_major(tensor(samples(rng, gmm, 40, scale=0.3), backend, dtype))[::2]
    assert not big.is_contiguous()
    x64, exact = big.cpu().double(), ref_args(rounded(gmm, dtype))
    value, grad = gmm_log_prob_grad(big, gmm, backend=backend)
    assert_output(value, big, dtype, (20,))
    assert_output(grad, big, dtype, (20, 17))
    ref_value, ref_grad = reference.gmm_log_prob_grad(x64, *exact)
    assert_log_prob(value, ref_value, dtype)
    assert_grad(grad, ref_grad, dtype)
    assert_rel(value, ref_value, TOL[dtype].value, scale="max", floor=1e-300, what="log_prob, max-norm")
    assert_rel(grad, ref_grad, TOL[dtype].grad, scale="max", floor=1e-300, what="grad, max-norm")
    q, comp = gmm_nearest(big, gmm, backend=backend)
    assert_output(q, big, dtype, (20,))
    assert_output(comp, big, torch.int64, (20,))
    ref_q, ref_k = reference.gmm_nearest(x64, *exact)
    assert_log_prob(q, ref_q, dtype, "sq_mahalanobis")
    assert torch.equal(comp.cpu(), ref_k)


def test_empty_batch_returns_empty(backend):
    gmm = random_mixture(np.random.default_rng(0), 2, 3)
    x = put(np.zeros((0, 3), np.float32), backend)
    value, grad = gmm_log_prob_grad(x, gmm, backend=backend)
    assert_output(value, x, np.float32, (0,))
    assert_output(grad, x, np.float32, (0, 3))
    xt = tensor(np.zeros((0, 3)), backend, torch.float32)
    q, comp = gmm_nearest(xt, gmm, backend=backend)
    assert_output(q, xt, torch.float32, (0,))
    assert_output(comp, xt, torch.int64, (0,))


def test_cpu_and_torch_backends_agree_float32():
    rng = np.random.default_rng(9)
    gmm = random_mixture(rng, 6, 33, cond=100.0)
    x = samples(rng, gmm, 301).astype(np.float32)
    v_cpu, g_cpu = gmm_log_prob_grad(x, gmm, backend="cpu")
    v_t, g_t = gmm_log_prob_grad(x, gmm, backend="torch")
    assert_rel(v_cpu, v_t, 2e-5, floor=1.0, what="log_prob")
    assert_rel(g_cpu, g_t, 1e-4, scale="row", floor=1e-12, what="grad")


@pytest.mark.parametrize("mode", ["loglik", "nearest"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 17, 64, 130])
def test_cpu_simd_and_blas_paths_and_row_tiles_agree(mode, dtype, d):
    """The SIMD small-d triangular products and OpenBLAS trmm give the same answer for any row tiling."""
    from engine import _C

    rng = np.random.default_rng(d)
    gmm = random_mixture(rng, 3, d)
    entry = tuple(a.astype(dtype) for a in (samples(rng, gmm, 37), gmm.means, gmm.precisions_cholesky, gmm.log_norm))
    (v0, g0, c0), *_ = _C.gmm([entry], mode, True, 0, 0)  # BLAS, automatic tiles
    for row_tile, simd_max_dim in [(1, 4096), (3, 0), (8, 4096), (64, 4096)]:
        ((v1, g1, c1),) = _C.gmm([entry], mode, True, row_tile, simd_max_dim)
        assert_log_prob(v1, v0, dtype, f"value tile={row_tile} simd={simd_max_dim}")
        assert_grad(g1, g0, dtype, f"grad tile={row_tile} simd={simd_max_dim}")
        np.testing.assert_array_equal(c1, c0)


@pytest.mark.parametrize("simd_max_dim", [0, 4096])
def test_cpu_multithreaded_call_matches_reference(simd_max_dim):
    """Big enough (rows * K * d * (d + 8) > kGmmMinParallelWork) to run the OpenMP path, both product kinds."""
    from engine import _C

    rng = np.random.default_rng(12)
    gmm = random_mixture(rng, 12, 48)
    x = samples(rng, gmm, 2000)
    ((value, grad, comp),) = _C.gmm(
        [(x, gmm.means, gmm.precisions_cholesky, gmm.log_norm)], "loglik", True, 0, simd_max_dim
    )
    ref_value, ref_grad = reference.gmm_log_prob_grad(torch.from_numpy(x), *ref_args(gmm))
    assert_log_prob(value, ref_value, np.float64)
    assert_grad(grad, ref_grad, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 17, 130])
def test_cpu_prepacked_factors_agree_with_packing_per_call(dtype, d):
    """gmm_pack's factors as a fifth layer element give the same answer as packing inside the call."""
    from engine import _C

    rng = np.random.default_rng(d + 100)
    gmm = random_mixture(rng, 4, d)
    entry = tuple(a.astype(dtype) for a in (samples(rng, gmm, 29), gmm.means, gmm.precisions_cholesky, gmm.log_norm))
    packed = _C.gmm_pack(entry[2])
    assert packed.dtype == dtype and packed.ndim == 1
    for mode in ("loglik", "nearest"):
        ((v0, g0, c0),) = _C.gmm([entry], mode, True, 8, 4096)
        ((v1, g1, c1),) = _C.gmm([(*entry, packed)], mode, True, 8, 4096)
        ((v2, g2, c2),) = _C.gmm([(*entry, None)], mode, True, 8, 4096)
        for v, g, c in ((v1, g1, c1), (v2, g2, c2)):
            np.testing.assert_array_equal(v, v0)
            np.testing.assert_array_equal(g, g0)
            np.testing.assert_array_equal(c, c0)


def test_cpu_backend_repacks_factors_modified_in_place():
    """The CPU backend caches packed factors on the mixture's factor tensor and rebuilds them after an edit."""
    rng = np.random.default_rng(5)
    gmm = random_mixture(rng, 3, 6)
    x = samples(rng, gmm, 11)
    before = gmm_log_prob(x, gmm, backend="cpu")
    _, chol, _ = gmm.tensors(torch.float64)
    chol.mul_(1.5)  # an in-place edit of the cached tensor (both backends read it): the quadratic term changes
    after = gmm_log_prob(x, gmm, backend="cpu")
    torch_after = gmm_log_prob(x, gmm, backend="torch")
    assert not np.allclose(after, before)
    assert_rel(after, torch_after, 1e-10, floor=1.0, what="log_prob after in-place edit")


def test_gmm_pack_validation():
    from engine import _C

    with pytest.raises(ValueError, match=r"prec_chol must have shape \(K, d, d\)"):
        _C.gmm_pack(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="prec_chol must be float32 or float64"):
        _C.gmm_pack(np.zeros((2, 3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="prec_chol must be C-contiguous"):
        _C.gmm_pack(np.zeros((3, 3, 2)).transpose(2, 0, 1))
    x, means, chol = np.zeros((2, 3)), np.zeros((2, 3)), np.tile(np.eye(3), (2, 1, 1))
    with pytest.raises(ValueError, match=r"layer 0: packed must have shape \(\d+,\)"):
        _C.gmm([(x, means, chol, np.zeros(2), np.zeros(5))], "loglik", True)
    with pytest.raises(ValueError, match=r"expected a tuple \(x, means, prec_chol, log_norm\[, packed\]\)"):
        _C.gmm([(x, means, chol)], "loglik", True)


# ---- properties -----------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 5), d=st.integers(1, 6))
def test_permuting_components_leaves_log_prob_unchanged(backend, seed, k, d):
    rng = np.random.default_rng(seed)
    gmm = random_mixture(rng, k, d)
    perm = rng.permutation(k)
    permuted = GaussianMixture(gmm.means[perm], gmm.precisions_cholesky[perm], gmm.weights[perm])
    x = put(samples(rng, gmm, 8), backend)
    v0, g0 = gmm_log_prob_grad(x, gmm, backend=backend)
    v1, g1 = gmm_log_prob_grad(x, permuted, backend=backend)
    assert_rel(v1, v0, 1e-12, atol=1e-12, what="log_prob")
    assert_rel(g1, g0, 1e-9, atol=1e-9, what="grad")
    q0, c0 = gmm_nearest(x, gmm, backend=backend)
    q1, c1 = gmm_nearest(x, permuted, backend=backend)
    assert_rel(q1, q0, 1e-12, atol=1e-12, what="sq_mahalanobis")
    np.testing.assert_array_equal(perm[to_numpy(c1)], to_numpy(c0))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), shift=st.floats(-100, 100))
def test_translation_equivariance(backend, seed, shift):
    rng = np.random.default_rng(seed)
    gmm = random_mixture(rng, 3, 4)
    t = shift * rng.uniform(0.5, 1.0, size=4)
    moved = GaussianMixture(gmm.means + t, gmm.precisions_cholesky, gmm.weights)
    x = samples(rng, gmm, 6)
    v0, g0 = gmm_log_prob_grad(put(x, backend), gmm, backend=backend)
    v1, g1 = gmm_log_prob_grad(put(x + t, backend), moved, backend=backend)
    assert_rel(v1, v0, 1e-9, atol=1e-9, what="log_prob")
    assert_rel(g1, g0, 1e-6, atol=1e-8, what="grad")


# ---- bad input ------------------------------------------------------------------------------------------------


@pytest.fixture
def gmm3() -> GaussianMixture:
    return random_mixture(np.random.default_rng(0), 2, 3)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (np.zeros(3), ValueError, "x must have 2 dimensions"),
        (np.zeros((2, 3, 1)), ValueError, "x must have 2 dimensions"),
        (np.zeros((2, 4)), ValueError, r"x must have shape \(N, 3\)"),
        (np.array([[0.0, np.nan, 0.0]]), ValueError, "x contains NaN or inf"),
        (np.array([[0.0, np.inf, 0.0]], np.float32), ValueError, "x contains NaN or inf"),
        (np.zeros((2, 3), np.int64), TypeError, "x must be float32 or float64"),
        ([[0.0, 0.0, 0.0]], TypeError, "x must be a numpy array or torch tensor"),
    ],
)
def test_bad_x_raises(gmm3, backend, x, error, match):
    with pytest.raises(error, match=match):
        gmm_log_prob_grad(x, gmm3, backend=backend)


def test_bad_gmm_and_backend_raise(gmm3):
    x = np.zeros((2, 3))
    with pytest.raises(TypeError, match="gmm must be an engine.GaussianMixture"):
        gmm_log_prob(x, object())
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \('cpu', 'torch'"):
        gmm_log_prob(x, gmm3, backend="nope")
    with pytest.raises(ValueError, match=r"backend 'cuda' is unavailable .* available: \[.*'cpu'.*'torch'"):
        gmm_log_prob(x, gmm3, backend="cuda")
    assert {"cpu", "torch"} <= set(_backend.available("gmm", "cpu"))


def test_cpp_side_validation(gmm3):
    from engine import _C

    x = np.zeros((2, 3))
    means, chol, log_norm = gmm3.means, gmm3.precisions_cholesky, gmm3.log_norm
    with pytest.raises(ValueError, match="mode must be 'loglik' or 'nearest'"):
        _C.gmm([(x, means, chol, log_norm)], "closest", True)
    with pytest.raises(ValueError, match=r"layer 0: means must have shape \(2, 3\)"):
        _C.gmm([(x, means[:, :2].copy(), chol, log_norm)], "loglik", True)
    with pytest.raises(ValueError, match=r"layer 1: prec_chol must have shape \(2, 3, 3\)"):
        _C.gmm([(x, means, chol, log_norm), (x, means, chol[:, :2].copy(), log_norm)], "loglik", True)
    with pytest.raises(ValueError, match="log_norm must have dtype float64 like x"):
        _C.gmm([(x, means, chol, log_norm.astype(np.float32))], "loglik", True)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        _C.gmm([(np.zeros((3, 2)).T, means, chol, log_norm)], "loglik", True)
    with pytest.raises(ValueError, match="dimension d must be >= 1"):
        _C.gmm([(np.zeros((2, 0)), np.zeros((2, 0)), np.zeros((2, 0, 0)), log_norm)], "loglik", True)
    with pytest.raises(ValueError, match="number of components K must be >= 1"):
        _C.gmm([(x, np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros(0))], "loglik", True)
    with pytest.raises(ValueError, match="x must be float32 or float64"):
        _C.gmm([(x.astype(np.int32), means, chol, log_norm)], "loglik", True)
