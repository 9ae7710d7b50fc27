"""k nearest neighbours (Euclidean) and the LID estimate.

``knn_distances`` validates its input and hands clean tensors to one backend call (the ``knn`` contract in
:mod:`engine.ops._backend`); ``lid`` is computed from those distances. Backends registered here: ``"cpu"`` (the
C++ kernel in ``engine._C``: centred GEMM tiles, fused per-row candidate buffer, exact recomputation) and
``"torch"`` (the same algorithm in plain PyTorch on any device, with ``torch.topk`` merging tiles).
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from engine.errors import UserError
from engine.ops._backend import compiled_module, register, resolve
from engine.ops._checks import InputTypeError, check_pair, to_output

# Candidates kept beyond k before the exact recomputation (as hfc::kKnnExtraCandidates in csrc/include/hfc/knn.h).
EXTRA_CANDIDATES = 8
# Torch backend tile sizes: query rows per block, references per GEMM tile.
TORCH_TILE_QUERIES = 256
TORCH_TILE_REFS = 4096


# ---------------------------------------------------------------------------------------------------------------
# Backends


def _register_cpu() -> None:
    _C = compiled_module()
    if _C is None:
        return
    if not hasattr(_C, "knn"):
        return

    @register("knn", "cpu")
    def knn_cpu(x: torch.Tensor, ref: torch.Tensor, k: int, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dist, index = _C.knn(x.numpy(), ref.numpy(), k, exclude_self)
        return torch.from_numpy(dist), torch.from_numpy(index)


_register_cpu()


@register("knn", "torch")
def knn_torch(x: torch.Tensor, ref: torch.Tensor, k: int, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: centred GEMM tiles, running top-(k + extra) per row, exact float64 recomputation."""
    n, m = x.shape[0], ref.shape[0]
    cap = min(k + EXTRA_CANDIDATES, m - 1 if exclude_self else m)
    centre = ref.mean(0)
    xc, rc = x - centre, ref - centre
    ref_norm = (rc * rc).sum(1)
    dist = torch.empty(n, k, dtype=x.dtype, device=x.device)
    index = torch.empty(n, k, dtype=torch.int64, device=x.device)
    for q0 in range(0, n, TORCH_TILE_QUERIES):
        rows = torch.arange(q0, min(n, q0 + TORCH_TILE_QUERIES), device=x.device)
        keys = torch.empty(len(rows), 0, dtype=x.dtype, device=x.device)
        ids = torch.empty(len(rows), 0, dtype=torch.int64, device=x.device)
        for r0 in range(0, m, TORCH_TILE_REFS):
            cols = torch.arange(r0, min(m, r0 + TORCH_TILE_REFS), device=x.device)
            partial = ref_norm[cols] - 2 * xc[rows] @ rc[cols].T  # ||x - r||^2 - ||x||^2
            if exclude_self:
                partial = partial.masked_fill(rows[:, None] == cols[None, :], torch.inf)
            keys = torch.cat([keys, partial], dim=1)
            ids = torch.cat([ids, cols.expand(len(rows), -1)], dim=1)
            best = torch.topk(keys, min(cap, keys.shape[1]), dim=1, largest=False, sorted=False).indices
            keys, ids = keys.gather(1, best), ids.gather(1, best)
        # Exact distances by direct differences, sorted by (distance, index).
        ids = ids.sort(dim=1).values
        diff = x[rows, None, :].to(torch.float64) - ref[ids].to(torch.float64)
        exact, order = (diff * diff).sum(-1).sort(dim=1, stable=True)
        dist[rows] = exact[:, :k].sqrt().to(x.dtype)
        index[rows] = ids.gather(1, order)[:, :k]
    return dist, index


# ---------------------------------------------------------------------------------------------------------------
# Public API


def _check_k(k: Any, m: int, n: int, exclude_self: bool) -> int:
    if isinstance(k, bool):
        raise InputTypeError(f"k must be an integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise InputTypeError(f"k must be an integer, got {type(k).__name__}") from None
    if exclude_self and n != m:
        raise UserError(f"exclude_self=True needs x to be the reference set (N == M), got N={n}, M={m}")
    limit = m - 2 if exclude_self else m - 1
    if not 1 <= k <= limit:
        who = " minus the query itself" if exclude_self else ""
        raise UserError(f"k must be between 1 and {limit} (fewer than the {m} references{who}), requested k={k}")
    return k


def _knn(x: Any, ref: Any, k: Any, exclude_self: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    xt, rt, was_numpy = check_pair(x, ref)
    k = _check_k(k, rt.shape[0], xt.shape[0], bool(exclude_self))
    impl = resolve("knn", backend, xt.device)
    if xt.shape[0] == 0:
        return xt.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=xt.device), was_numpy
    dist, index = impl(xt, rt, k, bool(exclude_self))
    return dist, index, was_numpy


def knn_distances(
    x: Any, ref: Any, k: int, exclude_self: bool = False, return_index: bool = False, backend: str = "auto"
) -> Any:
    """(N,k) ascending Euclidean distances from each row of ``x`` to its k nearest rows of ``ref``.

    ``exclude_self=True``: ``x`` is the reference set itself (N == M) and query i never returns reference i.
    ``return_index=True`` also returns the (N,k) int64 reference indices. Ties go to the smaller index.
    Requires 1 <= k < M (k < M - 1 with ``exclude_self``).
    """
    dist, index, was_numpy = _knn(x, ref, k, exclude_self, backend)
    if return_index:
        return to_output(dist, was_numpy), to_output(index, was_numpy)
    return to_output(dist, was_numpy)


def lid_from_sorted(dist: torch.Tensor) -> torch.Tensor:
    """LID = -(mean_i log(r_i / r_k))^-1 per row of ascending distances, in float64 (as hfc::lid_from_sorted:
    zero distances are clamped to 1e-30, and all-equal distances give +inf)."""
    d64 = dist.to(torch.float64).clamp_min(1e-30)
    total = torch.log(d64 / d64[:, -1:]).sum(dim=1)
    lid_values = -dist.shape[1] / total
    return torch.where(total == 0, torch.inf, lid_values)


def lid(x: Any, ref: Any, k: int = 20, exclude_self: bool = False, backend: str = "auto") -> Any:
    """(N,) maximum-likelihood local intrinsic dimensionality from the k nearest rows of ``ref`` (Ma et al. 2018)."""
    dist, _, was_numpy = _knn(x, ref, k, exclude_self, backend)
    return to_output(lid_from_sorted(dist).to(dist.dtype), was_numpy)
