"""Triton kernels (engine.kernels) under TRITON_INTERPRET=1 on CPU tensors, against engine.reference (fp64) and,
through the public API, against the C++ "cpu" backend.

The registry routes backend "triton" to CPU tensors only when TRITON_INTERPRET=1, so it is set before anything
imports triton. The interpreter is slow: shapes stay tiny, and odd (not multiples of the 32/16 tiles) to
exercise masking.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from engine.kernels import gmm as tgmm  # noqa: E402
from engine.kernels import kde as tkde  # noqa: E402
from engine.kernels import knn as tknn  # noqa: E402
from engine.kernels import mahalanobis as tmaha  # noqa: E402

from engine import reference as ref  # noqa: E402
from engine.mixture import GaussianMixture  # noqa: E402
from engine.ops import _backend  # noqa: E402

DTYPES = (torch.float32, torch.float64)
# Relative tolerances against the fp64 reference: (values / log-probs, gradients), per dtype.
TOL = {torch.float32: (1e-4, 1e-3), torch.float64: (1e-10, 1e-8)}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max-norm relative error max|got - want| / max|want| (fp64)."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def make_mixture(k: int, d: int, seed: int, offset: float = 10.0, cond: float = 1e4) -> GaussianMixture:
    """Random mixture far from the origin with covariance eigenvalues spread over ``cond``."""
    g = torch.Generator().manual_seed(seed)
    means = offset + torch.randn(k, d, generator=g, dtype=torch.float64)
    factors = []
    for _ in range(k):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        eig = torch.logspace(0, math.log10(cond), d, dtype=torch.float64) * 1e-2
        cov = q @ torch.diag(eig) @ q.T
        factors.append(torch.linalg.cholesky(torch.linalg.inv(cov)))  # lower; the mixture canonicalises to upper
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    return GaussianMixture(means, torch.stack(factors), weights / weights.sum())


def sample_near(gm: GaussianMixture, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor(gm.means)
    pick = torch.randint(0, gm.n_components, (n,), generator=g)
    return means[pick] + 0.3 * torch.randn(n, gm.dim, generator=g, dtype=torch.float64)


def points(n: int, d: int, seed: int, offset: float = 5.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return offset + torch.randn(n, d, generator=g, dtype=torch.float64)


def reference_args(gm: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(gm.means), torch.tensor(gm.precisions_cholesky), torch.tensor(gm.weights)


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_routes_triton_to_cpu_tensors_under_interpreter():
    for op, fn in (("gmm", tgmm.gmm), ("mahalanobis", tmaha.mahalanobis), ("knn", tknn.knn), ("kde", tkde.kde)):
        assert _backend.resolve(op, "triton", torch.device("cpu")) is fn


# ---------------------------------------------------------------------------------------------------------------
# GMM


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d", "k"), [(33, 17, 3), (1, 1, 1), (20, 16, 2), (5, 40, 2)])
def test_gmm_matches_reference(dtype, n, d, k):
    gm = make_mixture(k, d, seed=n + d + k)
    x = sample_near(gm, n, seed=1)
    layer = (x.to(dtype), *gm.tensors(dtype))
    ((value, grad, comp),) = tgmm.gmm([layer], "loglik", True)
    want_value, want_grad = ref.gmm_log_prob_grad(x, *reference_args(gm))
    want_q, want_comp = ref.gmm_nearest(x, *reference_args(gm))
    tol_v, tol_g = TOL[dtype]
    assert value.dtype == dtype and grad.dtype == dtype and comp.dtype == torch.int64
    assert rel_err(value, want_value) < tol_v
    assert rel_err(grad, want_grad) < tol_g
    assert torch.equal(comp, want_comp)

    ((q, q_grad, q_comp),) = tgmm.gmm([layer], "nearest", True)
    x64 = x.clone().requires_grad_(True)
    means, prec_chol, _ = reference_args(gm)
    y = torch.einsum("nd,nde->ne", x64 - means[want_comp], prec_chol[want_comp])
    (want_q_grad,) = torch.autograd.grad((y**2).sum(), x64)
    assert torch.equal(q_comp, want_comp)
    assert rel_err(q, want_q) < tol_v
    assert rel_err(q_grad, want_q_grad) < tol_g


def test_gmm_multi_layer_and_no_grad():
    mixtures = [make_mixture(3, 17, seed=3), make_mixture(1, 5, seed=4)]
    xs = [sample_near(gm, n, seed=5) for gm, n in zip(mixtures, (9, 4), strict=True)]
    layers = [(x.float(), *gm.tensors(torch.float32)) for x, gm in zip(xs, mixtures, strict=True)]
    results = tgmm.gmm(layers, "loglik", False)
    assert len(results) == 2
    for (value, grad, _), x, gm in zip(results, xs, mixtures, strict=True):
        assert grad is None
        assert rel_err(value, ref.gmm_log_prob(x, *reference_args(gm))) < TOL[torch.float32][0]


def test_gmm_empty_batch_and_bad_dtype():
    gm = make_mixture(2, 3, seed=0)
    ((value, grad, comp),) = tgmm.gmm([(torch.empty(0, 3), *gm.tensors(torch.float32))], "loglik", True)
    assert value.shape == (0,) and grad.shape == (0, 3) and comp.shape == (0,)
    layer = (torch.zeros(2, 3, dtype=torch.float16), *gm.tensors(torch.float32))
    with pytest.raises(TypeError, match="float16"):
        tgmm.gmm([layer], "loglik", True)
    with pytest.raises(ValueError, match="mode"):
        tgmm.gmm([layer], "mean", True)


# ---------------------------------------------------------------------------------------------------------------
# Mahalanobis


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "d", "c"), [(33, 17, 3), (1, 1, 1), (7, 16, 2), (3, 40, 5)])
def test_mahalanobis_matches_reference(dtype, n, d, c):
    g = torch.Generator().manual_seed(n * d)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    precision = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    x, means = points(n, d, seed=1, offset=20.0), points(c, d, seed=2, offset=20.0)
    other_x = points(5, d, seed=3)
    out = tmaha.mahalanobis(
        [(x.to(dtype), means.to(dtype), precision.to(dtype)), (other_x.to(dtype), means.to(dtype), precision.to(dtype))]
    )
    assert [o.shape for o in out] == [(n, c), (5, c)] and out[0].dtype == dtype
    assert rel_err(out[0], ref.mahalanobis(x, means, precision)) < TOL[dtype][0]
    assert rel_err(out[1], ref.mahalanobis(other_x, means, precision)) < TOL[dtype][0]


def test_mahalanobis_rejects_indefinite_precision():
    precision = torch.diag(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="positive definite"):
        tmaha.mahalanobis([(torch.zeros(3, 2), torch.zeros(1, 2), precision)])


# ---------------------------------------------------------------------------------------------------------------
# k-NN


def check_knn(x: torch.Tensor, refs: torch.Tensor, k: int, exclude_self: bool, dtype: torch.dtype) -> None:
    dist, index = tknn.knn(x.to(dtype).contiguous(), refs.to(dtype).contiguous(), k, exclude_self)
    assert dist.shape == (x.shape[0], k) and dist.dtype == dtype and index.dtype == torch.int64
    assert rel_err(dist, ref.knn_distances(x, refs, k, exclude_self)) < TOL[dtype][0]
    # the indices point at references at exactly those distances (ties may pick either index)
    direct = ref.pairwise_distances(x, refs).gather(1, index)
    assert rel_err(dist, direct) < TOL[dtype][0]
    if exclude_self:
        assert not (index == torch.arange(x.shape[0])[:, None]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "m", "d", "k"), [(33, 40, 17, 6), (1, 2, 1, 1), (7, 5, 16, 4), (9, 37, 3, 20)])
def test_knn_matches_reference(dtype, n, m, d, k):
    check_knn(points(n, d, seed=1), points(m, d, seed=2), k, False, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_exclude_self_near_duplicates(dtype):
    base = points(20, 9, seed=3, offset=100.0)
    g = torch.Generator().manual_seed(4)
    refs = torch.cat([base, base[:13] + 1e-3 * torch.randn(13, 9, generator=g, dtype=torch.float64)])
    check_knn(refs, refs, 7, True, dtype)
    check_knn(refs[:2], refs[:2], 1, True, dtype)  # M = k + 1


@pytest.mark.parametrize("descending", [False, True])
def test_knn_reference_tiles_sorted_by_distance(descending):
    """Later reference tiles improve no row (skipped) or every tile improves every row (always merged)."""
    refs = 0.5 * torch.arange(1, 71, dtype=torch.float64)[:, None]
    refs = refs.flip(0) if descending else refs
    check_knn(torch.tensor([[0.0], [0.2]], dtype=torch.float64), refs, 3, False, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# KDE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "m", "d", "h"), [(33, 40, 17, 0.7), (1, 1, 1, 2.0), (6, 35, 16, 0.3)])
def test_kde_matches_reference(dtype, n, m, d, h):
    x, refs = points(n, d, seed=1), points(m, d, seed=2)
    out = tkde.kde(x.to(dtype), refs.to(dtype), h)
    assert out.shape == (n,) and out.dtype == dtype
    assert rel_err(out, ref.kde_log_density(x, refs, h)) < TOL[dtype][0]


def test_knn_kde_empty_batch_and_bad_dtype():
    refs = points(4, 3, seed=0).float()
    dist, index = tknn.knn(torch.empty(0, 3), refs, 2, False)
    assert dist.shape == (0, 2) and index.shape == (0, 2)
    assert tkde.kde(torch.empty(0, 3), refs, 1.0).shape == (0,)
    with pytest.raises(TypeError, match="float16"):
        tkde.kde(refs.half(), refs.half(), 1.0)
    with pytest.raises(TypeError, match="int64"):
        tknn.knn(refs.long(), refs.long(), 1, False)


# ---------------------------------------------------------------------------------------------------------------
# Triton vs the C++ kernels through the public API (non-contiguous numpy/torch input, validation by the wrappers)


def cpu_available(op: str) -> bool:
    return "cpu" in _backend.available(op, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_gmm_triton_agrees_with_cpu(dtype):
    from engine import ops

    if not cpu_available("gmm"):
        pytest.skip("C++ gmm kernel not built")
    gm = make_mixture(3, 17, seed=7)
    x = sample_near(gm, 30, seed=8).to(dtype).T.contiguous().T  # non-contiguous
    tol_v, tol_g = TOL[dtype]
    for fn, tols in ((ops.gmm_log_prob_grad, (tol_v, tol_g)), (ops.gmm_nearest, (tol_v, 0))):
        got = fn(x, gm, backend="triton")
        want = fn(x, gm, backend="cpu")
        assert rel_err(got[0], want[0]) < tols[0]
        if tols[1]:
            assert rel_err(got[1], want[1]) < tols[1]
        else:
            assert torch.equal(got[1], want[1])
    features = [x, sample_near(make_mixture(2, 5, seed=9), 30, seed=10).to(dtype)]
    mixtures = [gm, make_mixture(2, 5, seed=9)]
    for mode in ("loglik", "nearest"):
        grads = []
        for backend in ("triton", "cpu"):
            leaves = [f.clone().requires_grad_(True) for f in features]
            loss = ops.hfc_loss(leaves, mixtures, mode=mode, backend=backend)
            loss.backward()
            grads.append((loss.detach(), [leaf.grad for leaf in leaves]))
        (loss_t, grads_t), (loss_c, grads_c) = grads
        assert rel_err(loss_t, loss_c) < tol_v
        for g_t, g_c in zip(grads_t, grads_c, strict=True):
            assert rel_err(g_t, g_c) < tol_g


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_public_maha_knn_kde_triton_agree_with_cpu(dtype):
    from engine import ops

    tol = TOL[torch.float32 if dtype == np.float32 else torch.float64][0]
    rng = np.random.default_rng(0)
    x = (5 + rng.standard_normal((17, 29))).astype(dtype)[:, ::2]  # non-contiguous (17, 15)
    refs = (5 + rng.standard_normal((31, 15))).astype(dtype)
    a = rng.standard_normal((15, 15))
    precision = (a @ a.T / 15 + 0.1 * np.eye(15)).astype(dtype)
    checks = [
        ("mahalanobis", lambda b: ops.mahalanobis(x, refs[:3], precision, backend=b)),
        ("knn", lambda b: ops.knn_distances(x, refs, 5, backend=b)),
        ("knn", lambda b: ops.knn_distances(refs, refs, 5, exclude_self=True, backend=b)),
        ("knn", lambda b: ops.lid(x, refs, k=6, backend=b)),
        ("kde", lambda b: ops.kde_log_density(x, refs, 0.8, backend=b)),
    ]
    for op, run in checks:
        if not cpu_available(op):
            continue
        got, want = run("triton"), run("cpu")
        assert isinstance(got, np.ndarray) and got.dtype == dtype
        assert rel_err(torch.from_numpy(got), torch.from_numpy(want)) < tol, op
    if cpu_available("knn"):  # random data has no ties, so the neighbour indices agree exactly
        got = ops.knn_distances(x, refs, 5, return_index=True, backend="triton")[1]
        want = ops.knn_distances(x, refs, 5, return_index=True, backend="cpu")[1]
        np.testing.assert_array_equal(got, want)
