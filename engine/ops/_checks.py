"""Input checks shared by every op and every backend of engine.ops: one place for each rule and its message.

The public functions (engine.ops.gmm, mahalanobis, knn, kde) validate here before resolving a backend; backend
implementations (C++, torch, Triton, CUDA wrappers) get validated input and use only :func:`check_dtype` (the
dtypes their kernels are compiled for) and :func:`precision_factor` (the positive-definite check is a by-product
of the factorisation they need). Bad input raises :class:`engine.errors.UserError` naming the argument;
:class:`InputTypeError` (a UserError that is also a TypeError) for a wrong type or dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.errors import UserError

DTYPES = (torch.float32, torch.float64)
GMM_MODES = ("loglik", "nearest")


class InputTypeError(UserError, TypeError):
    """An argument of the wrong type or dtype (callers catching TypeError or ValueError both see it)."""


def as_tensor(value: Any, name: str, ndim: int | None = None) -> tuple[torch.Tensor, bool]:
    """Convert ``value`` (numpy array or torch tensor, float32/float64) to a tensor without copying.

    Returns ``(tensor, was_numpy)``.
    """
    was_numpy = isinstance(value, np.ndarray)
    if was_numpy:
        if value.dtype not in (np.float32, np.float64):
            raise InputTypeError(f"{name} must be float32 or float64, got numpy dtype {value.dtype}")
        tensor = torch.from_numpy(value)
    elif isinstance(value, torch.Tensor):
        check_dtype(value, name)
        tensor = value
    else:
        raise InputTypeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise UserError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    return tensor, was_numpy


def to_output(tensor: torch.Tensor, was_numpy: bool) -> Any:
    """Return ``tensor`` as numpy when the caller passed numpy."""
    return tensor.detach().cpu().numpy() if was_numpy else tensor


def check_dtype(tensor: torch.Tensor, name: str) -> None:
    """``tensor`` must be float32 or float64 (the dtypes every backend's kernels are built for)."""
    if tensor.dtype not in DTYPES:
        raise InputTypeError(f"{name} must be float32 or float64, got {tensor.dtype}")


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """``tensor`` must hold no NaN or inf."""
    if not tensor.numel():
        return
    if tensor.device.type == "cpu":  # numpy's check is several times faster than torch's on CPU
        finite = bool(np.isfinite(tensor.detach().numpy()).all())
    else:
        finite = bool(torch.isfinite(tensor).all())
    if not finite:
        raise UserError(f"{name} contains NaN or inf")


def check_same(tensors: dict[str, torch.Tensor]) -> None:
    """All named tensors must share dtype and device."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise InputTypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; use one dtype")
        if t.device != first.device:
            raise UserError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_mode(mode: Any) -> str:
    """The GMM/HFC ``mode``: one of :data:`GMM_MODES`."""
    if mode not in GMM_MODES:
        raise UserError(f"mode must be one of {GMM_MODES}, got {mode!r}")
    return mode


def check_pair(x: Any, ref: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Queries ``x`` (N,d) and references ``ref`` (M,d), M >= 1, as C-contiguous finite tensors of one dtype and
    device: ``(x, ref, x_was_numpy)``."""
    xt, was_numpy = as_tensor(x, "x", ndim=2)
    rt, _ = as_tensor(ref, "ref", ndim=2)
    check_same({"x": xt, "ref": rt})
    if xt.shape[1] < 1:
        raise UserError(f"x must have at least 1 column, got shape {tuple(xt.shape)}")
    if rt.shape[1] != xt.shape[1]:
        raise UserError(f"ref must have shape (M, {xt.shape[1]}) to match x, got {tuple(rt.shape)}")
    if rt.shape[0] < 1:
        raise UserError("ref must have at least 1 row")
    check_finite(xt, "x")
    check_finite(rt, "ref")
    return xt.detach().contiguous(), rt.detach().contiguous(), was_numpy


def precision_name(layer: int, n_layers: int) -> str:
    """How errors name a Mahalanobis layer's precision: ``precision`` for one layer, ``precision[i]`` for several."""
    return f"precision[{layer}]" if n_layers > 1 else "precision"


def not_positive_definite(name: str, minor: int) -> UserError:
    """The error every backend raises for a precision whose symmetric part has no Cholesky factor."""
    return UserError(
        f"{name} is not positive definite (leading minor {minor} of its symmetric part); "
        "regularise the covariance before inverting it or use float64"
    )


def precision_factor(precision: torch.Tensor, name: str, upper: bool = False) -> torch.Tensor:
    """float64 Cholesky factor of the symmetric part S of ``precision`` (only it matters in a quadratic form):
    lower L with L L^T = S, or with ``upper`` upper U with U U^T = S. Raises :func:`not_positive_definite`."""
    sym = precision.to(torch.float64)
    sym = 0.5 * (sym + sym.T)
    lower, info = torch.linalg.cholesky_ex(sym)
    if int(info) != 0:
        raise not_positive_definite(name, int(info))
    if not upper:
        return lower
    # U U^T = S with U upper  <=>  (J U J)(J U J)^T = J S J with J U J lower (J reverses the index order).
    return torch.linalg.cholesky(sym.flip(0, 1)).flip(0, 1)
