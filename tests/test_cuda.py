"""CUDA backend (csrc/cuda, engine._C_cuda, engine.ops._cuda).

Without a GPU (the development machines): the .cu sources compile for several architectures, the module imports,
validates its arguments and fails with a clear RuntimeError, and the registry refuses CPU tensors. With a GPU:
the kernels called directly agree with engine.reference (fp64) and with the C++ "cpu" backend on odd shapes (not
multiples of the 32-row/32-column tiles), float32 and float64, several layers per fused call. The public API over
every backend, "cuda" included (non-contiguous input, N = 1, d = 1, K = 1, ill-conditioned data), is tested in
test_gmm.py, test_hfc_loss.py, test_knn.py, test_kde.py and test_mahalanobis.py.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from support import TOL, assert_rel, class_data, query_batch, random_mixture, rounded, samples

from engine import reference
from engine.ops import _backend

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")  # A100, H100
OPS = ("gmm", "mahalanobis", "knn", "kde")
DTYPES = (torch.float32, torch.float64)

try:
    from engine import _C_cuda
except ImportError as exc:  # not built (no nvcc at build time)
    _C_cuda = None
    _IMPORT_ERROR = str(exc)

needs_module = pytest.mark.skipif(_C_cuda is None, reason="engine._C_cuda was not built (no nvcc at build time)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())")


# ---------------------------------------------------------------------------------------------------------------
# Build and module checks (run everywhere nvcc / the module exist)


@pytest.mark.slow  # nvcc compiles every CUDA source twice
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


def assert_max_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "") -> None:
    """Max-norm relative error max|got - want| / max|want| <= rtol (in float64 on the CPU; equal shapes)."""
    assert_rel(got, want, rtol, scale="max", floor=1e-300, what=what)


def cuda_impl(op: str):
    return _backend.resolve(op, "cuda", torch.device("cuda"))


def cpu_impl(op: str):
    """The C++ backend, the oracle for the CUDA kernels; None where it is not built."""
    try:
        return _backend.resolve(op, "cpu", torch.device("cpu"))
    except ValueError:
        return None


def random_gmm_layer(rng: np.random.Generator, n: int, d: int, k: int, dtype: torch.dtype, offset: float = 0.0):
    """(x, means, prec_chol, log_norm) in fp64 on the CPU, plus the weights; x near the components.

    x and the parameters are rounded to the kernel dtype first, so the fp64 reference sees exactly its inputs."""
    gm = rounded(random_mixture(rng, k, d, offset=offset, spread=2.0), dtype)
    x = torch.from_numpy(samples(rng, gm, n, scale=0.8)).to(dtype).to(torch.float64)
    return (x, *gm.tensors(torch.float64)), torch.tensor(gm.weights)


# (N, d, K): one row, d = 1, K = 1, tiles that end mid-way, d just over one tile, an empty batch.
GMM_LAYERS = [(1, 1, 1), (37, 5, 3), (70, 41, 4), (33, 64, 2), (0, 3, 2), (5, 33, 1)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["loglik", "nearest"])
def test_gmm_matches_reference_and_cpu(dtype, mode):
    rng = np.random.default_rng(11)
    layers64, weights = zip(
        *(random_gmm_layer(rng, n, d, k, dtype, offset=30.0 * (i % 2)) for i, (n, d, k) in enumerate(GMM_LAYERS)),
        strict=True,
    )
    results = cuda_impl("gmm")([tuple(t.to(dtype).cuda() for t in layer) for layer in layers64], mode, True)
    cpu = cpu_impl("gmm")
    cpu_results = cpu([tuple(t.to(dtype) for t in layer) for layer in layers64], mode, True) if cpu else None
    tol = TOL[dtype]
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
        assert_max_rel(value, want_value, tol.value, f"layer {i} value")
        assert_max_rel(grad, want_grad, tol.grad, f"layer {i} grad")
        # Components must match wherever the best two are not within rounding of each other.
        top2 = logp.topk(min(2, logp.shape[1]), dim=1).values if logp.numel() else logp
        clear = (top2[:, 0] - top2[:, -1] > 1e-3) | (logp.shape[1] == 1)
        assert torch.equal(component.cpu()[clear], logp.argmax(1)[clear]), f"layer {i} component"
        if cpu_results is not None:
            cpu_value, cpu_grad, cpu_component = cpu_results[i]
            assert_max_rel(value, cpu_value, tol.value, f"layer {i} value vs cpu")
            assert_max_rel(grad, cpu_grad, tol.grad, f"layer {i} grad vs cpu")
            assert torch.equal(component.cpu()[clear], cpu_component[clear])


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gmm_without_gradient(dtype):
    layer64, w = random_gmm_layer(np.random.default_rng(5), 45, 19, 3, dtype)
    x, means, prec_chol, _ = layer64
    want_value = reference.gmm_log_prob(x, means, prec_chol, w)
    ((value, grad, _),) = cuda_impl("gmm")([tuple(t.to(dtype).cuda() for t in layer64)], "loglik", False)
    assert grad is None
    assert_max_rel(value, want_value, TOL[dtype].value)


# (N, d, C)
MAHALANOBIS_LAYERS = [(1, 1, 1), (37, 41, 5), (64, 32, 2), (0, 4, 3), (70, 7, 9)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_mahalanobis_matches_reference_and_cpu(dtype):
    rng = np.random.default_rng(3)
    layers = []
    for i, (n, d, c) in enumerate(MAHALANOBIS_LAYERS):  # offset data in some layers
        layers.append(tuple(torch.from_numpy(a).to(dtype) for a in class_data(rng, n, c, d, offset=20.0 * i)))
    outs = cuda_impl("mahalanobis")([tuple(t.cuda() for t in layer) for layer in layers])
    cpu = cpu_impl("mahalanobis")
    cpu_outs = cpu(layers) if cpu else [None] * len(layers)
    for i, (layer, out, cpu_out) in enumerate(zip(layers, outs, cpu_outs, strict=True)):
        want = reference.mahalanobis(*layer)
        assert out.dtype == dtype and out.shape == want.shape
        assert_max_rel(out, want, TOL[dtype].value, f"layer {i}")
        if cpu_out is not None:
            assert_max_rel(out, cpu_out, TOL[dtype].value, f"layer {i} vs cpu")


def knn_data(rng: np.random.Generator, n: int, m: int, d: int, near_duplicates: bool):
    """Queries and references 10 away from the origin; with ``near_duplicates`` queries 1e-2 from references."""
    x, ref = query_batch(rng, n, m, d, offset=10.0, near=1e-2 if near_duplicates else None)
    return torch.from_numpy(x), torch.from_numpy(ref)


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
    rng = np.random.default_rng(n + m + d + k)
    x, ref = (t.to(dtype) for t in knn_data(rng, n, m, d, near_duplicates))
    if exclude_self:
        x = ref.clone()
    dist, index = cuda_impl("knn")(x.cuda(), ref.cuda(), k, exclude_self)
    assert dist.dtype == dtype and index.dtype == torch.int64 and dist.shape == index.shape == (n, k)
    want = reference.knn_distances(x, ref, k, exclude_self)
    assert_max_rel(dist, want, TOL[dtype].value, "distances")
    # Tie-aware index check: the returned indices are distinct, valid, and at the returned distances.
    index, dist = index.cpu(), dist.cpu()
    if n:
        assert int(index.min()) >= 0 and int(index.max()) < m
        assert all(len(set(row.tolist())) == k for row in index)
        at_index = torch.linalg.vector_norm(x[:, None].double() - ref.double()[index], dim=-1)
        assert_max_rel(dist, at_index, TOL[dtype].value, "distances at the returned indices")
        assert torch.all(dist[:, 1:] >= dist[:, :-1])
    if exclude_self:
        assert not torch.any(index == torch.arange(n)[:, None])
    cpu = cpu_impl("knn")
    if cpu is not None:
        cpu_dist, _ = cpu(x, ref, k, exclude_self)
        assert_max_rel(dist, cpu_dist, TOL[dtype].value, "distances vs cpu")


# (N, M, d, bandwidth)
KDE_CASES = [(1, 1, 1, 1.0), (37, 70, 13, 0.7), (40, 65, 40, 3.0), (0, 4, 2, 1.0)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,d,bandwidth", KDE_CASES)
def test_kde_matches_reference_and_cpu(dtype, n, m, d, bandwidth):
    rng = np.random.default_rng(n + m + d)
    x, ref = (t.to(dtype) for t in knn_data(rng, n, m, d, near_duplicates=False))
    out = cuda_impl("kde")(x.cuda(), ref.cuda(), bandwidth)
    assert out.dtype == dtype and out.shape == (n,)
    assert_max_rel(out, reference.kde_log_density(x, ref, bandwidth), TOL[dtype].value)
    cpu = cpu_impl("kde")
    if cpu is not None:
        assert_max_rel(out, cpu(x, ref, bandwidth), TOL[dtype].value, "vs cpu")
