"""Backend "cuda": the CUDA C++ kernels of ``engine._C_cuda`` for ops gmm, mahalanobis, knn and kde.

Imported by :mod:`engine.ops._backend` the first time backend "cuda" is asked for; the import fails (and the
backend is reported unavailable) when ``engine._C_cuda`` was not built. Signatures and semantics are the backend
contract in the docstring of :mod:`engine.ops._backend`. The wrappers allocate outputs and scratch with torch on
the input's device and pass raw pointers, sizes and the current stream; kernels run asynchronously on that
stream. Small per-layer set-up (centres, the Mahalanobis factor and projected means) is plain torch in float64.
"""

from __future__ import annotations

import torch

from engine import _C_cuda
from engine.ops._backend import register
from engine.ops._checks import check_dtype, check_mode, precision_factor, precision_name

_DTYPES = {torch.float32: _C_cuda.DType.float32, torch.float64: _C_cuda.DType.float64}

Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
LayerResult = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]


def _ptr(tensor: torch.Tensor | None, name: str) -> int:
    """Device address of a C-contiguous CUDA tensor (0 for None)."""
    if tensor is None:
        return 0
    if not tensor.is_cuda or not tensor.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous CUDA tensor, got device {tensor.device}, shape "
            f"{tuple(tensor.shape)}, strides {tensor.stride()}"
        )
    return tensor.data_ptr()


def _dtype(tensor: torch.Tensor) -> _C_cuda.DType:
    check_dtype(tensor, "x")
    return _DTYPES[tensor.dtype]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@register("gmm", "cuda")
def gmm_cuda(layers: list[Layer], mode: str, need_grad: bool) -> list[LayerResult]:
    """All layers in one kernel launch; see the ``gmm`` contract in engine.ops._backend."""
    check_mode(mode)
    if not layers:
        return []
    first = layers[0][0]
    results: list[LayerResult] = []
    entries = []
    keep = []  # every layer's scratch stays allocated until the launch, or a later layer could reuse its memory
    for i, (x, means, prec_chol, log_norm) in enumerate(layers):
        n, d = x.shape
        value = torch.empty(n, dtype=x.dtype, device=x.device)
        component = torch.empty(n, dtype=torch.int64, device=x.device)
        grad = torch.empty_like(x) if need_grad else None
        work = torch.empty_like(x) if need_grad else None
        keep.append(work)
        entries.append(
            _C_cuda.GmmLayer(
                x=_ptr(x, f"layers[{i}] x"),
                means=_ptr(means, f"layers[{i}] means"),
                prec_chol=_ptr(prec_chol, f"layers[{i}] prec_chol"),
                log_norm=_ptr(log_norm, f"layers[{i}] log_norm"),
                value=_ptr(value, "value"),
                grad=_ptr(grad, "grad"),
                work=_ptr(work, "work"),
                component=_ptr(component, "component"),
                n=n,
                d=d,
                k=means.shape[0],
            )
        )
        results.append((value, grad, component))
    with torch.cuda.device(first.device):
        _C_cuda.gmm(dtype=_dtype(first), nearest=mode == "nearest", layers=entries, stream=_stream(first.device))
    return results


@register("mahalanobis", "cuda")
def mahalanobis_cuda(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """All layers in one kernel launch: ||(x - c) U - (mu - c) U||^2 with c the mean of the class means."""
    if not layers:
        return []
    first = layers[0][0]
    outputs, entries, keep = [], [], []
    for i, (x, means, precision) in enumerate(layers):
        factor = precision_factor(precision, precision_name(i, len(layers)), upper=True)
        means64 = means.to(torch.float64)
        centre64 = means64.mean(dim=0)
        centre = centre64.to(x.dtype)
        proj_means = ((means64 - centre64) @ factor).to(x.dtype).contiguous()
        factor = factor.to(x.dtype).contiguous()
        out = torch.empty(x.shape[0], means.shape[0], dtype=x.dtype, device=x.device)
        keep += [centre, factor, proj_means]
        entries.append(
            _C_cuda.MahalanobisLayer(
                x=_ptr(x, f"layers[{i}] x"),
                centre=_ptr(centre, "centre"),
                factor=_ptr(factor, "factor"),
                proj_means=_ptr(proj_means, "proj_means"),
                out=_ptr(out, "out"),
                n=x.shape[0],
                d=x.shape[1],
                c=means.shape[0],
            )
        )
        outputs.append(out)
    with torch.cuda.device(first.device):
        _C_cuda.mahalanobis(dtype=_dtype(first), layers=entries, stream=_stream(first.device))
    return outputs


def _centre(ref: torch.Tensor) -> torch.Tensor:
    """Mean of the references (accumulated in float64), subtracted from both sides before the GEMM expansion."""
    return ref.mean(dim=0, dtype=torch.float64).to(ref.dtype)


@register("knn", "cuda")
def knn_cuda(x: torch.Tensor, ref: torch.Tensor, k: int, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) ascending Euclidean distances and int64 indices of the nearest references."""
    n, d = x.shape
    m = ref.shape[0]
    dist = torch.empty(n, k, dtype=x.dtype, device=x.device)
    index = torch.empty(n, k, dtype=torch.int64, device=x.device)
    if n == 0:
        return dist, index
    centre = _centre(ref)
    work = torch.empty(n + m, dtype=x.dtype, device=x.device)
    args = dict(
        x=_ptr(x, "x"),
        ref=_ptr(ref, "ref"),
        centre=_ptr(centre, "centre"),
        dist=_ptr(dist, "dist"),
        index=_ptr(index, "index"),
        work=_ptr(work, "work"),
    )
    with torch.cuda.device(x.device):
        _C_cuda.knn(dtype=_dtype(x), n=n, m=m, d=d, k=k, exclude_self=exclude_self, stream=_stream(x.device), **args)
    return dist, index


@register("kde", "cuda")
def kde_cuda(x: torch.Tensor, ref: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """(N,) Gaussian KDE log density, normalised as sklearn KernelDensity(kernel="gaussian")."""
    n, d = x.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    centre = _centre(ref)
    work = torch.empty(n + ref.shape[0], dtype=x.dtype, device=x.device)
    args = dict(
        x=_ptr(x, "x"),
        ref=_ptr(ref, "ref"),
        centre=_ptr(centre, "centre"),
        out=_ptr(out, "out"),
        work=_ptr(work, "work"),
    )
    with torch.cuda.device(x.device):
        _C_cuda.kde(
            dtype=_dtype(x), n=n, m=ref.shape[0], d=d, bandwidth=float(bandwidth), stream=_stream(x.device), **args
        )
    return out
