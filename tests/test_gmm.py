"""GMM kernels (engine.ops.gmm) against sklearn, the fp64 reference and fp64 torch autograd, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from engine import reference
from engine.mixture import GaussianMixture
from engine.ops import _backend
from engine.ops.gmm import gmm_log_prob, gmm_log_prob_grad, gmm_nearest

BACKENDS = ["cpu", "torch"]
# Relative tolerances per dtype: (log-prob, gradient); DESIGN.md "Numerics".
TOL = {np.float32: (1e-4, 1e-3), np.float64: (1e-10, 1e-8)}
SHAPES = [(1, 1, 1), (41, 7, 3), (130, 17, 5), (9, 3, 1)]


def random_mixture(
    rng: np.random.Generator, k: int, d: int, cond: float = 10.0, offset: float = 0.0, spread: float = 3.0
) -> GaussianMixture:
    """K random components; precision eigenvalues log-spaced over [1, cond]; lower factors (canonicalised)."""
    means = offset + spread * rng.normal(size=(k, d))
    factors = []
    for _ in range(k):
        basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
        precision = (basis * np.logspace(0, np.log10(cond), d)) @ basis.T
        factors.append(np.linalg.cholesky(precision))
    weights = rng.uniform(0.5, 1.5, size=k)
    return GaussianMixture(means, np.stack(factors), weights / weights.sum())


def samples(rng: np.random.Generator, gmm: GaussianMixture, n: int, scale: float = 0.7) -> np.ndarray:
    """Points near the mixture's components."""
    return gmm.means[rng.integers(gmm.n_components, size=n)] + scale * rng.normal(size=(n, gmm.dim))


def relu_features(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """GAP-like features: nonnegative, per-channel offsets 50..100, strongly correlated, two clusters."""
    mixing = rng.normal(size=(d, d)) * np.logspace(0, -2, d)[:, None]
    cluster = rng.integers(2, size=n)[:, None] * rng.normal(scale=3.0, size=d)
    return np.maximum(rng.uniform(50, 100, size=d) + cluster + rng.normal(size=(n, d)) @ mixing, 0.0)


def ref_args(gmm: GaussianMixture) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(a) for a in (gmm.means, gmm.precisions_cholesky, gmm.weights))


def assert_rel(actual, expected, rtol: float, what: str, rowwise: bool = False) -> None:
    """|a - e| <= rtol * max(|e|, 1) elementwise, or per-row norms when ``rowwise``; prints the worst rows."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    if rowwise:
        err = np.linalg.norm(a - e, axis=1) / np.maximum(np.linalg.norm(e, axis=1), 1e-12)
    else:
        err = np.abs(a - e) / np.maximum(np.abs(e), 1.0)
    bad = np.flatnonzero(err > rtol)
    assert bad.size == 0, f"{what}: {bad.size} rows exceed rtol {rtol}, worst {err.max():.3g} at rows {bad[:10]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_log_prob_and_grad_match_reference(backend, dtype, n, d, k):
    rng = np.random.default_rng(n * 100 + d * 10 + k)
    gmm = random_mixture(rng, k, d)
    x = samples(rng, gmm, n).astype(dtype)
    x64 = torch.from_numpy(x.astype(np.float64))
    ref_value, ref_grad = reference.gmm_log_prob_grad(x64, *ref_args(gmm))
    value, grad = gmm_log_prob_grad(x, gmm, backend=backend)
    assert value.dtype == dtype and grad.dtype == dtype and grad.shape == (n, d)
    assert_rel(value, ref_value, TOL[dtype][0], "log_prob")
    assert_rel(grad, ref_grad, TOL[dtype][1], "grad", rowwise=True)
    assert_rel(gmm_log_prob(x, gmm, backend=backend), ref_value, TOL[dtype][0], "log_prob only")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_nearest_matches_reference(backend, dtype, n, d, k):
    rng = np.random.default_rng(7 + n + d + k)
    gmm = random_mixture(rng, k, d)
    x = samples(rng, gmm, n).astype(dtype)
    ref_q, ref_k = reference.gmm_nearest(torch.from_numpy(x), *ref_args(gmm))
    q, comp = gmm_nearest(x, gmm, backend=backend)
    assert comp.dtype == np.int64
    np.testing.assert_array_equal(comp, ref_k.numpy())
    assert_rel(q, ref_q, TOL[dtype][0], "sq_mahalanobis")


def rounded(gmm: GaussianMixture, dtype) -> GaussianMixture:
    """The mixture whose parameters are exactly those a ``dtype`` kernel sees."""
    return GaussianMixture(*(a.astype(dtype) for a in (gmm.means, gmm.precisions_cholesky, gmm.weights)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_sklearn_on_realistic_offset_features_float32(backend):
    """Fitted on ReLU-like offset features. Rounding the means (~75) to float32 alone moves log p by ~3e-4 nats
    here, so the kernel is held to 1e-4 against the exact float32 problem and must add little to that error."""
    rng = np.random.default_rng(3)
    feats = relu_features(rng, 400, 24)
    sk = SkGaussianMixture(4, covariance_type="full", reg_covar=1e-4, random_state=0).fit(feats)
    gmm = GaussianMixture.from_sklearn(sk)
    x = feats[:60].astype(np.float32)
    ref_value = reference.gmm_log_prob(torch.from_numpy(x), *ref_args(gmm))
    assert_rel(sk.score_samples(x.astype(np.float64)), ref_value, 1e-10, "sklearn vs reference")
    assert_float32_close(x, gmm, backend)


def assert_float32_close(x: np.ndarray, gmm: GaussianMixture, backend: str) -> None:
    """Float32 kernel vs the exact answer for float32-rounded inputs (DESIGN tolerances), and its error against the
    fp64 parameters at most 1.5x what rounding the parameters alone causes."""
    x64 = torch.from_numpy(x.astype(np.float64))
    exact_value, exact_grad = reference.gmm_log_prob_grad(x64, *ref_args(rounded(gmm, np.float32)))
    value, grad = gmm_log_prob_grad(x, gmm, backend=backend)
    assert_rel(value, exact_value, TOL[np.float32][0], "log_prob")
    assert_rel(grad, exact_grad, TOL[np.float32][1], "grad", rowwise=True)
    ref_value = reference.gmm_log_prob(x64, *ref_args(gmm)).numpy()
    inherent = np.abs(exact_value.numpy() - ref_value).max()
    assert np.abs(value - ref_value).max() <= 1.5 * inherent + 1e-5


def test_uncentred_form_fails_but_centred_kernel_passes():
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
    for backend in BACKENDS:
        assert_rel(gmm_log_prob(x, gmm, backend=backend), ref, TOL[np.float32][0], f"centred {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ill_conditioned_covariance(backend):
    rng = np.random.default_rng(5)
    gmm = random_mixture(rng, 3, 12, cond=1e6, offset=50.0)
    x = samples(rng, gmm, 40, scale=0.002).astype(np.float32)
    assert_float32_close(x, gmm, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_torch_input_returns_torch(backend):
    rng = np.random.default_rng(2)
    gmm = random_mixture(rng, 3, 5)
    big = torch.from_numpy(samples(rng, gmm, 40).T.copy()).T[::2]  # column-major, every other row
    assert not big.is_contiguous()
    value, grad = gmm_log_prob_grad(big, gmm, backend=backend)
    assert isinstance(value, torch.Tensor) and isinstance(grad, torch.Tensor)
    ref_value, ref_grad = reference.gmm_log_prob_grad(big, *ref_args(gmm))
    assert_rel(value, ref_value, 1e-10, "log_prob")
    assert_rel(grad, ref_grad, 1e-8, "grad", rowwise=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_returns_empty(backend):
    gmm = random_mixture(np.random.default_rng(0), 2, 3)
    value, grad = gmm_log_prob_grad(np.zeros((0, 3), np.float32), gmm, backend=backend)
    assert value.shape == (0,) and grad.shape == (0, 3) and value.dtype == np.float32
    q, comp = gmm_nearest(torch.zeros(0, 3), gmm, backend=backend)
    assert q.shape == (0,) and comp.shape == (0,)


def test_cpu_and_torch_backends_agree_float32():
    rng = np.random.default_rng(9)
    gmm = random_mixture(rng, 6, 33, cond=100.0)
    x = samples(rng, gmm, 301).astype(np.float32)
    v_cpu, g_cpu = gmm_log_prob_grad(x, gmm, backend="cpu")
    v_t, g_t = gmm_log_prob_grad(x, gmm, backend="torch")
    assert_rel(v_cpu, v_t, 2e-5, "log_prob")
    assert_rel(g_cpu, g_t, 1e-4, "grad", rowwise=True)


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
    tol = TOL[dtype]
    for row_tile, simd_max_dim in [(1, 4096), (3, 0), (8, 4096), (64, 4096)]:
        ((v1, g1, c1),) = _C.gmm([entry], mode, True, row_tile, simd_max_dim)
        assert_rel(v1, v0, tol[0], f"value tile={row_tile} simd={simd_max_dim}")
        assert_rel(g1, g0, tol[1], f"grad tile={row_tile} simd={simd_max_dim}", rowwise=True)
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
    assert_rel(value, ref_value, TOL[np.float64][0], "log_prob")
    assert_rel(grad, ref_grad, TOL[np.float64][1], "grad", rowwise=True)


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
    assert_rel(after, torch_after, 1e-10, "log_prob after in-place edit")


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
@given(seed=st.integers(0, 2**31), k=st.integers(1, 5), d=st.integers(1, 6), backend=st.sampled_from(BACKENDS))
def test_permuting_components_leaves_log_prob_unchanged(seed, k, d, backend):
    rng = np.random.default_rng(seed)
    gmm = random_mixture(rng, k, d)
    perm = rng.permutation(k)
    permuted = GaussianMixture(gmm.means[perm], gmm.precisions_cholesky[perm], gmm.weights[perm])
    x = samples(rng, gmm, 8)
    v0, g0 = gmm_log_prob_grad(x, gmm, backend=backend)
    v1, g1 = gmm_log_prob_grad(x, permuted, backend=backend)
    np.testing.assert_allclose(v1, v0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g1, g0, rtol=1e-9, atol=1e-9)
    q0, c0 = gmm_nearest(x, gmm, backend=backend)
    q1, c1 = gmm_nearest(x, permuted, backend=backend)
    np.testing.assert_allclose(q1, q0, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(perm[c1], c0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), shift=st.floats(-100, 100), backend=st.sampled_from(BACKENDS))
def test_translation_equivariance(seed, shift, backend):
    rng = np.random.default_rng(seed)
    gmm = random_mixture(rng, 3, 4)
    t = shift * rng.uniform(0.5, 1.0, size=4)
    moved = GaussianMixture(gmm.means + t, gmm.precisions_cholesky, gmm.weights)
    x = samples(rng, gmm, 6)
    v0, g0 = gmm_log_prob_grad(x, gmm, backend=backend)
    v1, g1 = gmm_log_prob_grad(x + t, moved, backend=backend)
    np.testing.assert_allclose(v1, v0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(g1, g0, rtol=1e-6, atol=1e-8)


# ---- bad input ------------------------------------------------------------------------------------------------


@pytest.fixture
def gmm3() -> GaussianMixture:
    return random_mixture(np.random.default_rng(0), 2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
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
