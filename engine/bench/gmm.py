"""GMM log-prob + gradient and the multi-layer HFC loss: ours vs the baselines users would pick instead.

* ``gmm_log_prob_grad`` (float32, N=4096) vs torch autograd through ``torch.distributions.MixtureSameFamily``,
  reported as a multiple of one N x d x (K d) sgemm (the CPU floor for this op).
* ``gmm_log_prob`` vs sklearn ``GaussianMixture.score_samples`` (float64, sklearn's only precision).
* ``hfc_loss`` over 8 layers (N=64, d 64..512, K=64) vs the HFC reference's per-component Python loop.

Run: ``run(quick)`` (``hfc-engine bench``) or ``python -m pytest benchmarks/bench_gmm.py --benchmark-only``.
The mixtures have overlapping components (dense responsibilities), the worst case for the fused kernel: with
well-separated components most second products are skipped and it runs faster.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.bench.harness import Timer, default_timer, median_time, result_row, sgemm_seconds
from engine.mixture import GaussianMixture
from engine.ops.gmm import gmm_log_prob, gmm_log_prob_grad, hfc_loss

N = 4096
QUICK_SHAPES = [(64, 8), (512, 8), (512, 64)]
FULL_SHAPES = [(d, k) for d in (64, 512, 2048) for k in (2, 8, 64)]
# torch/sklearn baselines materialise N x K x d arrays; skip them above this many elements (the (2048, 64) case).
BASELINE_MAX_ELEMENTS = 1 << 28
HFC_DIMS = (64, 64, 128, 128, 256, 256, 512, 512)
HFC_N, HFC_K = 64, 64


def random_mixture(d: int, k: int, seed: int = 0, spread: float = 0.05) -> GaussianMixture:
    """K overlapping components with well-conditioned upper factors (no Cholesky needed to build)."""
    rng = np.random.default_rng(seed)
    means = spread * rng.normal(size=(k, d))
    factors = np.triu(rng.normal(size=(k, d, d)), 1) * (0.3 / math.sqrt(d))
    factors[:, np.arange(d), np.arange(d)] = rng.uniform(0.8, 1.2, size=(k, d))
    return GaussianMixture(means, factors, np.full(k, 1.0 / k))


def features(gmm: GaussianMixture, n: int, seed: int = 1) -> np.ndarray:
    """n points around randomly chosen component means, float64."""
    rng = np.random.default_rng(seed)
    return gmm.means[rng.integers(gmm.n_components, size=n)] + rng.normal(size=(n, gmm.dim))


def torch_mixture(gmm: GaussianMixture, dtype: torch.dtype) -> torch.distributions.MixtureSameFamily:
    """The same mixture as torch.distributions (covariance factor L = U^-T, lower, as MultivariateNormal wants)."""
    means, chol, _ = gmm.tensors(torch.float64)
    eye = torch.eye(gmm.dim, dtype=torch.float64).expand_as(chol)
    scale_tril = torch.linalg.solve_triangular(chol, eye, upper=True).mT.contiguous()
    components = torch.distributions.MultivariateNormal(means.to(dtype), scale_tril=scale_tril.to(dtype))
    mixing = torch.distributions.Categorical(probs=torch.tensor(gmm.weights, dtype=dtype))
    return torch.distributions.MixtureSameFamily(mixing, components)


def gmm_rows(d: int, k: int, timer: Timer, repeats: int = 3) -> list[dict]:
    """Time ours (log-prob + grad, float32) vs torch autograd and (log-prob) vs sklearn at N=4096."""
    gmm = random_mixture(d, k)
    x64 = features(gmm, N)
    x = x64.astype(np.float32)
    shape = f"N={N} d={d} K={k}"
    flops = 2.0 * N * d * k * d
    gemm_s = sgemm_seconds(N, d, k * d, repeats=repeats)
    ours = timer(lambda: gmm_log_prob_grad(x, gmm, backend="cpu"))
    small = N * k * d <= BASELINE_MAX_ELEMENTS
    torch_s = None
    if small:
        mixture = torch_mixture(gmm, torch.float32)

        def torch_autograd() -> None:
            xt = torch.from_numpy(x).requires_grad_(True)
            torch.autograd.grad(mixture.log_prob(xt).sum(), xt)

        torch_s = median_time(torch_autograd, repeats=repeats)[0]
    rows = [
        result_row(
            "gmm_log_prob_grad", shape, "float32", ours, "torch MixtureSameFamily autograd", torch_s, flops, gemm_s
        )
    ]
    if small:
        from sklearn.mixture import GaussianMixture as SkGaussianMixture

        sk = SkGaussianMixture(k, covariance_type="full")
        sk.weights_, sk.means_, sk.precisions_cholesky_ = gmm.weights, gmm.means, gmm.precisions_cholesky
        sk_s = median_time(lambda: sk.score_samples(x64), repeats=repeats)[0]
        ours_lp = median_time(lambda: gmm_log_prob(x64, gmm, backend="cpu"), repeats=repeats)
        gemm64 = sgemm_seconds(N, d, k * d, dtype=torch.float64, repeats=repeats)
        rows.append(
            result_row("gmm_log_prob", shape, "float64", ours_lp, "sklearn score_samples", sk_s, flops / 2, gemm64)
        )
    return rows


def reference_hfc_loop(feats: list[torch.Tensor], gmms: list[GaussianMixture]) -> torch.Tensor:
    """The HFC reference code's formulation: per layer, per component, torch ops in a Python loop, autograd."""
    total = 0.0
    for h, gmm in zip(feats, gmms, strict=True):
        means, chol, _ = gmm.tensors(h.dtype)
        weights = torch.tensor(gmm.weights, dtype=h.dtype)
        d = h.shape[1]
        log_probs = []
        for k in range(gmm.n_components):
            y = (h - means[k]) @ chol[k]
            log_det = torch.log(torch.diagonal(chol[k])).sum()
            log_probs.append(torch.log(weights[k]) + log_det - 0.5 * d * math.log(2 * math.pi) - 0.5 * (y * y).sum(1))
        total = total - torch.logsumexp(torch.stack(log_probs, dim=1), dim=1).sum()
    return total


def hfc_rows(timer: Timer, repeats: int = 5) -> list[dict]:
    """hfc_loss forward + backward over 8 layers at HFC shapes vs the per-component loop (float32)."""
    gmms = [random_mixture(d, HFC_K, seed=i) for i, d in enumerate(HFC_DIMS)]
    feats = [torch.tensor(features(g, HFC_N, seed=i), dtype=torch.float32) for i, g in enumerate(gmms)]

    def ours() -> None:
        xs = [f.clone().requires_grad_(True) for f in feats]
        hfc_loss(xs, gmms, backend="cpu").backward()

    def loop() -> None:
        xs = [f.clone().requires_grad_(True) for f in feats]
        reference_hfc_loop(xs, gmms).backward()

    for g in gmms:
        g.tensors(torch.float32)  # build the cached tensors outside the timed region, for both
    ours_t = timer(ours)
    loop_s = median_time(loop, repeats=repeats)[0]
    flops = sum(2.0 * HFC_N * d * HFC_K * d for d in HFC_DIMS)
    gemm_s = sum(sgemm_seconds(HFC_N, d, HFC_K * d, repeats=repeats) for d in HFC_DIMS)
    shape = f"8 layers N={HFC_N} d={min(HFC_DIMS)}..{max(HFC_DIMS)} K={HFC_K}"
    return [result_row("hfc_loss", shape, "float32", ours_t, "per-component python loop", loop_s, flops, gemm_s)]


def run(quick: bool = True) -> list[dict]:
    """All GMM benchmark rows (quick: three shapes; full: d in {64, 512, 2048} x K in {2, 8, 64})."""
    rows = []
    for d, k in QUICK_SHAPES if quick else FULL_SHAPES:
        rows += gmm_rows(d, k, default_timer(3))
    return rows + hfc_rows(default_timer(5))
