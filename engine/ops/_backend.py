"""Backend registry of engine.ops (input checks shared by every op and backend: :mod:`engine.ops._checks`).

Each op (``"gmm"``, ``"mahalanobis"``, ``"knn"``, ``"kde"``) has one implementation per backend:

* ``"cpu"``    C++ kernels in ``engine._C`` (OpenMP + SIMD + OpenBLAS), CPU tensors.
* ``"torch"``  plain PyTorch, any device; the always-available fallback.
* ``"triton"`` Triton kernels in ``engine.kernels`` (GPU tensors, or CPU tensors under TRITON_INTERPRET=1).
* ``"cuda"``   CUDA C++ kernels in ``engine._C_cuda``, GPU tensors.

Implementations register themselves with :func:`register`. The triton and cuda ones live in modules that are
imported only when first asked for, so importing ``engine`` never imports triton. ``backend="auto"`` picks the
fastest available backend for the tensor's device; an explicitly named backend that is unknown or unavailable
raises and lists the available ones.

Backend implementation signatures (inputs already validated: torch tensors, C-contiguous, one dtype
(float32 or float64) and one device; outputs in the input dtype; int64 indices):

* ``gmm(layers, mode, need_grad) -> list[(value, grad, component)]`` -- one entry per layer, all layers in one
  call. ``layers`` is a list of ``(x (N,d), means (K,d), prec_chol (K,d,d) upper-triangular, log_norm (K,))``
  (N, d and K may differ between entries) with ``log_norm_k = log w_k + sum(log diag L_k) - d/2 log(2 pi)``.
  ``mode="loglik"``: value = log p(x) (N,), grad = d value/dx (N,d); ``mode="nearest"``: value = squared
  Mahalanobis distance ||(x - mu_k*) L_k*||^2 to k* = argmax_k [log_norm_k - value_k/2], grad = its gradient
  with k* held fixed. ``component`` (N,) int64 is k* (the most responsible component) in both modes. ``grad`` is
  None when ``need_grad`` is False.
* ``mahalanobis(layers) -> list[(N,C)]`` -- ``layers`` is a list of ``(x (N,d), means (C,d), precision (d,d))``;
  squared distances (x - mu_c)^T P (x - mu_c).
* ``knn(x (N,d), ref (M,d), k, exclude_self) -> (dist (N,k), index (N,k))`` -- Euclidean distances ascending;
  with ``exclude_self`` (requires N == M) query i never returns reference i.
* ``kde(x (N,d), ref (M,d), bandwidth) -> (N,)`` -- log density of sklearn KernelDensity(kernel="gaussian"):
  log(1/M sum_j exp(-||x - r_j||^2 / (2 h^2))) - d/2 log(2 pi h^2).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from engine.errors import UserError

BACKENDS = ("cpu", "torch", "triton", "cuda")

# Modules whose import registers a backend's implementations (imported lazily, once).
_BACKEND_MODULES: dict[str, tuple[str, ...]] = {
    "cpu": (),  # registered by the op modules themselves
    "torch": (),
    "triton": ("engine.kernels",),
    "cuda": ("engine.ops._cuda",),
}
_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}
_LOAD_ERRORS: dict[str, str] = {}
_LOADED: set[str] = set()


def register(op: str, backend: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return deco


def _load(backend: str) -> None:
    if backend in _LOADED:
        return
    _LOADED.add(backend)
    for module in _BACKEND_MODULES[backend]:
        try:
            importlib.import_module(module)
        except Exception as exc:  # optional backend: remember why it is unavailable
            _LOAD_ERRORS[backend] = f"{type(exc).__name__}: {exc}"


def compiled_module() -> Any:
    """``engine._C``, or None when it cannot be imported: the error is then warned once and named whenever the
    "cpu" backend is asked for, and ``auto`` falls back to the torch backend."""
    try:
        from engine import _C
    except ImportError as exc:
        if "cpu" not in _LOAD_ERRORS:
            _LOAD_ERRORS["cpu"] = f"engine._C failed to import: {exc}"
            warnings.warn(f"{_LOAD_ERRORS['cpu']}; using the slower torch backend", RuntimeWarning, stacklevel=2)
        return None
    return _C


def available(op: str, device: torch.device | str | None = None) -> list[str]:
    """Backends that implement ``op`` (and can run on ``device`` when given)."""
    for backend in BACKENDS:
        _load(backend)
    names = list(_REGISTRY.get(op, {}))
    if device is not None:
        names = [b for b in names if _runs_on(b, torch.device(device))]
    return names


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _triton_interpret())
    return device.type == "cuda"  # cuda


def resolve(op: str, backend: str, device: torch.device) -> Callable[..., Any]:
    """Return the implementation of ``op`` for ``backend`` on ``device``."""
    if backend == "auto":
        preference = ("cpu", "torch") if device.type == "cpu" else ("cuda", "triton", "torch")
        for name in preference:
            _load(name)
            if name in _REGISTRY.get(op, {}) and _runs_on(name, device):
                return _REGISTRY[op][name]
        raise RuntimeError(f"no backend implements {op!r} on {device}")  # torch always does
    if backend not in BACKENDS:
        raise UserError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    _load(backend)
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None or not _runs_on(backend, device):
        why = _LOAD_ERRORS.get(backend, "not built or not registered" if impl is None else f"cannot run on {device}")
        raise UserError(
            f"backend {backend!r} is unavailable for {op!r} on {device} ({why}); available: {available(op, device)}"
        )
    return impl
