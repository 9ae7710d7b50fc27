"""CUDA backend (csrc/cuda, engine._C_cuda, engine.ops._cuda).

Without a GPU (the development machines): the .cu sources compile for several architectures, the module imports,
validates its arguments and fails with a clear RuntimeError, and the registry refuses CPU tensors. With a GPU:
every op agrees with engine.reference (fp64) and with the C++ "cpu" backend on odd shapes (not multiples of the
32-row/32-column tiles), float32 and float64, several layers per fused call.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import reference
from engine.ops import _backend

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")  # A100, H100
OPS = ("gmm", "mahalanobis", "knn", "kde")
DTYPES = (torch.float32, torch.float64)
# Max-norm relative error against the fp64 reference: (values, gradients / distances), per dtype.
TOL = {torch.float32: (1e-4, 1e-3), torch.float64: (1e-10, 1e-8)}

try:
    from engine import _C_cuda
except ImportError as exc:  # not built (no nvcc at build time)
    _C_cuda = None
    _IMPORT_ERROR = str(exc)

needs_module = pytest.mark.skipif(_C_cuda is None, reason="engine._C_cuda was not built (no nvcc at build time)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())")


# ---------------------------------------------------------------------------------------------------------------
# Build and module checks (run everywhere nvcc / the module exist)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found on PATH")
def test_sources_compile_for_two_architectures(tmp_path):
    assert {p.stem for p in CU_SOURCES} >= set(OPS)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]

    def compile_one(src: Path) -> tuple[str, subprocess.CompletedProcess]:
        cmd = ["nvcc", "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o"), "-O3", "-std=c++17", *gencode]
        cmd += ["-Xcompiler", "-fPIC,-Wall", f"-I{ROOT / 'csrc' / 'include'}"]
        return src.name, subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, CU_SOURCES))
    failures = [f"{name}:\n{r.stderr}" for name, r in results if r.returncode != 0]
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    warnings = [line for _, r in results for line in r.stderr.splitlines() if "csrc/cuda" in line and "warning" in line]
    assert not warnings, "nvcc warnings in csrc/cuda:\n" + "\n".join(warnings)
    assert all((tmp_path / f"{src.stem}.o").stat().st_size > 0 for src in CU_SOURCES)


@needs_module
def test_module_exposes_kernels_and_registers_every_op():
    for name in (*OPS, "device_count", "DType", "GmmLayer", "MahalanobisLayer"):
        assert hasattr(_C_cuda, name), name
    for op in OPS:
        assert "cuda" in _backend.available(op), op


@needs_module
def test_launchers_validate_arguments_before_touching_the_device():
    f32 = _C_cuda.DType.float32
    knn = dict(dtype=f32, x=1, ref=1, centre=1, dist=1, index=1, work=1, d=3, stream=0)
    with pytest.raises(ValueError, match=r"k must be at most 4 \(requested 5\)"):
        _C_cuda.knn(n=5, m=5, k=5, exclude_self=True, **knn)
    with pytest.raises(ValueError, match="exclude_self"):
        _C_cuda.knn(n=2, m=5, k=1, exclude_self=True, **knn)
    with pytest.raises(ValueError, match="bandwidth"):
        _C_cuda.kde(dtype=f32, x=1, ref=1, centre=1, out=1, work=1, n=2, m=2, d=1, bandwidth=0.0, stream=0)
    layer = dict(x=1, means=1, prec_chol=1, log_norm=1, value=1, component=1, n=4, d=2, k=1)
    with pytest.raises(ValueError, match="work buffer"):
        _C_cuda.gmm(dtype=f32, nearest=False, layers=[_C_cuda.GmmLayer(grad=1, work=0, **layer)], stream=0)
    bad = _C_cuda.MahalanobisLayer(x=1, centre=1, factor=1, proj_means=1, out=1, n=3, d=0, c=1)
    with pytest.raises(ValueError, match="layer 0"):
        _C_cuda.mahalanobis(dtype=f32, layers=[bad], stream=0)
    # Empty batches return without any CUDA call, even with null pointers.
    _C_cuda.knn(
        dtype=f32, x=0, ref=0, centre=0, dist=0, index=0, work=0, n=0, m=3, d=2, k=2, exclude_self=False, stream=0
    )


@needs_module
def test_calls_without_a_gpu_raise_runtime_error():
    if _C_cuda.device_count() > 0:
        pytest.skip("a CUDA device is visible: this checks the error path of GPU-less machines")
    f32 = _C_cuda.DType.float32
    layer = _C_cuda.GmmLayer(x=1, means=1, prec_chol=1, log_norm=1, value=1, grad=0, work=0, component=1, n=3, d=2, k=1)
    calls = {
        "gmm": lambda: _C_cuda.gmm(dtype=f32, nearest=False, layers=[layer], stream=0),
        "mahalanobis": lambda: _C_cuda.mahalanobis(
            dtype=f32,
            layers=[_C_cuda.MahalanobisLayer(x=1, centre=1, factor=1, proj_means=1, out=1, n=3, d=2, c=1)],
            stream=0,
        ),
        "knn": lambda: _C_cuda.knn(
            dtype=f32, x=1, ref=1, centre=1, dist=1, index=1, work=1, n=2, m=2, d=1, k=1, exclude_self=False, stream=0
        ),
        "kde": lambda: _C_cuda.kde(
            dtype=f32, x=1, ref=1, centre=1, out=1, work=1, n=2, m=2, d=1, bandwidth=1.0, stream=0
        ),
    }
    for op, call in calls.items():
        with pytest.raises(RuntimeError, match=f"CUDA error in {op}: "):
            call()


@needs_module
def test_wrappers_refuse_cpu_tensors():
    from engine.ops import _cuda

    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="must be a contiguous CUDA tensor"):
        _cuda.knn_cuda(x, x, 2, False)
    with pytest.raises(ValueError, match="must be a contiguous CUDA tensor"):
        _cuda.kde_cuda(x, x, 1.0)


def test_cuda_backend_for_cpu_tensors_raises_and_lists_available_backends():
    from engine import ops
    from engine.mixture import GaussianMixture

    x = torch.zeros(4, 3)
    gmm = GaussianMixture(np.zeros((1, 3)), np.eye(3)[None], np.ones(1))
    calls = {
        "gmm": lambda: ops.gmm_log_prob(x, gmm, backend="cuda"),
        "mahalanobis": lambda: ops.mahalanobis(x, torch.zeros(2, 3), torch.eye(3), backend="cuda"),
        "knn": lambda: ops.knn_distances(x, x, 2, backend="cuda"),
        "kde": lambda: ops.kde_log_density(x, x, 1.0, backend="cuda"),
    }
    for op, call in calls.items():
        with pytest.raises(
            ValueError, match=rf"backend 'cuda' is unavailable for '{op}' on cpu .*available: \[.*'cpu'"
        ):
            call()


# ---------------------------------------------------------------------------------------------------------------
# GPU: the cuda backend against engine.reference (fp64) and the "cpu" backend


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max-norm relative error max|got - want| / max(max|want|, 1e-300), in float64 on the CPU."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return 0.0
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def cuda_impl(op: str):
    return _backend.resolve(op, "cuda", torch.device("cuda"))


def cpu_impl(op: str):
    """The C++ backend, the oracle for the CUDA kernels; None where it is not built."""
    try:
        return _backend.resolve(op, "cpu", torch.device("cpu"))
    except ValueError:
        return None


def random_gmm_layer(gen: torch.Generator, n: int, d: int, k: int, dtype: torch.dtype, offset: float = 0.0):
    """(x, means, prec_chol, log_norm) in fp64 on the CPU, plus the weights; x near the components."""
    means = offset + 2.0 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    diag = torch.exp(torch.rand(k, d, generator=gen, dtype=torch.float64) - 0.5)
    prec_chol = torch.triu(0.3 * torch.randn(k, d, d, generator=gen, dtype=torch.float64), 1) + torch.diag_embed(diag)
    weights = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    x = means[torch.randint(k, (n,), generator=gen)] + 0.8 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    # Round to the kernel dtype first so the fp64 reference sees exactly the kernel's inputs.
    x, means, prec_chol = (t.to(dtype).to(torch.float64) for t in (x, means, prec_chol))
    log_norm = (
        torch.log(weights)
        + torch.log(torch.diagonal(prec_chol, dim1=1, dim2=2)).sum(1)
        - 0.5 * d * math.log(2 * math.pi)
    )
    return (x, means, prec_chol, log_norm), weights


# (N, d, K): one row, d = 1, K = 1, tiles that end mid-way, d just over one tile, an empty batch.
GMM_LAYERS = [(1, 1, 1), (37, 5, 3), (70, 41, 4), (33, 64, 2), (0, 3, 2), (5, 33, 1)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["loglik", "nearest"])
def test_gmm_matches_reference_and_cpu(dtype, mode):
    gen = torch.Generator().manual_seed(11)
    layers64, weights = zip(
        *(random_gmm_layer(gen, n, d, k, dtype, offset=30.0 * (i % 2)) for i, (n, d, k) in enumerate(GMM_LAYERS)),
        strict=True,
    )
    results = cuda_impl("gmm")([tuple(t.to(dtype).cuda() for t in layer) for layer in layers64], mode, True)
    cpu = cpu_impl("gmm")
    cpu_results = cpu([tuple(t.to(dtype) for t in layer) for layer in layers64], mode, True) if cpu else None
    tol_value, tol_grad = TOL[dtype]
    for i, ((x, means, prec_chol, _), w) in enumerate(zip(layers64, weights, strict=True)):
        value, grad, component = results[i]
        assert value.dtype == dtype and grad.dtype == dtype and component.dtype == torch.int64
        assert value.shape == (x.shape[0],) and grad.shape == x.shape and component.shape == (x.shape[0],)
        logp = reference.gmm_component_log_prob(x, means, prec_chol, w)
        if mode == "loglik":
            want_value, want_grad = reference.gmm_log_prob_grad(x, means, prec_chol, w)
        else:
            want_value, k_star = reference.gmm_nearest(x, means, prec_chol, w)
            y = torch.einsum("nd,nde->ne", x - means[k_star], prec_chol[k_star])
            want_grad = 2 * torch.einsum("ne,nde->nd", y, prec_chol[k_star])
        assert rel_err(value, want_value) <= tol_value, f"layer {i} value"
        assert rel_err(grad, want_grad) <= tol_grad, f"layer {i} grad"
        # Components must match wherever the best two are not within rounding of each other.
        top2 = logp.topk(min(2, logp.shape[1]), dim=1).values if logp.numel() else logp
        clear = (top2[:, 0] - top2[:, -1] > 1e-3) | (logp.shape[1] == 1)
        assert torch.equal(component.cpu()[clear], logp.argmax(1)[clear]), f"layer {i} component"
        if cpu_results is not None:
            cpu_value, cpu_grad, cpu_component = cpu_results[i]
            assert rel_err(value, cpu_value) <= tol_value and rel_err(grad, cpu_grad) <= tol_grad, f"layer {i} vs cpu"
            assert torch.equal(component.cpu()[clear], cpu_component[clear])


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gmm_without_gradient_and_public_api_on_noncontiguous_input(dtype):
    from engine.mixture import GaussianMixture
    from engine.ops.gmm import gmm_log_prob_grad, gmm_nearest

    gen = torch.Generator().manual_seed(5)
    layer64, w = random_gmm_layer(gen, 45, 19, 3, dtype)
    x, means, prec_chol, _ = layer64
    want_value, want_grad = reference.gmm_log_prob_grad(x, means, prec_chol, w)
    ((value, grad, _),) = cuda_impl("gmm")([tuple(t.to(dtype).cuda() for t in layer64)], "loglik", False)
    assert grad is None and rel_err(value, want_value) <= TOL[dtype][0]

    gmm = GaussianMixture(means, prec_chol, w)
    x_nc = x.to(dtype).cuda().t().contiguous().t()  # column-major: not C-contiguous
    assert not x_nc.is_contiguous()
    value, grad = gmm_log_prob_grad(x_nc, gmm, backend="cuda")
    assert value.device == x_nc.device and value.dtype == dtype and rel_err(value, want_value) <= TOL[dtype][0]
    assert rel_err(grad, want_grad) <= TOL[dtype][1]
    q, component = gmm_nearest(x_nc, gmm, backend="cuda")
    want_q, want_k = reference.gmm_nearest(x, means, prec_chol, w)
    assert rel_err(q, want_q) <= TOL[dtype][0] and torch.equal(component.cpu(), want_k)


# (N, d, C)
MAHALANOBIS_LAYERS = [(1, 1, 1), (37, 41, 5), (64, 32, 2), (0, 4, 3), (70, 7, 9)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_mahalanobis_matches_reference_and_cpu(dtype):
    gen = torch.Generator().manual_seed(3)
    layers = []
    for i, (n, d, c) in enumerate(MAHALANOBIS_LAYERS):
        a = torch.randn(d, d, generator=gen, dtype=torch.float64)
        precision = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
        means = 20.0 * i + torch.randn(c, d, generator=gen, dtype=torch.float64)  # offset data in some layers
        x = means.mean(0) + 1.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)
        layers.append(tuple(t.to(dtype) for t in (x, means, precision)))
    outs = cuda_impl("mahalanobis")([tuple(t.cuda() for t in layer) for layer in layers])
    cpu = cpu_impl("mahalanobis")
    cpu_outs = cpu(layers) if cpu else [None] * len(layers)
    for i, (layer, out, cpu_out) in enumerate(zip(layers, outs, cpu_outs, strict=True)):
        want = reference.mahalanobis(*layer)
        assert out.dtype == dtype and out.shape == want.shape
        assert rel_err(out, want) <= TOL[dtype][0], f"layer {i}"
        if cpu_out is not None:
            assert rel_err(out, cpu_out) <= TOL[dtype][0], f"layer {i} vs cpu"


def knn_data(gen: torch.Generator, n: int, m: int, d: int, near_duplicates: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ref = 10.0 + torch.randn(m, d, generator=gen, dtype=torch.float64)
    if near_duplicates:  # queries 1e-2 away from references, far from the origin
        x = ref[torch.randint(m, (n,), generator=gen)] + 1e-2 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    else:
        x = 10.0 + torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x, ref


# (N, M, d, k, exclude_self, near_duplicates)
KNN_CASES = [
    (1, 2, 1, 1, False, False),
    (37, 70, 13, 5, False, False),
    (45, 45, 33, 20, True, False),
    (70, 40, 64, 7, False, True),
    (0, 5, 3, 2, False, False),
]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,d,k,exclude_self,near_duplicates", KNN_CASES)
def test_knn_matches_reference_and_cpu(dtype, n, m, d, k, exclude_self, near_duplicates):
    gen = torch.Generator().manual_seed(n + m + d + k)
    x, ref = (t.to(dtype) for t in knn_data(gen, n, m, d, near_duplicates))
    if exclude_self:
        x = ref.clone()
    dist, index = cuda_impl("knn")(x.cuda(), ref.cuda(), k, exclude_self)
    assert dist.dtype == dtype and index.dtype == torch.int64 and dist.shape == index.shape == (n, k)
    want = reference.knn_distances(x, ref, k, exclude_self)
    assert rel_err(dist, want) <= TOL[dtype][0]
    # Tie-aware index check: the returned indices are distinct, valid, and at the returned distances.
    index = index.cpu()
    if n:
        assert int(index.min()) >= 0 and int(index.max()) < m
        assert all(len(set(row.tolist())) == k for row in index)
        at_index = torch.linalg.vector_norm(x[:, None].double() - ref.double()[index], dim=-1)
        assert rel_err(dist, at_index) <= TOL[dtype][0]
        assert torch.all(dist[:, 1:] >= dist[:, :-1])
    if exclude_self:
        assert not torch.any(index == torch.arange(n)[:, None])
    cpu = cpu_impl("knn")
    if cpu is not None:
        cpu_dist, _ = cpu(x, ref, k, exclude_self)
        assert rel_err(dist, cpu_dist) <= TOL[dtype][0]


# (N, M, d, bandwidth)
KDE_CASES = [(1, 1, 1, 1.0), (37, 70, 13, 0.7), (40, 65, 40, 3.0), (0, 4, 2, 1.0)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,d,bandwidth", KDE_CASES)
def test_kde_matches_reference_and_cpu(dtype, n, m, d, bandwidth):
    gen = torch.Generator().manual_seed(n + m + d)
    x, ref = (t.to(dtype) for t in knn_data(gen, n, m, d, near_duplicates=False))
    out = cuda_impl("kde")(x.cuda(), ref.cuda(), bandwidth)
    assert out.dtype == dtype and out.shape == (n,)
    assert rel_err(out, reference.kde_log_density(x, ref, bandwidth)) <= TOL[dtype][0]
    cpu = cpu_impl("kde")
    if cpu is not None:
        assert rel_err(out, cpu(x, ref, bandwidth)) <= TOL[dtype][0]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_on_noncontiguous_cuda_tensors_matches_cpu_backend(dtype):
    from engine import ops
    from engine.mixture import GaussianMixture

    gen = torch.Generator().manual_seed(2)
    x, ref = (t.to(dtype) for t in knn_data(gen, 40, 50, 21, near_duplicates=False))
    x_nc = x.cuda().t().contiguous().t()  # column-major copies: not C-contiguous
    ref_nc = ref.cuda().t().contiguous().t()
    tol = TOL[dtype][0]
    assert rel_err(ops.lid(x_nc, ref_nc, k=7, backend="cuda"), ops.lid(x, ref, k=7, backend="cpu")) <= tol
    assert rel_err(ops.kde_log_density(x_nc, ref_nc, 2.0, backend="cuda"), ops.kde_log_density(x, ref, 2.0)) <= tol
    means, precision = ref[:3], torch.eye(21, dtype=dtype) + 0.1
    got = ops.mahalanobis(x_nc, means.cuda(), precision.cuda(), backend="cuda")
    assert rel_err(got, ops.mahalanobis(x, means, precision, backend="cpu")) <= tol

    # hfc_loss: two layers in one fused call, gradients through autograd.
    layers = [random_gmm_layer(gen, 40, d, k, dtype) for d, k in ((21, 3), (9, 2))]
    gmms = [GaussianMixture(means, prec_chol, w) for (_, means, prec_chol, _), w in layers]
    feats = [layer[0].to(dtype) for layer, _ in layers]
    for mode in ("loglik", "nearest"):
        cuda_feats = [f.detach().cuda().requires_grad_(True) for f in feats]
        cpu_feats = [f.detach().clone().requires_grad_(True) for f in feats]
        loss = ops.hfc_loss(cuda_feats, gmms, mode=mode, backend="cuda")
        want = ops.hfc_loss(cpu_feats, gmms, mode=mode, backend="cpu")
        (2.5 * loss).backward()
        (2.5 * want).backward()
        assert rel_err(loss, want) <= tol, mode
        for got_f, want_f in zip(cuda_feats, cpu_feats, strict=True):
            assert rel_err(got_f.grad, want_f.grad) <= TOL[dtype][1], mode
