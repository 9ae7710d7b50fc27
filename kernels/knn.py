"""Triton k nearest neighbours (Euclidean, ascending): backend "triton" of op "knn".

Same algorithm as the C++ kernel: both operands are centred on the reference mean while they are loaded (the
GEMM expansion ||x||^2 + ||r||^2 - 2 x.r loses accuracy far from the origin), the cross terms of a
(rows x references) tile come from ``tl.dot`` over d tiles, and each row keeps its best candidates in registers
across reference tiles (fused top-k, no N x M matrix; a tile that improves no row of the block is skipped). The
selected distances are then recomputed exactly from direct differences and sorted.

Differs from the C++/CUDA versions:

* A candidate is one int64 key: the float32 bit pattern of the (non-negative) squared distance in the high
  word and the reference index in the low word (so M < 2**31); keys order by float32-rounded distance, then
  index. Kept and new candidates are merged by KC min-extractions (``tl.topk`` has no index payload and its
  bitonic network is ~15x slower under TRITON_INTERPRET).
* Because of that rounding (it matters for float64 input) each row keeps KC = next_pow2(k + SPARE) candidates,
  not k; the exact pass (a second small kernel) recomputes all KC and torch sorts them and keeps k. A true
  neighbour can only be lost if more than KC - k candidates tie with it at float32 resolution.
* ``tl.dot`` uses ``input_precision="ieee"`` (no TF32).

Inputs are assumed validated and C-contiguous (``engine.ops.knn`` does it: 1 <= k <= M, or M - 1 with
exclude_self); only the dtype is checked here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.ops._backend import register
from engine.ops._checks import check_dtype

BLOCK_N = 32  # query rows per program
BLOCK_M = 32  # references per tile
BLOCK_D = 16  # feature tile (tl.dot needs >= 16)
SPARE = 4  # extra candidates kept beyond k (see the module docstring)

_EMPTY_KEY = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # sorts after every real key (+inf distance included)
_INDEX_MASK = tl.constexpr(0xFFFFFFFF)


@triton.jit
def sq_dist_tile(
    x_ptr, ref_ptr, centre_ptr, rows, row_mask, refs, ref_mask, d, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr
):
    """(BN, BM) squared distances ||x[rows] - ref[refs]||^2 via centred GEMM expansion (clamped at 0)."""
    dtype = x_ptr.dtype.element_ty
    cross = tl.zeros((BN, BM), dtype=dtype)
    x_norm = tl.zeros((BN,), dtype=dtype)
    r_norm = tl.zeros((BM,), dtype=dtype)
    for k0 in range(0, d, BD):
        ks = k0 + tl.arange(0, BD)
        k_mask = ks < d
        c = tl.load(centre_ptr + ks, mask=k_mask, other=0.0)
        x_mask = row_mask[:, None] & k_mask[None, :]
        xt = tl.load(x_ptr + rows[:, None] * d + ks[None, :], mask=x_mask, other=0.0)
        xt = tl.where(x_mask, xt - c[None, :], 0.0)
        r_mask = k_mask[:, None] & ref_mask[None, :]
        rt = tl.load(ref_ptr + refs[None, :] * d + ks[:, None], mask=r_mask, other=0.0)  # (BD, BM): transposed
        rt = tl.where(r_mask, rt - c[:, None], 0.0)
        cross += tl.dot(xt, rt, input_precision="ieee")
        x_norm += tl.sum(xt * xt, axis=1)
        r_norm += tl.sum(rt * rt, axis=0)
    return tl.maximum(x_norm[:, None] + r_norm[None, :] - 2.0 * cross, 0.0)


@triton.jit
def _merge_smallest(best, key, KC: tl.constexpr):
    """The KC smallest keys per row of ``best`` (BN, KC) and ``key`` (BN, BM), ascending, by KC min-extractions.

    Keys are unique (they carry the reference index), so each extraction removes exactly one candidate.
    """
    slots = tl.arange(0, KC)
    merged = tl.full(best.shape, _EMPTY_KEY, tl.int64)
    for r in range(KC):
        smallest = tl.minimum(tl.min(best, axis=1), tl.min(key, axis=1))
        merged = tl.where(slots[None, :] == r, smallest[:, None], merged)
        best = tl.where(best == smallest[:, None], _EMPTY_KEY, best)
        key = tl.where(key == smallest[:, None], _EMPTY_KEY, key)
    return merged


@triton.jit
def _knn_select_kernel(
    x_ptr,
    ref_ptr,
    centre_ptr,
    cand_ptr,
    n,
    m,
    d,
    EXCLUDE_SELF: tl.constexpr,
    KC: tl.constexpr,
    BN: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < n
    rows = rows.to(tl.int64)
    best = tl.full((BN, KC), _EMPTY_KEY, tl.int64)
    for j0 in range(0, m, BM):
        refs = (j0 + tl.arange(0, BM)).to(tl.int64)
        ref_mask = refs < m
        sq = sq_dist_tile(x_ptr, ref_ptr, centre_ptr, rows, row_mask, refs, ref_mask, d, BN, BM, BD)
        key = (sq.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64) << 32) | refs[None, :]
        drop = ~ref_mask[None, :]
        if EXCLUDE_SELF:
            drop = drop | (refs[None, :] == rows[:, None])
        key = tl.where(drop, _EMPTY_KEY, key)
        kth = tl.max(best, axis=1)  # the worst kept candidate of each row
        if tl.sum((key < kth[:, None]).to(tl.int32)) > 0:  # skip tiles that improve no row of the block
            best = _merge_smallest(best, key, KC)
    index = tl.where(best == _EMPTY_KEY, -1, best & _INDEX_MASK)
    slots = tl.arange(0, KC)
    tl.store(cand_ptr + rows[:, None] * KC + slots[None, :], index, mask=row_mask[:, None])


@triton.jit
def _exact_dist_kernel(x_ptr, ref_ptr, cand_ptr, out_ptr, n, d, KC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """out[i, s] = ||x_i - ref_cand[i, s]|| by direct differences (+inf for an empty slot)."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_mask = rows < n
    rows = rows.to(tl.int64)
    slots = tl.arange(0, KC)
    idx = tl.load(cand_ptr + rows[:, None] * KC + slots[None, :], mask=row_mask[:, None], other=-1)
    valid = idx >= 0
    acc = tl.zeros((BN, KC), dtype=x_ptr.dtype.element_ty)
    for k0 in range(0, d, BD):
        ks = k0 + tl.arange(0, BD)
        k_mask = ks[None, None, :] < d
        xt = tl.load(
            x_ptr + rows[:, None, None] * d + ks[None, None, :], mask=row_mask[:, None, None] & k_mask, other=0.0
        )
        rt = tl.load(ref_ptr + idx[:, :, None] * d + ks[None, None, :], mask=valid[:, :, None] & k_mask, other=0.0)
        diff = xt - rt
        acc += tl.sum(diff * diff, axis=2)
    out = tl.where(valid, tl.sqrt(acc), float("inf"))
    tl.store(out_ptr + rows[:, None] * KC + slots[None, :], out, mask=row_mask[:, None])


@register("knn", "triton")
def knn(x: torch.Tensor, ref: torch.Tensor, k: int, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dist (N,k) ascending, index (N,k) int64); see engine.ops._backend for the contract."""
    check_dtype(x, "x")
    n, d = x.shape
    m = ref.shape[0]
    if m >= 2**31:
        raise ValueError(f"triton knn supports up to 2**31 - 1 references (requested {m})")
    kc = triton.next_power_of_2(k + SPARE)
    cand = torch.empty((n, kc), dtype=torch.int64, device=x.device)
    exact = torch.empty((n, kc), dtype=x.dtype, device=x.device)
    if n:
        grid = (triton.cdiv(n, BLOCK_N),)
        centre = ref.mean(dim=0)
        _knn_select_kernel[grid](
            x, ref, centre, cand, n, m, d, EXCLUDE_SELF=exclude_self, KC=kc, BN=BLOCK_N, BM=BLOCK_M, BD=BLOCK_D
        )
        _exact_dist_kernel[grid](x, ref, cand, exact, n, d, KC=kc, BN=BLOCK_N, BD=BLOCK_D)
    dist, order = torch.sort(exact, dim=1, stable=True)
    return dist[:, :k].contiguous(), cand.gather(1, order[:, :k])
