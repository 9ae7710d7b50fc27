"""Shared helpers of the kernel tests: per-dtype tolerances, the relative-error comparer, kernel backends and data.

The fp64 ground truth every test compares against is :mod:`engine.reference`; this module only holds what the
test files share around it. Import it as ``import support`` / ``from support import ...`` (tests/conftest.py puts
this directory on ``sys.path``); the ``backend`` fixture over :data:`BACKENDS` lives in tests/conftest.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pytest
import torch

from engine.mixture import GaussianMixture

# ---------------------------------------------------------------------------------------------------------------
# Tolerances


@dataclass(frozen=True)
class Tolerance:
    """Relative tolerances for results of one dtype (float32 against the fp64 reference: 1e-4 on values, 1e-3 on
    gradients)."""

    value: float  # log-probs, log densities, squared Mahalanobis distances, loss values
    grad: float  # gradients
    distance: float  # k-NN distances: recomputed exactly from differences, so within a few ulps


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for np.float32, np.dtype("float32"), torch.float32 or "float32" alike."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


class DtypeTable(Mapping):
    """Read-only mapping keyed by dtype; numpy and torch dtypes (and their names) select the same entry."""

    def __init__(self, entries: dict[str, Tolerance]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, dtype: Any) -> Tolerance:
        return self._entries[dtype_name(dtype)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


TOL = DtypeTable(
    {
        "float32": Tolerance(value=1e-4, grad=1e-3, distance=1e-6),
        "float64": Tolerance(value=1e-10, grad=1e-8, distance=1e-12),
    }
)


# ---------------------------------------------------------------------------------------------------------------
# Comparing results


def to_numpy(a: Any) -> np.ndarray:
    """A numpy copy/view of a numpy array, torch tensor (any device, autograd or not) or Python number."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def assert_rel(
    actual: Any,
    expected: Any,
    rtol: float,
    *,
    atol: float = 0.0,
    floor: float = 0.0,
    scale: Literal["element", "max", "row"] = "element",
    what: str = "",
    max_print: int = 5,
) -> None:
    """Assert ``|actual - expected| <= atol + rtol * s`` (in float64), listing the mismatching indices on failure.

    ``s`` is chosen by ``scale``:

    * ``"element"``: ``max(|expected_i|, floor)`` per element (``floor=0`` is numpy's ``assert_allclose``);
    * ``"max"``: ``max(max_i |expected_i|, floor)`` over the finite entries (a max-norm relative error);
    * ``"row"``: per row of a 2-D array on Euclidean norms, ``||a_i - e_i|| <= atol + rtol * max(||e_i||, floor)``.

    Shapes must be equal. Exactly equal entries (infinities included) pass; NaN and unmatched infinities never do.
    """
    a = to_numpy(actual).astype(np.float64)
    e = to_numpy(expected).astype(np.float64)
    label = f"{what}: " if what else ""
    assert a.shape == e.shape, f"{label}shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    if a.ndim == 0:
        a, e = a.reshape(1), e.reshape(1)
    with np.errstate(invalid="ignore", over="ignore"):
        if scale == "row":
            assert a.ndim == 2, f"{label}scale='row' needs a 2-D array, got shape {a.shape}"
            equal = np.all(a == e, axis=1)
            diff = np.linalg.norm(a - e, axis=1)
            bound = atol + rtol * np.maximum(np.linalg.norm(e, axis=1), floor)
            unit = "row"
        elif scale in ("element", "max"):
            equal = a == e
            diff = np.abs(a - e)
            finite = np.abs(e[np.isfinite(e)])
            largest = float(finite.max()) if finite.size else 0.0
            s = np.maximum(np.abs(e), floor) if scale == "element" else max(largest, floor)
            bound = atol + rtol * s
            unit = "element"
        else:
            raise ValueError(f"scale must be 'element', 'max' or 'row', got {scale!r}")
        ok = equal | (np.isfinite(diff) & (diff <= bound))
    if np.all(ok):
        return
    bad = np.argwhere(~ok)
    with np.errstate(divide="ignore", invalid="ignore"):
        excess = np.where(np.isnan(diff), np.inf, diff / np.broadcast_to(bound, diff.shape))
    worst = bad[np.argsort(-excess[tuple(bad.T)], kind="stable")][:max_print]
    lines = [
        f"{label}{len(bad)} of {diff.size} {unit}s exceed atol={atol:g} + rtol={rtol:g} * scale "
        f"(scale={scale}, floor={floor:g}); mismatching indices {[tuple(int(i) for i in b) for b in bad[:20]]}"
        + (" ..." if len(bad) > 20 else "")
    ]
    for index in (tuple(int(i) for i in w) for w in worst):
        if scale == "row":
            got, want = a[index[0]], e[index[0]]
        else:
            got, want = a[index], e[index]
        allowed = np.broadcast_to(bound, diff.shape)[index]
        lines.append(f"  at {index}: actual={got}, expected={want}, error={diff[index]:.3g}, allowed={allowed:.3g}")
    raise AssertionError("\n".join(lines))


def assert_output(out: Any, like: Any, dtype: Any, shape: tuple[int, ...]) -> None:
    """``out`` is the kind of ``like`` (numpy array, or torch tensor on ``like``'s device) with ``dtype``, ``shape``."""
    if isinstance(like, torch.Tensor):
        assert isinstance(out, torch.Tensor), f"torch input gave {type(out).__name__}"
        assert out.device == like.device, f"output on {out.device}, input on {like.device}"
    else:
        assert isinstance(out, np.ndarray), f"numpy input gave {type(out).__name__}"
    assert dtype_name(out.dtype) == dtype_name(dtype), f"dtype {out.dtype} != {dtype}"
    assert tuple(out.shape) == tuple(shape), f"shape {tuple(out.shape)} != {tuple(shape)}"


# ---------------------------------------------------------------------------------------------------------------
# Backends

BACKENDS = ("cpu", "torch", "triton", "cuda")
OPS = ("gmm", "mahalanobis", "knn", "kde")
# Above this much work (~multiply-adds of the call) the Triton interpreter takes seconds; the tests' large shapes
# exist for the compiled kernels' tiling and OpenMP thresholds and are skipped there.
INTERPRETER_MAX_WORK = 200_000


def device_for(backend: str) -> torch.device:
    """The device of the tensors ``backend`` runs on in this process ("triton": CPU under TRITON_INTERPRET=1)."""
    if backend == "cuda" or (backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") != "1"):
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs under the (slow) Triton interpreter."""
    return backend == "triton" and device_for(backend).type == "cpu"


def unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run every op of :data:`OPS` in this process, or None if it can."""
    from engine.ops import _backend

    device = device_for(backend)
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"backend {backend!r} needs a CUDA device (torch.cuda.is_available() is False)"
    missing = [op for op in OPS if backend not in _backend.available(op, device)]
    if missing:
        why = _backend._LOAD_ERRORS.get(backend, "not built or not registered")
        return f"backend {backend!r} is unavailable for {missing} on {device}: {why}"
    return None


def skip_slow(backend: str, work: int) -> None:
    """Skip under the Triton interpreter when ``work`` exceeds :data:`INTERPRETER_MAX_WORK`."""
    if interpreted(backend) and work > INTERPRETER_MAX_WORK:
        pytest.skip(
            f"triton interpreter: work {work:.2g} > {INTERPRETER_MAX_WORK:.0g} (a compiled-kernel tiling shape)"
        )


def put(a: Any, backend: str) -> Any:
    """Input for ``backend``: numpy arrays stay numpy where it runs on CPU tensors (numpy in, numpy out is part of
    the API); otherwise a torch tensor on its device. Tensors are moved to the device."""
    device = device_for(backend)
    if isinstance(a, torch.Tensor):
        return a.to(device)
    if device.type == "cpu":
        return a
    return torch.from_numpy(np.asarray(a)).to(device)


def tensor(a: Any, backend: str, dtype: torch.dtype | None = None, requires_grad: bool = False) -> torch.Tensor:
    """A fresh torch tensor (a leaf) on ``backend``'s device."""
    t = torch.tensor(to_numpy(a), dtype=dtype, device=device_for(backend))
    return t.requires_grad_(requires_grad)


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same 2-D tensor (same device, a new leaf) stored column-major: not C-contiguous when both sizes > 1."""
    out = t.detach().T.contiguous().T
    assert not out.is_contiguous() or min(out.shape) <= 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# Data


def random_mixture(
    rng: np.random.Generator,
    k: int,
    d: int,
    cond: float = 10.0,
    offset: float = 0.0,
    spread: float = 3.0,
    lowest: float = 1.0,
) -> GaussianMixture:
    """K random components; precision eigenvalues log-spaced over [lowest, lowest * cond]; lower factors
    (canonicalised to upper by GaussianMixture); means ``offset + spread * N(0, 1)``."""
    means = offset + spread * rng.normal(size=(k, d))
    factors = []
    for _ in range(k):
        basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
        precision = (basis * (lowest * np.logspace(0, np.log10(cond), d))) @ basis.T
        factors.append(np.linalg.cholesky(precision))
    weights = rng.uniform(0.5, 1.5, size=k)
    return GaussianMixture(means, np.stack(factors), weights / weights.sum())


def samples(rng: np.random.Generator, gmm: GaussianMixture, n: int, scale: float = 0.7) -> np.ndarray:
    """(n, d) float64 points near the mixture's components."""
    return gmm.means[rng.integers(gmm.n_components, size=n)] + scale * rng.normal(size=(n, gmm.dim))


def rounded(gmm: GaussianMixture, dtype: Any) -> GaussianMixture:
    """The mixture whose parameters are exactly those a ``dtype`` kernel sees (parameters rounded to ``dtype``)."""
    np_dtype = np.dtype(dtype_name(dtype))
    return GaussianMixture(*(a.astype(np_dtype) for a in (gmm.means, gmm.precisions_cholesky, gmm.weights)))


def ref_args(gmm: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(means, precisions_cholesky, weights)`` float64 CPU tensors: the mixture arguments of engine.reference."""
    return tuple(torch.tensor(a) for a in (gmm.means, gmm.precisions_cholesky, gmm.weights))


def class_data(
    rng: np.random.Generator, n: int, c: int, d: int, offset: float = 0.0, cond: float = 10.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 ``(x (n,d), means (c,d), precision (d,d))``: features of c classes around their means under one tied
    covariance, and its inverse (precision eigenvalues log-spaced over [1, cond])."""
    means = offset + 3 * rng.normal(size=(c, d))
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    covariance = (basis / np.logspace(0, np.log10(cond), d)) @ basis.T
    labels = rng.integers(c, size=n)
    x = means[labels] + rng.multivariate_normal(np.zeros(d), covariance, size=n)
    return x, means, np.linalg.inv(covariance)


def query_batch(
    rng: np.random.Generator, n: int, m: int, d: int, offset: float = 0.0, near: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(x (n,d), ref (m,d))`` for k-NN / KDE: references ``offset + N(0, 1)``; queries likewise, or
    ``near`` (a standard deviation) away from randomly chosen references when given."""
    ref = offset + rng.normal(size=(m, d))
    if near is None:
        return offset + rng.normal(size=(n, d)), ref
    return ref[rng.integers(m, size=n)] + near * rng.normal(size=(n, d)), ref
