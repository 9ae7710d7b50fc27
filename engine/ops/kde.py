"""Gaussian kernel density log-density, equal to sklearn ``KernelDensity(kernel="gaussian").score_samples``.

Backends registered here: ``"cpu"`` (the C++ kernel in ``engine._C``: centred GEMM tiles and an online
max-shifted log-sum-exp) and ``"torch"`` (the same tiling in plain PyTorch on any device).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.errors import UserError
from engine.ops._backend import compiled_module, register, resolve
from engine.ops._checks import InputTypeError, check_pair, to_output

# Torch backend tile sizes: query rows per block, references per GEMM tile.
TORCH_TILE_QUERIES = 1024
TORCH_TILE_REFS = 2048


def log_norm(dim: int, n_ref: int, bandwidth: float) -> float:
    """log M + d/2 log(2 pi h^2): subtracted from the log-sum-exp (as hfc::kde_log_norm)."""
    return math.log(n_ref) + 0.5 * dim * (math.log(2 * math.pi) + 2 * math.log(bandwidth))


# ---------------------------------------------------------------------------------------------------------------
# Backends


def _register_cpu() -> None:
    _C = compiled_module()
    if _C is None:
        return
    if not hasattr(_C, "kde"):
        return

    @register("kde", "cpu")
    def kde_cpu(x: torch.Tensor, ref: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return torch.from_numpy(_C.kde(x.numpy(), ref.numpy(), bandwidth))


_register_cpu()


@register("kde", "torch")
def kde_torch(x: torch.Tensor, ref: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Plain PyTorch: centred GEMM tiles of squared distances merged by logaddexp; no N x M matrix."""
    centre = ref.mean(0)
    xc, rc = x - centre, ref - centre
    x_norm, ref_norm = (xc * xc).sum(1), (rc * rc).sum(1)
    scale = -0.5 / bandwidth**2
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for q0 in range(0, x.shape[0], TORCH_TILE_QUERIES):
        xq = xc[q0 : q0 + TORCH_TILE_QUERIES]
        lse = torch.full((xq.shape[0],), -torch.inf, dtype=x.dtype, device=x.device)
        for r0 in range(0, ref.shape[0], TORCH_TILE_REFS):
            rr = rc[r0 : r0 + TORCH_TILE_REFS]
            sq = x_norm[q0 : q0 + len(xq), None] + ref_norm[None, r0 : r0 + len(rr)] - 2 * xq @ rr.T
            lse = torch.logaddexp(lse, torch.logsumexp(sq.clamp_min(0) * scale, dim=1))
        out[q0 : q0 + len(xq)] = lse
    return out - log_norm(x.shape[1], ref.shape[0], bandwidth)


# ---------------------------------------------------------------------------------------------------------------
# Public API


def _check_bandwidth(bandwidth: Any) -> float:
    if isinstance(bandwidth, bool):
        raise InputTypeError(f"bandwidth must be a number, got {bandwidth!r}")
    try:
        h = float(bandwidth)
    except (TypeError, ValueError):
        raise InputTypeError(f"bandwidth must be a number, got {type(bandwidth).__name__}") from None
    if not (math.isfinite(h) and h > 0):
        raise UserError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
    return h


def kde_log_density(x: Any, ref: Any, bandwidth: float, backend: str = "auto") -> Any:
    """(N,) log density of the rows of ``x`` under a Gaussian KDE on the rows of ``ref`` with bandwidth h:
    log(1/M sum_j exp(-||x - r_j||^2 / (2 h^2))) - d/2 log(2 pi h^2), as sklearn KernelDensity."""
    h = _check_bandwidth(bandwidth)
    xt, rt, was_numpy = check_pair(x, ref)
    if 0.5 / h**2 > torch.finfo(xt.dtype).max:
        raise UserError(f"bandwidth={h!r} is too small for {xt.dtype} (1 / (2 h^2) overflows); use float64")
    impl = resolve("kde", backend, xt.device)
    if xt.shape[0] == 0:
        return to_output(xt.new_empty(0), was_numpy)
    return to_output(impl(xt, rt, h), was_numpy)
