"""Gaussian-mixture kernels: log-probability, its input gradient, nearest component, and the multi-layer HFC loss.

Public functions validate their input, then hand a list of layer entries to one backend call (see the ``gmm``
contract in :mod:`engine.ops._backend`). Backends registered here: ``"cpu"`` (the fused C++ kernel in
``engine._C``) and ``"torch"`` (plain PyTorch on any device, tiled over components with an online logsumexp).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from engine.errors import UserError
from engine.mixture import GaussianMixture
from engine.ops._backend import compiled_module, register, resolve
from engine.ops._checks import InputTypeError, as_tensor, check_finite, check_mode, check_same, to_output

REDUCTIONS = ("sum", "mean", "none")
# Torch backend: components per chunk are chosen so one chunk's (c, N, d) intermediate holds at most this many.
TORCH_CHUNK_ELEMENTS = 1 << 22

Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
LayerResult = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Backends


def _register_cpu() -> None:
    _C = compiled_module()
    if _C is None:
        return
    if not hasattr(_C, "gmm"):
        return

    def packed_factors(prec_chol: torch.Tensor) -> np.ndarray | None:
        """The SIMD kernels' packed factors, built once per factor tensor (a mixture's cached tensors) and rebuilt
        if the tensor is modified in place: repacking costs as much as the kernel itself at attack batch sizes."""
        if prec_chol.shape[-1] > _C.gmm_simd_max_dim:
            return None
        cached = getattr(prec_chol, "_hfc_packed", None)
        if cached is None or cached[0] != prec_chol._version:
            cached = (prec_chol._version, _C.gmm_pack(prec_chol.numpy()))
            prec_chol._hfc_packed = cached
        return cached[1]

    @register("gmm", "cpu")
    def gmm_cpu(layers: list[Layer], mode: str, need_grad: bool) -> list[LayerResult]:
        arrays = [
            (x.numpy(), means.numpy(), chol.numpy(), log_norm.numpy(), packed_factors(chol))
            for x, means, chol, log_norm in layers
        ]
        out = _C.gmm(arrays, mode, need_grad)
        return [
            (torch.from_numpy(v), None if g is None else torch.from_numpy(g), torch.from_numpy(c)) for v, g, c in out
        ]


_register_cpu()


@register("gmm", "torch")
def gmm_torch(layers: list[Layer], mode: str, need_grad: bool) -> list[LayerResult]:
    """Plain PyTorch: components in chunks, online max-shifted logsumexp, no (N, K, d) intermediate."""
    return [_torch_layer(*layer, mode=mode, need_grad=need_grad) for layer in layers]


def _torch_layer(
    x: torch.Tensor, means: torch.Tensor, prec_chol: torch.Tensor, log_norm: torch.Tensor, mode: str, need_grad: bool
) -> LayerResult:
    n, d = x.shape
    n_comp = means.shape[0]
    chunk = max(1, min(n_comp, TORCH_CHUNK_ELEMENTS // max(1, n * d)))
    best_logp = torch.full((n,), -math.inf, dtype=x.dtype, device=x.device)
    best_k = torch.zeros(n, dtype=torch.int64, device=x.device)
    best_q = torch.zeros(n, dtype=x.dtype, device=x.device)
    run_max = torch.full((n,), -math.inf, dtype=x.dtype, device=x.device)
    run_sum = torch.zeros(n, dtype=x.dtype, device=x.device)
    acc = torch.zeros(n, d, dtype=x.dtype, device=x.device) if need_grad and mode == "loglik" else None
    for k0 in range(0, n_comp, chunk):
        u = prec_chol[k0 : k0 + chunk]
        y = torch.matmul(x[None] - means[k0 : k0 + chunk, None], u)  # (c, N, d), centred before the product
        q = (y * y).sum(-1)
        logp = log_norm[k0 : k0 + chunk, None] - 0.5 * q
        chunk_max, chunk_arg = logp.max(dim=0)
        better = chunk_max > best_logp
        best_logp = torch.where(better, chunk_max, best_logp)
        best_k = torch.where(better, chunk_arg + k0, best_k)
        if mode == "nearest":
            best_q = torch.where(better, q.gather(0, chunk_arg[None])[0], best_q)
            continue
        new_max = torch.maximum(run_max, chunk_max)
        scale_old = torch.exp(run_max - new_max)
        weight = torch.exp(logp - new_max)
        run_sum = run_sum * scale_old + weight.sum(0)
        run_max = new_max
        if acc is not None:
            acc = acc * scale_old[:, None] + torch.matmul(weight[..., None] * y, u.transpose(1, 2)).sum(0)
    if mode == "nearest":
        grad = None
        if need_grad:
            grad = torch.empty_like(x)
            for k in best_k.unique().tolist():
                rows = best_k == k
                u = prec_chol[k]
                grad[rows] = 2 * ((x[rows] - means[k]) @ u) @ u.T
        return best_q, grad, best_k
    grad = None if acc is None else -acc / run_sum[:, None]
    return run_max + torch.log(run_sum), grad, best_k


# ---------------------------------------------------------------------------------------------------------------
# Single-mixture API


def _check_gmm(gmm: Any, name: str) -> GaussianMixture:
    if not isinstance(gmm, GaussianMixture):
        raise InputTypeError(f"{name} must be an engine.GaussianMixture, got {type(gmm).__name__}")
    return gmm


def _check_features(x: torch.Tensor, gmm: GaussianMixture, name: str) -> None:
    if x.shape[1] != gmm.dim:
        raise UserError(f"{name} must have shape (N, {gmm.dim}) to match the mixture's dim, got {tuple(x.shape)}")
    check_finite(x, name)


def _run_single(x: Any, gmm: GaussianMixture, mode: str, need_grad: bool, backend: str) -> tuple[LayerResult, bool]:
    gmm = _check_gmm(gmm, "gmm")
    xt, was_numpy = as_tensor(x, "x", ndim=2)
    _check_features(xt, gmm, "x")
    impl = resolve("gmm", backend, xt.device)
    xt = xt.detach().contiguous()
    (result,) = impl([(xt, *gmm.tensors(xt.dtype, xt.device))], mode, need_grad)
    return result, was_numpy


def gmm_log_prob(x: Any, gmm: GaussianMixture, backend: str = "auto") -> Any:
    """(N,) log p(x) under the mixture, equal to sklearn ``score_samples`` (no autograd; see ``hfc_loss``)."""
    (value, _, _), was_numpy = _run_single(x, gmm, "loglik", False, backend)
    return to_output(value, was_numpy)


def gmm_log_prob_grad(x: Any, gmm: GaussianMixture, backend: str = "auto") -> tuple[Any, Any]:
    """(log p(x) (N,), d log p / dx (N,d)) in one fused pass."""
    (value, grad, _), was_numpy = _run_single(x, gmm, "loglik", True, backend)
    return to_output(value, was_numpy), to_output(grad, was_numpy)


def gmm_nearest(x: Any, gmm: GaussianMixture, backend: str = "auto") -> tuple[Any, Any]:
    """(squared Mahalanobis distance to the most likely component (N,), that component (N,) int64)."""
    (value, _, component), was_numpy = _run_single(x, gmm, "nearest", False, backend)
    return to_output(value, was_numpy), to_output(component, was_numpy)


# ---------------------------------------------------------------------------------------------------------------
# Multi-layer HFC loss


class _HfcPlan:
    """Validated hfc_loss arguments: which rows of which layer go to which mixture, and how terms combine."""

    def __init__(self, features, gmms, mode, weights, classes, reduction, backend) -> None:
        check_mode(mode)
        if reduction not in REDUCTIONS:
            raise UserError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(features, (torch.Tensor, np.ndarray)) or not isinstance(features, Sequence) or not features:
            raise InputTypeError("features must be a non-empty sequence of (N, d_l) tensors, one per layer")
        tensors = [as_tensor(f, f"features[{i}]", ndim=2)[0] for i, f in enumerate(features)]
        check_same({f"features[{i}]": t for i, t in enumerate(tensors)})
        n = tensors[0].shape[0]
        for i, t in enumerate(tensors):
            if t.shape[0] != n:
                raise UserError(f"features[{i}] has {t.shape[0]} rows but features[0] has {n}; all layers need N rows")
        if not isinstance(gmms, Sequence) or len(gmms) != len(tensors):
            raise UserError(f"gmms must be a sequence with one entry per layer ({len(tensors)})")
        self.weights = [1.0] * len(tensors) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(tensors) or not all(math.isfinite(w) for w in self.weights):
            raise UserError(f"weights must be {len(tensors)} finite numbers (one per layer), got {weights!r}")
        classes = self._classes(classes, n, tensors[0].device, gmms)
        class_rows = [] if classes is None else [(c, torch.nonzero(classes == c).flatten()) for c in classes.unique()]
        # entries[i] = (layer, row index tensor or None for all rows, mixture): one kernel entry per (layer, class)
        self.entries: list[tuple[int, torch.Tensor | None, GaussianMixture]] = []
        for layer, gm in enumerate(gmms):
            if isinstance(gm, GaussianMixture):
                self.entries.append((layer, None, gm))
                continue
            for c, rows in class_rows:
                self.entries.append((layer, rows, _check_gmm(gm[int(c)], f"gmms[{layer}][{int(c)}]")))
        for layer, _, gm in self.entries:
            _check_features(tensors[layer], gm, f"features[{layer}]")
        self.mode, self.reduction, self.n = mode, reduction, n
        self.tensors = tensors
        self.dims = [t.shape[1] for t in tensors]
        self.impl = resolve("gmm", backend, tensors[0].device)

    @staticmethod
    def _classes(classes: Any, n: int, device: torch.device, gmms: Sequence[Any]) -> torch.Tensor | None:
        per_class = [len(gm) for gm in gmms if not isinstance(gm, GaussianMixture)]
        if not per_class:
            return None
        if classes is None:
            raise UserError("classes (N,) is required when gmms holds per-class sequences of mixtures")
        classes = torch.as_tensor(np.asarray(classes) if isinstance(classes, list) else classes, device=device)
        if classes.shape != (n,) or classes.dtype.is_floating_point or classes.dtype == torch.bool:
            raise UserError(
                f"classes must be an integer array of shape ({n},), got {classes.dtype} {tuple(classes.shape)}"
            )
        if n and (int(classes.min()) < 0 or int(classes.max()) >= min(per_class)):
            raise UserError(
                f"classes must lie in [0, {min(per_class)}) (per-class mixtures available), got "
                f"[{int(classes.min())}, {int(classes.max())}]"
            )
        return classes.to(torch.int64)

    def run(self, features: Sequence[torch.Tensor], need_grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(loss, per-layer gradients of the loss w.r.t. each feature) from ONE backend call."""
        xs = [f.detach().contiguous() for f in features]
        layers = []
        for layer, rows, gm in self.entries:
            x = xs[layer] if rows is None else xs[layer].index_select(0, rows)
            layers.append((x, *gm.tensors(x.dtype, x.device)))
        results = self.impl(layers, self.mode, need_grad)
        ref = xs[0]
        per_sample = torch.zeros(self.n, dtype=ref.dtype, device=ref.device)
        grads = [torch.zeros_like(x) for x in xs] if need_grad else []
        for (layer, rows, _), (value, grad, _) in zip(self.entries, results, strict=True):
            # layer term: -log p (loglik) or squared Mahalanobis / d_l (nearest)
            coef = -1.0 if self.mode == "loglik" else 1.0 / self.dims[layer]
            w = self.weights[layer] * coef
            if rows is None:
                per_sample += w * value
            else:
                per_sample.index_add_(0, rows, w * value)
            if need_grad and rows is None:
                grads[layer].copy_(w * grad)
            elif need_grad:
                grads[layer].index_copy_(0, rows, w * grad)
        if self.reduction == "none":
            return per_sample, grads
        if self.reduction == "mean":
            scale = 1.0 / max(self.n, 1)
            return per_sample.sum() * scale, [g * scale for g in grads]
        return per_sample.sum(), grads


class _HfcLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients in one fused call and saves the gradients; backward scales them."""

    @staticmethod
    def forward(ctx: Any, plan: _HfcPlan, *features: torch.Tensor) -> torch.Tensor:
        need_grad = any(ctx.needs_input_grad[1:])
        loss, grads = plan.run(features, need_grad)
        ctx.reduction = plan.reduction
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scale = grad_output[:, None] if ctx.reduction == "none" else grad_output
        grads = [g * scale for g in ctx.saved_tensors]
        return (None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:], strict=True)))


def hfc_loss(
    features: Sequence[Any],
    gmms: Sequence[GaussianMixture | Sequence[GaussianMixture]],
    mode: str = "loglik",
    weights: Sequence[float] | None = None,
    classes: Any = None,
    reduction: str = "sum",
    backend: str = "auto",
) -> torch.Tensor:
    """HFC feature constraint over many layers, all fused into one kernel call (docs/methods.md, HFC).

    ``features[l]`` is (N, d_l); ``gmms[l]`` is a mixture, or a sequence of per-class mixtures indexed by
    ``classes`` (N,). Layer term: -log p_l(h) (``"loglik"``) or ||(h - mu_k*) L_k*||^2 / d_l (``"nearest"``);
    the loss is the ``weights``-weighted sum over layers, reduced over samples by ``reduction`` ("mean" of an
    empty batch is 0). Returns a torch tensor with autograd to every feature that requires grad.
    """
    plan = _HfcPlan(features, gmms, mode, weights, classes, reduction, backend)
    return _HfcLoss.apply(plan, *plan.tensors)
