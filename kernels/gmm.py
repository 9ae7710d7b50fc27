"""Triton GMM log-likelihood + input gradient (and the HFC ``nearest`` mode): backend "triton" of op "gmm".

Same algorithm as the C++ kernel: one program per block of rows loops over the K components; the operand is
centred while it is loaded (x - mu_k), y = (x - mu_k) U_k is built tile by tile with ``tl.dot`` over the upper
triangle of U_k, q_k = ||y||^2, log p_k = log_norm_k - q_k / 2 and g_k = -y U_k^T. Components are combined by an
online max-shifted log-sum-exp whose gradient accumulator is rescaled in place, so no N x K x d intermediate is
ever stored. ``nearest`` keeps the most likely component k*: value q_k*, gradient 2 y_k* U_k*^T.

Differs from the C++/CUDA versions:

* one launch per layer (they run all layers in one call);
* Triton cannot slice register tiles along d, so y of the current component is staged in an (N, d) scratch
  buffer and the gradient accumulator lives in the output buffer (both in global memory, each row owned by one
  program; ``tl.debug_barrier`` orders the staged reads and writes on a GPU);
* ``tl.dot`` runs with ``input_precision="ieee"`` (no TF32), so float32 keeps float32 accuracy.

Inputs are assumed validated and C-contiguous (``engine.ops.gmm`` does it); only the dtype and the mode are
checked here (engine.ops._checks).
Tile sizes are the module constants below (overridable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.ops._backend import register
from engine.ops._checks import check_dtype, check_mode

BLOCK_N = 32  # rows per program
BLOCK_D = 16  # feature tile of the projections (tl.dot needs >= 16)


@triton.jit
def project_tile(x_ptr, mu_ptr, u_ptr, rows, row_mask, d, j0, UPPER: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Columns j0 .. j0+BD of (x[rows] - mu) @ U for a triangular row-major (d, d) U (upper if UPPER else lower).

    Columns past d come out as 0. Only the row tiles of U that can be non-zero are visited.
    """
    cols = j0 + tl.arange(0, BD)
    col_mask = cols < d
    acc = tl.zeros((BN, BD), dtype=x_ptr.dtype.element_ty)
    if UPPER:  # U[i, j] == 0 for i > j
        lo = 0
        hi = tl.minimum(j0 + BD, d)
    else:  # lower: U[i, j] == 0 for i < j
        lo = j0
        hi = d
    for i0 in range(lo, hi, BD):
        ks = i0 + tl.arange(0, BD)
        k_mask = ks < d
        z = tl.load(x_ptr + rows[:, None] * d + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        mu = tl.load(mu_ptr + ks, mask=k_mask, other=0.0)
        z = tl.where(k_mask[None, :], z - mu[None, :], 0.0)
        u = tl.load(u_ptr + ks[:, None] * d + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.dot(z, u, input_precision="ieee")
    return acc


@triton.jit
def _gmm_kernel(
    x_ptr,
    mu_ptr,
    u_ptr,
    log_norm_ptr,
    value_ptr,
    comp_ptr,
    grad_ptr,
    y_ptr,
    n,
    d,
    n_comp,
    NEAREST: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < n
    rows = rows.to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    run_max = tl.full((BN,), float("-inf"), dtype)
    run_sum = tl.zeros((BN,), dtype)
    best_logp = tl.full((BN,), float("-inf"), dtype)
    best_q = tl.zeros((BN,), dtype)
    best_k = tl.zeros((BN,), tl.int64)
    for k in range(n_comp):
        mu_k = mu_ptr + k * d
        u_k = u_ptr + k * d * d  # K d^2 < 2**31 elements assumed
        q = tl.zeros((BN,), dtype)
        for j0 in range(0, d, BD):
            y = project_tile(x_ptr, mu_k, u_k, rows, row_mask, d, j0, True, BN, BD)
            q += tl.sum(y * y, axis=1)
            if NEED_GRAD:
                cols = j0 + tl.arange(0, BD)
                tl.store(y_ptr + rows[:, None] * d + cols[None, :], y, mask=row_mask[:, None] & (cols < d)[None, :])
        logp = tl.load(log_norm_ptr + k) - 0.5 * q
        better = logp > best_logp
        best_logp = tl.where(better, logp, best_logp)
        best_q = tl.where(better, q, best_q)
        best_k = tl.where(better, k, best_k)
        new_max = tl.maximum(run_max, logp)
        alpha = tl.exp(run_max - new_max)
        beta = tl.exp(logp - new_max)
        run_sum = run_sum * alpha + beta
        run_max = new_max
        if NEED_GRAD:
            tl.debug_barrier()
            for i0 in range(0, d, BD):
                # t = y U_k[i-tile, :]^T; U_k is upper-triangular, so only column tiles j >= i0 contribute.
                ks = i0 + tl.arange(0, BD)
                k_mask = ks < d
                t = tl.zeros((BN, BD), dtype)
                for j0 in range(i0, d, BD):
                    cols = j0 + tl.arange(0, BD)
                    col_mask = cols < d
                    y = tl.load(y_ptr + rows[:, None] * d + cols[None, :], mask=row_mask[:, None] & col_mask[None, :])
                    u_t = tl.load(u_k + ks[None, :] * d + cols[:, None], mask=col_mask[:, None] & k_mask[None, :])
                    t += tl.dot(y, u_t, input_precision="ieee")
                g_ptrs = grad_ptr + rows[:, None] * d + ks[None, :]
                g_mask = row_mask[:, None] & k_mask[None, :]
                g = tl.load(g_ptrs, mask=g_mask)
                if NEAREST:
                    g = tl.where(better[:, None], 2.0 * t, g)
                else:
                    g = g * alpha[:, None] - beta[:, None] * t
                tl.store(g_ptrs, g, mask=g_mask)
            tl.debug_barrier()
    if NEAREST:
        tl.store(value_ptr + rows, best_q, mask=row_mask)
    else:
        tl.store(value_ptr + rows, run_max + tl.log(run_sum), mask=row_mask)
        if NEED_GRAD:
            for i0 in range(0, d, BD):
                ks = i0 + tl.arange(0, BD)
                g_ptrs = grad_ptr + rows[:, None] * d + ks[None, :]
                g_mask = row_mask[:, None] & (ks < d)[None, :]
                tl.store(g_ptrs, tl.load(g_ptrs, mask=g_mask) / run_sum[:, None], mask=g_mask)
    tl.store(comp_ptr + rows, best_k, mask=row_mask)


def _gmm_layer(
    x: torch.Tensor,
    means: torch.Tensor,
    prec_chol: torch.Tensor,
    log_norm: torch.Tensor,
    nearest: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    check_dtype(x, "x")
    n, d = x.shape
    value = torch.empty(n, dtype=x.dtype, device=x.device)
    component = torch.empty(n, dtype=torch.int64, device=x.device)
    grad = torch.zeros((n, d), dtype=x.dtype, device=x.device) if need_grad else None
    if n == 0:
        return value, grad, component
    scratch = torch.empty((n, d), dtype=x.dtype, device=x.device) if need_grad else value  # unused if no grad
    _gmm_kernel[(triton.cdiv(n, BLOCK_N),)](
        x,
        means,
        prec_chol,
        log_norm,
        value,
        component,
        grad if need_grad else value,
        scratch,
        n,
        d,
        means.shape[0],
        NEAREST=nearest,
        NEED_GRAD=need_grad,
        BN=BLOCK_N,
        BD=BLOCK_D,
    )
    return value, grad, component


@register("gmm", "triton")
def gmm(
    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], mode: str, need_grad: bool
) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Per layer (value (N,), grad (N,d) or None, component (N,) int64); see engine.ops._backend for the contract."""
    check_mode(mode)
    return [_gmm_layer(*layer, nearest=mode == "nearest", need_grad=need_grad) for layer in layers]
