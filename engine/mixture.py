"""Full-covariance Gaussian mixture parameters, in the form the GMM kernels consume.

A :class:`GaussianMixture` holds float64 numpy arrays: ``means (K,d)``, ``precisions_cholesky (K,d,d)`` -- the
upper-triangular factors U_k with precision P_k = U_k U_k^T, exactly sklearn's ``precisions_cholesky_`` -- and
``weights (K,)``. Any other square-root factor L_k of the precision is canonicalised to that upper factor.
Parameters are read-only once built, so the per-(dtype, device) tensors handed to the kernels can be cached.
The log density of points under a mixture (sklearn's ``score_samples``) is ``engine.ops.gmm_log_prob(x, gmm)``;
this module imports nothing from ``engine.ops`` (which imports it).
"""

from __future__ import annotations

import math
from os import PathLike
from typing import Any

import numpy as np
import torch

from engine.errors import UserError

_WEIGHT_SUM_TOL = 1e-6


def _upper_factor(factor: np.ndarray, k: int) -> np.ndarray:
    """The upper-triangular U with positive diagonal and U U^T = factor factor^T."""
    diag = np.diagonal(factor)
    if not np.any(np.tril(factor, -1)) and np.all(diag > 0):
        return factor
    precision = factor @ factor.T
    # U U^T = P with U upper  <=>  (J U J)(J U J)^T = J P J with J U J lower (J reverses the index order).
    try:
        lower = np.linalg.cholesky(precision[::-1, ::-1])
    except np.linalg.LinAlgError:
        lower = None
    if lower is None or not np.all(np.isfinite(lower)) or not np.all(np.diagonal(lower) > 0):
        raise UserError(f"precision of component {k} is not positive definite: raise reg_covar or use float64")
    return np.ascontiguousarray(lower[::-1, ::-1])


def _float64(value: Any, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a real-valued array, got {type(value).__name__}") from exc
    want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    if array.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, array.shape, strict=False)):
        raise ValueError(f"{name} must have shape {want}, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    return array


class GaussianMixture:
    """Parameters of a K-component, d-dimensional full-covariance Gaussian mixture (float64, read-only)."""

    def __init__(self, means: Any, precisions_cholesky: Any, weights: Any) -> None:
        means = _float64(means, "means", (None, None))
        n_components, dim = means.shape
        if n_components < 1 or dim < 1:
            raise ValueError(f"means must have shape (K, d) with K >= 1 and d >= 1, got {means.shape}")
        factors = _float64(precisions_cholesky, "precisions_cholesky", (n_components, dim, dim))
        weights = _float64(weights, "weights", (n_components,))
        if np.any(weights <= 0):
            raise ValueError(f"weights must be positive, got minimum {weights.min():.3g}")
        if abs(weights.sum() - 1.0) > _WEIGHT_SUM_TOL:
            raise ValueError(f"weights must sum to 1 (within {_WEIGHT_SUM_TOL}), got sum {weights.sum():.9g}")
        factors = np.stack([_upper_factor(f, k) for k, f in enumerate(factors)])
        self.means = means
        self.precisions_cholesky = factors
        self.weights = weights / weights.sum()
        log_det = np.log(np.diagonal(factors, axis1=1, axis2=2)).sum(axis=1)
        self.log_norm = np.log(self.weights) + log_det - 0.5 * dim * math.log(2 * math.pi)
        for array in (self.means, self.precisions_cholesky, self.weights, self.log_norm):
            array.setflags(write=False)
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def __repr__(self) -> str:
        return f"GaussianMixture(n_components={self.n_components}, dim={self.dim})"

    def tensors(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached contiguous ``(means, precisions_cholesky, log_norm)`` tensors in ``dtype`` on ``device``."""
        key = (dtype, torch.device(device))
        if key not in self._cache:
            self._cache[key] = tuple(
                torch.tensor(a, dtype=dtype, device=key[1])
                for a in (self.means, self.precisions_cholesky, self.log_norm)
            )
        return self._cache[key]

    # ---- construction from sklearn ----------------------------------------------------------------------------

    @classmethod
    def from_sklearn(cls, gm: Any) -> GaussianMixture:
        """From a fitted sklearn GaussianMixture / BayesianGaussianMixture (any covariance_type, expanded to full).

        A Bayesian mixture becomes the plug-in mixture of its point estimates (``weights_``, ``means_``,
        ``precisions_cholesky_``), as the HFC reference uses it; its own ``score_samples`` is a variational quantity.
        """
        for attr in ("means_", "precisions_cholesky_", "weights_", "covariance_type"):
            if not hasattr(gm, attr):
                raise TypeError(f"gm must be a fitted sklearn (Bayesian)GaussianMixture, missing {attr!r}")
        means = np.asarray(gm.means_, dtype=np.float64)
        n_components, dim = means.shape
        chol = np.asarray(gm.precisions_cholesky_, dtype=np.float64)
        kind = gm.covariance_type
        if kind == "full":
            factors = chol
        elif kind == "tied":
            factors = np.broadcast_to(chol, (n_components, dim, dim))
        elif kind == "diag":
            factors = chol[:, :, None] * np.eye(dim)
        elif kind == "spherical":
            factors = chol[:, None, None] * np.eye(dim)
        else:
            raise ValueError(f"gm.covariance_type must be full, tied, diag or spherical, got {kind!r}")
        return cls(means, factors, gm.weights_)

    @classmethod
    def fit(
        cls,
        X: Any,
        n_components: int = 2,
        covariance: str = "full",
        bayesian: bool = False,
        seed: int = 0,
        **sklearn_kwargs: Any,
    ) -> GaussianMixture:
        """Fit with sklearn (``BayesianGaussianMixture`` when ``bayesian``) and convert."""
        from sklearn.mixture import BayesianGaussianMixture
        from sklearn.mixture import GaussianMixture as SkGaussianMixture

        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
        estimator = BayesianGaussianMixture if bayesian else SkGaussianMixture
        gm = estimator(n_components=n_components, covariance_type=covariance, random_state=seed, **sklearn_kwargs)
        return cls.from_sklearn(gm.fit(np.asarray(X, dtype=np.float64)))

    # ---- persistence ------------------------------------------------------------------------------------------

    def save(self, path: str | PathLike[str]) -> None:
        """Write the parameters to an ``.npz`` file."""
        np.savez(path, means=self.means, precisions_cholesky=self.precisions_cholesky, weights=self.weights)

    @classmethod
    def load(cls, path: str | PathLike[str]) -> GaussianMixture:
        """Read parameters written by :meth:`save`."""
        with np.load(path) as data:
            missing = {"means", "precisions_cholesky", "weights"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a saved GaussianMixture: missing arrays {sorted(missing)}")
            return cls(data["means"], data["precisions_cholesky"], data["weights"])
