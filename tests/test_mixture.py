"""engine.GaussianMixture: validation, canonical upper factors, sklearn conversion, fit, save/load, tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.mixture import BayesianGaussianMixture
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import engine
from engine.mixture import GaussianMixture
from engine.ops import gmm_log_prob


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 0.0], [4.0, 4.0, 0.0], [0.0, 5.0, 5.0]])
    return centres[rng.integers(3, size=300)] + rng.normal(size=(300, 3)) @ rng.normal(size=(3, 3)) * 0.5


def test_exposed_as_engine_attribute():
    assert engine.GaussianMixture is GaussianMixture


@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_from_sklearn_matches_score_samples(data, covariance):
    sk = SkGaussianMixture(3, covariance_type=covariance, random_state=0).fit(data)
    gmm = GaussianMixture.from_sklearn(sk)
    assert (gmm.n_components, gmm.dim) == (3, 3)
    np.testing.assert_allclose(gmm_log_prob(data, gmm), sk.score_samples(data), rtol=1e-12, atol=1e-12)


def test_from_bayesian_and_fit(data):
    bgm = BayesianGaussianMixture(n_components=4, random_state=1, max_iter=200).fit(data)
    # The plug-in mixture of the point estimates (what HFC uses); BGM's own score_samples is a variational bound.
    plug_in = SkGaussianMixture(4)
    plug_in.weights_, plug_in.means_, plug_in.precisions_cholesky_ = bgm.weights_, bgm.means_, bgm.precisions_cholesky_
    np.testing.assert_allclose(
        gmm_log_prob(data, GaussianMixture.from_sklearn(bgm)), plug_in.score_samples(data), rtol=1e-12, atol=1e-12
    )
    fitted = GaussianMixture.fit(data, n_components=3, covariance="diag", seed=2)
    sk = SkGaussianMixture(3, covariance_type="diag", random_state=2).fit(data)
    np.testing.assert_allclose(gmm_log_prob(data, fitted), sk.score_samples(data), rtol=1e-12, atol=1e-12)
    bayes = GaussianMixture.fit(torch.from_numpy(data), n_components=2, bayesian=True, seed=0, max_iter=50)
    assert bayes.n_components == 2 and abs(bayes.weights.sum() - 1) < 1e-12


def test_mixture_module_does_not_import_ops():
    """engine.ops.gmm imports engine.mixture; the reverse import (inside a method) was a cycle."""
    import ast
    import inspect

    import engine.mixture

    imported = set()  # every module imported anywhere in engine/mixture.py, methods included
    for node in ast.walk(ast.parse(inspect.getsource(engine.mixture))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    assert not [name for name in imported if name == "engine.ops" or name.startswith("engine.ops.")]
    assert not hasattr(GaussianMixture, "score_samples")  # the public API is engine.ops.gmm_log_prob(x, gmm)


def test_from_sklearn_rejects_unfitted():
    with pytest.raises(TypeError, match="fitted sklearn"):
        GaussianMixture.from_sklearn(SkGaussianMixture(2))


def test_log_norm_formula(data):
    gmm = GaussianMixture.fit(data, n_components=2)
    diag = np.diagonal(gmm.precisions_cholesky, axis1=1, axis2=2)
    expected = np.log(gmm.weights) + np.log(diag).sum(1) - 0.5 * gmm.dim * math.log(2 * math.pi)
    np.testing.assert_allclose(gmm.log_norm, expected, rtol=1e-14)


def test_lower_factor_canonicalised_to_upper(data):
    sk = SkGaussianMixture(2, random_state=0).fit(data)
    upper = sk.precisions_cholesky_
    precision = upper @ upper.transpose(0, 2, 1)
    lower = np.linalg.cholesky(precision)  # a different square root of the same precision
    rotated = upper @ np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]  # U Q: dense, same precision
    for factor in (lower, rotated):
        gmm = GaussianMixture(sk.means_, factor, sk.weights_)
        np.testing.assert_allclose(gmm.precisions_cholesky, upper, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gmm_log_prob(data, gmm), sk.score_samples(data), rtol=1e-10)


def test_negative_diagonal_upper_factor_is_fixed():
    factor = np.array([[[-2.0, 1.0], [0.0, 3.0]]])
    gmm = GaussianMixture(np.zeros((1, 2)), factor, [1.0])
    got = gmm.precisions_cholesky[0]
    assert np.all(np.diag(got) > 0) and got[1, 0] == 0
    np.testing.assert_allclose(got @ got.T, factor[0] @ factor[0].T, rtol=1e-12)


def test_non_positive_definite_precision_raises():
    factors = np.stack([np.eye(3), np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])])  # second is singular
    with pytest.raises(ValueError, match="precision of component 1 is not positive definite: raise reg_covar"):
        GaussianMixture(np.zeros((2, 3)), factors, [0.5, 0.5])


@pytest.mark.parametrize(
    "means,factors,weights,error,match",
    [
        (np.zeros(3), np.eye(3)[None], [1.0], ValueError, r"means must have shape \(\?, \?\)"),
        (np.zeros((1, 3)), np.eye(2)[None], [1.0], ValueError, r"precisions_cholesky must have shape \(1, 3, 3\)"),
        (np.zeros((2, 3)), np.stack([np.eye(3)] * 2), [1.0], ValueError, r"weights must have shape \(2,\)"),
        (np.zeros((2, 3)), np.stack([np.eye(3)] * 2), [0.7, 0.7], ValueError, "weights must sum to 1"),
        (np.zeros((2, 3)), np.stack([np.eye(3)] * 2), [1.5, -0.5], ValueError, "weights must be positive"),
        (np.full((1, 3), np.nan), np.eye(3)[None], [1.0], ValueError, "means contains NaN or inf"),
        (np.zeros((1, 3)), np.full((1, 3, 3), np.inf), [1.0], ValueError, "precisions_cholesky contains NaN or inf"),
        (np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros(0), ValueError, "K >= 1 and d >= 1"),
        (np.array([["a", "b"]]), np.eye(2)[None], [1.0], TypeError, "means must be a real-valued array"),
    ],
)
def test_invalid_parameters_raise(means, factors, weights, error, match):
    with pytest.raises(error, match=match):
        GaussianMixture(means, factors, weights)


def test_save_load_roundtrip(tmp_path, data):
    gmm = GaussianMixture.fit(data, n_components=3)
    path = tmp_path / "gmm.npz"
    gmm.save(path)
    loaded = GaussianMixture.load(path)
    for name in ("means", "precisions_cholesky", "weights", "log_norm"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(gmm, name))
    np.savez(tmp_path / "bad.npz", means=gmm.means)
    with pytest.raises(ValueError, match="missing arrays"):
        GaussianMixture.load(tmp_path / "bad.npz")


def test_tensors_cached_and_parameters_read_only(data):
    gmm = GaussianMixture.fit(data, n_components=2)
    means, chol, log_norm = gmm.tensors(torch.float32)
    assert means.dtype == torch.float32 and chol.shape == (2, 3, 3) and log_norm.shape == (2,)
    assert all(t.is_contiguous() for t in (means, chol, log_norm))
    assert gmm.tensors(torch.float32)[0] is means
    assert gmm.tensors(torch.float64, "cpu")[0].dtype == torch.float64
    with pytest.raises(ValueError, match="read-only"):
        gmm.means[0, 0] = 1.0
