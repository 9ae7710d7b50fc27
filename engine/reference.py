"""Plain float64 PyTorch ground truth for every op in engine.ops (shared by tests and benchmarks).

Written for clarity, not speed: direct formulas, no tiling, no tricks. Inputs are torch tensors; everything is
computed in float64 and returned in float64.
"""

from __future__ import annotations

import math

import torch


def _f64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().to(torch.float64) for t in tensors]


def _component_log_prob(
    x64: torch.Tensor, means: torch.Tensor, prec_chol: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    means, prec_chol, weights = _f64(means, prec_chol, weights)
    d = x64.shape[1]
    y = torch.einsum("nkd,kde->nke", x64[:, None, :] - means[None], prec_chol)
    log_det = torch.log(torch.diagonal(prec_chol, dim1=1, dim2=2)).sum(1)
    return torch.log(weights)[None] + log_det[None] - 0.5 * d * math.log(2 * math.pi) - 0.5 * (y**2).sum(-1)


def gmm_component_log_prob(
    x: torch.Tensor, means: torch.Tensor, prec_chol: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """(N,K) log w_k + log N(x; mu_k, (L_k L_k^T)^-1), with prec_chol[k] = L_k as in sklearn."""
    return _component_log_prob(x.detach().to(torch.float64), means, prec_chol, weights)


def gmm_log_prob(x: torch.Tensor, means: torch.Tensor, prec_chol: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N,) log p(x) of the mixture (sklearn ``score_samples``)."""
    return torch.logsumexp(gmm_component_log_prob(x, means, prec_chol, weights), dim=1)


def gmm_log_prob_grad(
    x: torch.Tensor, means: torch.Tensor, prec_chol: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p (N,), d log p / dx (N,d)) by float64 autograd."""
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    log_prob = torch.logsumexp(_component_log_prob(x64, means, prec_chol, weights), dim=1)
    (grad,) = torch.autograd.grad(log_prob.sum(), x64)
    return log_prob.detach(), grad


def gmm_nearest(
    x: torch.Tensor, means: torch.Tensor, prec_chol: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared Mahalanobis distance to the most likely component (N,), that component (N,) int64)."""
    x, means, prec_chol = _f64(x, means, prec_chol)
    component = gmm_component_log_prob(x, means, prec_chol, weights).argmax(dim=1)
    y = torch.einsum("nkd,kde->nke", x[:, None, :] - means[None], prec_chol)
    sq = (y**2).sum(-1)
    return sq.gather(1, component[:, None])[:, 0], component


def mahalanobis(x: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(N,C) squared Mahalanobis distances (x - mu_c)^T P (x - mu_c)."""
    x, means, precision = _f64(x, means, precision)
    diff = x[:, None, :] - means[None]
    return torch.einsum("ncd,de,nce->nc", diff, precision, diff)


def pairwise_distances(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N,M) Euclidean distances by direct differences (no GEMM expansion)."""
    x, ref = _f64(x, ref)
    return torch.sqrt(((x[:, None, :] - ref[None]) ** 2).sum(-1))


def knn_distances(x: torch.Tensor, ref: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    """(N,k) ascending distances to the k nearest references (query i skips reference i if exclude_self)."""
    dist = pairwise_distances(x, ref)
    if exclude_self:
        dist.fill_diagonal_(math.inf)
    return torch.sort(dist, dim=1).values[:, :k]


def lid_from_distances(dist: torch.Tensor) -> torch.Tensor:
    """LID = -(mean_i log(r_i / r_k))^-1 from (N,k) ascending distances."""
    dist = dist.to(torch.float64)
    return -1.0 / torch.log(dist / dist[:, -1:]).mean(dim=1)


def lid(x: torch.Tensor, ref: torch.Tensor, k: int = 20, exclude_self: bool = False) -> torch.Tensor:
    """(N,) maximum-likelihood LID estimate from the k nearest references."""
    return lid_from_distances(knn_distances(x, ref, k, exclude_self))


def kde_log_density(x: torch.Tensor, ref: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """(N,) Gaussian KDE log density, normalised as sklearn KernelDensity(kernel="gaussian")."""
    x, ref = _f64(x, ref)
    sq = ((x[:, None, :] - ref[None]) ** 2).sum(-1)
    d, m = x.shape[1], ref.shape[0]
    return (
        torch.logsumexp(-sq / (2 * bandwidth**2), dim=1) - math.log(m) - 0.5 * d * math.log(2 * math.pi * bandwidth**2)
    )
