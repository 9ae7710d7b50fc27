"""Triton Gaussian KDE log density (sklearn KernelDensity(kernel="gaussian")): backend "triton" of op "kde".

Same algorithm as the C++ kernel: squared distances of a (rows x references) tile from centred ``tl.dot`` tiles
(the k-NN helper ``sq_dist_tile``), then an online max-shifted log-sum-exp over reference tiles, so the N x M
matrix is never stored; the launcher adds -log M - d/2 log(2 pi h^2).

Differs from the C++/CUDA versions: 1 / (2 h^2) is passed as a one-element tensor of the input dtype (a Python
float argument would reach the kernel as float32); ``tl.dot`` uses ``input_precision="ieee"`` (no TF32).
Inputs are assumed validated and C-contiguous (``engine.ops.kde`` does it); only the dtype is checked here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from engine.kernels.knn import sq_dist_tile

from engine.ops._backend import register
from engine.ops._checks import check_dtype
from engine.ops.kde import log_norm

BLOCK_N = 32  # query rows per program
BLOCK_M = 32  # references per tile
BLOCK_D = 16  # feature tile (tl.dot needs >= 16)


@triton.jit
def _kde_kernel(
    x_ptr, ref_ptr, centre_ptr, scale_ptr, out_ptr, n, m, d, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr
):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < n
    rows = rows.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    scale = tl.load(scale_ptr)
    run_max = tl.full((BN,), float("-inf"), dtype)
    run_sum = tl.zeros((BN,), dtype)
    for j0 in range(0, m, BM):
        refs = (j0 + tl.arange(0, BM)).to(tl.int64)
        ref_mask = refs < m
        sq = sq_dist_tile(x_ptr, ref_ptr, centre_ptr, rows, row_mask, refs, ref_mask, d, BN, BM, BD)
        logit = tl.where(ref_mask[None, :], -sq * scale, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logit, axis=1))  # finite: every tile holds a reference
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logit - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(out_ptr + rows, run_max + tl.log(run_sum), mask=row_mask)


@register("kde", "triton")
def kde(x: torch.Tensor, ref: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """(N,) log density; see engine.ops._backend for the contract."""
    check_dtype(x, "x")
    n, d = x.shape
    m = ref.shape[0]
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    scale = torch.full((1,), 1.0 / (2.0 * float(bandwidth) ** 2), dtype=x.dtype, device=x.device)
    centre = ref.mean(dim=0)
    _kde_kernel[(triton.cdiv(n, BLOCK_N),)](x, ref, centre, scale, out, n, m, d, BN=BLOCK_N, BM=BLOCK_M, BD=BLOCK_D)
    return out - log_norm(d, m, float(bandwidth))
