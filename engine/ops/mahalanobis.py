"""Squared Mahalanobis distances to class means under one tied precision, several layers in one call.

The public function validates, then hands a list of layer entries to one backend call (the ``mahalanobis``
contract in :mod:`engine.ops._backend`). Backends registered here: ``"cpu"`` (the C++ kernel in ``engine._C``:
double Cholesky, one triangular product of the centred rows per tile, threads over layers and rows) and
``"torch"`` (the same method in plain PyTorch on any device). Gradients flow to ``x``, ``means`` and
``precision`` through a ``torch.autograd.Function`` when any of them requires grad.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.errors import UserError
from engine.ops._backend import compiled_module, register, resolve
from engine.ops._checks import as_tensor, check_finite, check_same, precision_factor, precision_name, to_output

# Torch backend: rows per tile so one tile's (rows, C, d) difference tensor holds at most this many elements.
TORCH_TILE_ELEMENTS = 1 << 22

Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Backends


def _register_cpu() -> None:
    _C = compiled_module()
    if _C is None:
        return
    if not hasattr(_C, "mahalanobis"):
        return

    @register("mahalanobis", "cpu")
    def mahalanobis_cpu(layers: list[Layer]) -> list[torch.Tensor]:
        try:
            out = _C.mahalanobis([tuple(t.numpy() for t in layer) for layer in layers])
        except _C.ArgumentError as exc:  # its Cholesky found a precision that is not positive definite
            raise UserError(str(exc)) from None
        return [torch.from_numpy(o) for o in out]


_register_cpu()


@register("mahalanobis", "torch")
def mahalanobis_torch(layers: list[Layer]) -> list[torch.Tensor]:
    """Plain PyTorch: float64 Cholesky S = L L^T of the symmetric part, z = (x - c) L, ||z - (mu - c) L||^2."""
    out = []
    for i, (x, means, precision) in enumerate(layers):
        chol = precision_factor(precision, precision_name(i, len(layers)))
        centre = means.to(torch.float64).mean(0)
        z = (x - centre.to(x.dtype)) @ chol.to(x.dtype)
        means_z = (means.to(torch.float64) - centre) @ chol
        rows = max(1, TORCH_TILE_ELEMENTS // (means.shape[0] * x.shape[1]))
        dist = torch.empty(x.shape[0], means.shape[0], dtype=x.dtype, device=x.device)
        for r0 in range(0, x.shape[0], rows):
            diff = z[r0 : r0 + rows, None, :].to(torch.float64) - means_z[None]
            dist[r0 : r0 + rows] = (diff * diff).sum(-1).to(x.dtype)
        out.append(dist)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Autograd


class _Mahalanobis(torch.autograd.Function):
    """Forward: one backend call for all layers. Backward (torch): with S2 = P + P^T and D_c = x - mu_c,
    dx = sum_c g_c D_c S2, dmu_c = -sum_n g_nc D_nc S2, dP = sum_c D_c^T diag(g_c) D_c."""

    @staticmethod
    def forward(ctx: Any, impl: Any, n_layers: int, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = [tuple(flat[3 * i : 3 * i + 3]) for i in range(n_layers)]
        ctx.save_for_backward(*flat)
        return tuple(impl(layers))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat = ctx.saved_tensors
        out: list[torch.Tensor | None] = [None, None]
        for i, g in enumerate(grads):
            x, means, precision = flat[3 * i : 3 * i + 3]
            s2 = precision + precision.T
            gx = (g.sum(1)[:, None] * x - g @ means) @ s2  # sum_c g_nc (x_n - mu_c) S2
            gm = -(g.T @ x - g.sum(0)[:, None] * means) @ s2
            gp = None
            if ctx.needs_input_grad[2 + 3 * i + 2]:
                gp = sum((x - mu).T @ ((x - mu) * g[:, c, None]) for c, mu in enumerate(means))
            out += [gx, gm, gp]
        return tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# Public API


def _layer(x: Any, means: Any, precision: Any, suffix: str) -> tuple[Layer, bool]:
    xt, was_numpy = as_tensor(x, f"x{suffix}", ndim=2)
    mt, _ = as_tensor(means, f"means{suffix}", ndim=2)
    pt, _ = as_tensor(precision, f"precision{suffix}", ndim=2)
    d = xt.shape[1]
    if d < 1:
        raise UserError(f"x{suffix} must have at least 1 column, got shape {tuple(xt.shape)}")
    if mt.shape[1] != d or mt.shape[0] < 1:
        raise UserError(f"means{suffix} must have shape (C, {d}) with C >= 1 to match x, got {tuple(mt.shape)}")
    if tuple(pt.shape) != (d, d):
        raise UserError(f"precision{suffix} must have shape ({d}, {d}) to match x, got {tuple(pt.shape)}")
    for t, name in ((xt, "x"), (mt, "means"), (pt, "precision")):
        check_finite(t, name + suffix)
    return (xt, mt, pt), was_numpy


def mahalanobis(x: Any, means: Any, precision: Any, backend: str = "auto") -> Any:
    """(N,C) squared distances (x_n - mu_c)^T P (x_n - mu_c) of the rows of ``x`` to the class ``means`` (C,d)
    under one tied ``precision`` (d,d) (only its symmetric part matters; it must be positive definite).

    Lists ``x=[x1, x2]``, ``means=[m1, m2]``, ``precision=[P1, P2]`` run several layers in one call and return a
    list of (N_l, C_l) results.
    """
    multi = isinstance(x, Sequence) and not isinstance(x, (str, bytes))
    if multi:
        for name, value in (("means", means), ("precision", precision)):
            if not isinstance(value, Sequence) or len(value) != len(x):
                raise UserError(f"{name} must be a list with one entry per layer ({len(x)}) when x is a list")
        if not x:
            return []
        entries = [_layer(x[i], means[i], precision[i], f"[{i}]") for i in range(len(x))]
    else:
        entries = [_layer(x, means, precision, "")]
    layers = [layer for layer, _ in entries]
    names = ("x", "means", "precision")
    check_same({f"{names[j]}[{i}]": t for i, layer in enumerate(layers) for j, t in enumerate(layer)})
    impl = resolve("mahalanobis", backend, layers[0][0].device)
    flat = [t for layer in layers for t in layer]
    if torch.is_grad_enabled() and any(t.requires_grad for t in flat):
        outs = _Mahalanobis.apply(impl, len(layers), *[t.contiguous() for t in flat])
    else:
        outs = impl([tuple(t.detach().contiguous() for t in layer) for layer in layers])
    results = [to_output(o, was_numpy) for o, (_, was_numpy) in zip(outs, entries, strict=True)]
    return results if multi else results[0]
