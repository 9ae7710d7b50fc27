"""Triton squared Mahalanobis distances to C class means under one tied precision: backend "triton" of op
"mahalanobis".

Same algorithm as the C++ kernel: with P = L L^T (Cholesky, L lower), (x - mu_c)^T P (x - mu_c) =
||(x - c) L - (mu_c - c) L||^2 for any centre c (the mean of the class means, to keep the operands small). One
program per row block builds z = (x - c) L tile by tile with ``tl.dot`` over the lower triangle of L (centring
while loading) and accumulates the C distances to the projected means by direct differences, so z is never
stored.

Differs from the C++/CUDA versions: one launch per layer entry; the Cholesky factor and the (C, d) projected
means are computed with torch in the launcher; ``tl.dot`` uses ``input_precision="ieee"`` (no TF32).
Inputs are assumed validated and C-contiguous (``engine.ops.mahalanobis`` does it); only the dtype is checked, and
the precision's factor (engine.ops._checks.precision_factor, float64) refuses one that is not positive definite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from engine.kernels.gmm import project_tile

from engine.ops._backend import register
from engine.ops._checks import check_dtype, precision_factor, precision_name

BLOCK_N = 32  # rows per program
BLOCK_D = 16  # feature tile (tl.dot needs >= 16)


@triton.jit
def _mahalanobis_kernel(
    x_ptr, centre_ptr, l_ptr, proj_means_ptr, out_ptr, n, d, n_cls, BN: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr
):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < n
    rows = rows.to(tl.int64)
    cls = tl.arange(0, BC)
    acc = tl.zeros((BN, BC), dtype=x_ptr.dtype.element_ty)
    for j0 in range(0, d, BD):
        z = project_tile(x_ptr, centre_ptr, l_ptr, rows, row_mask, d, j0, False, BN, BD)  # 0 past column d
        cols = j0 + tl.arange(0, BD)
        for c in range(n_cls):
            m = tl.load(proj_means_ptr + c * d + cols, mask=cols < d, other=0.0)
            diff = z - m[None, :]
            acc += tl.where(cls[None, :] == c, tl.sum(diff * diff, axis=1)[:, None], 0.0)
    tl.store(out_ptr + rows[:, None] * n_cls + cls[None, :], acc, mask=row_mask[:, None] & (cls < n_cls)[None, :])


def _mahalanobis_layer(x: torch.Tensor, means: torch.Tensor, precision: torch.Tensor, name: str) -> torch.Tensor:
    check_dtype(x, "x")
    n, d = x.shape
    n_cls = means.shape[0]
    out = torch.empty((n, n_cls), dtype=x.dtype, device=x.device)
    chol = precision_factor(precision, name).to(x.dtype)
    if n == 0:
        return out
    centre = means.mean(dim=0)
    proj_means = ((means - centre) @ chol).contiguous()
    _mahalanobis_kernel[(triton.cdiv(n, BLOCK_N),)](
        x,
        centre,
        chol.contiguous(),
        proj_means,
        out,
        n,
        d,
        n_cls,
        BN=BLOCK_N,
        BD=BLOCK_D,
        BC=triton.next_power_of_2(n_cls),
    )
    return out


@register("mahalanobis", "triton")
def mahalanobis(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per layer the (N, C) squared distances; see engine.ops._backend for the contract."""
    return [_mahalanobis_layer(*layer, precision_name(i, len(layers))) for i, layer in enumerate(layers)]
