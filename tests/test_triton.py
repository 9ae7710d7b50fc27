"""Triton kernels (engine.kernels) called directly under TRITON_INTERPRET=1 on CPU tensors, against engine.reference
(fp64): the backend contract itself, on odd shapes (not multiples of the 32/16 tiles) to exercise masking.

Where CUDA is absent, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton (the registry
routes backend "triton" to CPU tensors only then). The public API over every backend, "triton" included
(numpy/torch and non-contiguous input, N = 1, d = 1, K = 1, both dtypes, ill-conditioned data), is tested in
test_gmm.py, test_hfc_loss.py, test_knn.py, test_kde.py and test_mahalanobis.py.
The interpreter is slow: shapes stay tiny.
"""

import os

import numpy as np
import pytest
import torch
from support import TOL, assert_rel, class_data, query_batch, random_mixture, ref_args, samples

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it where CUDA is absent
    pytest.skip(
        "direct kernel calls on CPU tensors need TRITON_INTERPRET=1; with CUDA the op tests run triton on the GPU",
        allow_module_level=True,
    )

from engine.kernels import gmm as tgmm  # noqa: E402
from engine.kernels import kde as tkde  # noqa: E402
from engine.kernels import knn as tknn  # noqa: E402
from engine.kernels import mahalanobis as tmaha  # noqa: E402

from engine import reference as ref  # noqa: E402
from engine.mixture import GaussianMixture  # noqa: E402
from engine.ops import _backend  # noqa: E402

DTYPES = (torch.float32, torch.float64)


def assert_max_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "") -> None:
    """Max-norm relative error max|got - want| / max|want| <= rtol."""
    assert_rel(got, want, rtol, scale="max", floor=1e-300, what=what)


def make_mixture(k: int, d: int, seed: int) -> GaussianMixture:
    """Random mixture 10 away from the origin, precision eigenvalues over [1e-2, 1e2]."""
    return random_mixture(np.random.default_rng(seed), k, d, cond=1e4, offset=10.0, spread=1.0, lowest=1e-2)


def sample_near(gm: GaussianMixture, n: int, seed: int) -> torch.Tensor:
    """(n, d) float64 points 0.3 (standard deviation) around the mixture's means."""
    return torch.from_numpy(samples(np.random.default_rng(seed), gm, n, scale=0.3))


def knn_batch(n: int, m: int, d: int, seed: int, offset: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 queries (n, d) and references (m, d) around ``offset``."""
    x, refs = query_batch(np.random.default_rng(seed), n, m, d, offset=offset)
    return torch.from_numpy(x), torch.from_numpy(refs)


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
    want_value, want_grad = ref.gmm_log_prob_grad(x, *ref_args(gm))
    want_q, want_comp = ref.gmm_nearest(x, *ref_args(gm))
    tol = TOL[dtype]
    assert value.dtype == dtype and grad.dtype == dtype and comp.dtype == torch.int64
    assert_max_rel(value, want_value, tol.value, "log_prob")
    assert_max_rel(grad, want_grad, tol.grad, "grad")
    assert torch.equal(comp, want_comp)

    ((q, q_grad, q_comp),) = tgmm.gmm([layer], "nearest", True)
    x64 = x.clone().requires_grad_(True)
    means, prec_chol, _ = ref_args(gm)
    y = torch.einsum("nd,nde->ne", x64 - means[want_comp], prec_chol[want_comp])
    (want_q_grad,) = torch.autograd.grad((y**2).sum(), x64)
    assert torch.equal(q_comp, want_comp)
    assert_max_rel(q, want_q, tol.value, "sq_mahalanobis")
    assert_max_rel(q_grad, want_q_grad, tol.grad, "nearest grad")


def test_gmm_multi_layer_and_no_grad():
    mixtures = [make_mixture(3, 17, seed=3), make_mixture(1, 5, seed=4)]
    xs = [sample_near(gm, n, seed=5) for gm, n in zip(mixtures, (9, 4), strict=True)]
    layers = [(x.float(), *gm.tensors(torch.float32)) for x, gm in zip(xs, mixtures, strict=True)]
    results = tgmm.gmm(layers, "loglik", False)
    assert len(results) == 2
    for i, ((value, grad, _), x, gm) in enumerate(zip(results, xs, mixtures, strict=True)):
        assert grad is None
        assert_max_rel(value, ref.gmm_log_prob(x, *ref_args(gm)), TOL[torch.float32].value, f"layer {i}")


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
    rng = np.random.default_rng(n * d)
    x, means, precision = (torch.from_numpy(a) for a in class_data(rng, n, c, d, offset=20.0))
    other_x = torch.from_numpy(5.0 + rng.normal(size=(5, d)))  # a second layer, away from the class means
    out = tmaha.mahalanobis(
        [(x.to(dtype), means.to(dtype), precision.to(dtype)), (other_x.to(dtype), means.to(dtype), precision.to(dtype))]
    )
    assert [o.shape for o in out] == [(n, c), (5, c)] and out[0].dtype == dtype
    assert_max_rel(out[0], ref.mahalanobis(x, means, precision), TOL[dtype].value, "layer 0")
    assert_max_rel(out[1], ref.mahalanobis(other_x, means, precision), TOL[dtype].value, "layer 1")


def test_mahalanobis_rejects_indefinite_precision():
    precision = torch.diag(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="positive definite"):
        tmaha.mahalanobis([(torch.zeros(3, 2), torch.zeros(1, 2), precision)])


# ---------------------------------------------------------------------------------------------------------------
# k-NN


def check_knn(x: torch.Tensor, refs: torch.Tensor, k: int, exclude_self: bool, dtype: torch.dtype) -> None:
    dist, index = tknn.knn(x.to(dtype).contiguous(), refs.to(dtype).contiguous(), k, exclude_self)
    assert dist.shape == (x.shape[0], k) and dist.dtype == dtype and index.dtype == torch.int64
    assert_max_rel(dist, ref.knn_distances(x, refs, k, exclude_self), TOL[dtype].value, "distances")
    # the indices point at references at exactly those distances (ties may pick either index)
    direct = ref.pairwise_distances(x, refs).gather(1, index)
    assert_max_rel(dist, direct, TOL[dtype].value, "distances at the returned indices")
    if exclude_self:
        assert not (index == torch.arange(x.shape[0])[:, None]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "m", "d", "k"), [(33, 40, 17, 6), (1, 2, 1, 1), (7, 5, 16, 4), (9, 37, 3, 20)])
def test_knn_matches_reference(dtype, n, m, d, k):
    check_knn(*knn_batch(n, m, d, seed=n + m + d), k, False, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_exclude_self_near_duplicates(dtype):
    rng = np.random.default_rng(4)
    base = 100.0 + rng.normal(size=(20, 9))
    refs = torch.from_numpy(np.concatenate([base, base[:13] + 1e-3 * rng.normal(size=(13, 9))]))
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
    x, refs = knn_batch(n, m, d, seed=n + m + d)
    out = tkde.kde(x.to(dtype), refs.to(dtype), h)
    assert out.shape == (n,) and out.dtype == dtype
    assert_max_rel(out, ref.kde_log_density(x, refs, h), TOL[dtype].value)


def test_knn_kde_empty_batch_and_bad_dtype():
    """The public API returns empty batches before calling a backend: the kernels' own empty path."""
    refs = knn_batch(0, 4, 3, seed=0)[1].float()
    dist, index = tknn.knn(torch.empty(0, 3), refs, 2, False)
    assert dist.shape == (0, 2) and index.shape == (0, 2)
    assert tkde.kde(torch.empty(0, 3), refs, 1.0).shape == (0,)
    with pytest.raises(TypeError, match="float16"):
        tkde.kde(refs.half(), refs.half(), 1.0)
    with pytest.raises(TypeError, match="int64"):
        tknn.knn(refs.long(), refs.long(), 1, False)
