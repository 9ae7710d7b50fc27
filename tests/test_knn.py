"""k-NN distances and LID (engine.ops.knn) against scipy cdist + sort and the fp64 reference, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist
from support import TOL, assert_output, assert_rel, put, skip_slow, tensor, to_numpy

from engine import reference
from engine.ops.knn import knn_distances, lid

# (N, M, d, k): single rows/columns, several query tiles (> 256 rows) and reference tiles (> 512 rows), and one
# above kMinParallelMultiplyAdds = 1e7 (N M d), the OpenMP path.
SHAPES = [(1, 2, 1, 1), (41, 57, 7, 5), (300, 700, 17, 20), (9, 30, 3, 29), (300, 700, 50, 20)]


def brute_force(x: np.ndarray, ref: np.ndarray, k: int, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """scipy cdist in float64, then a stable sort (ties by index): the reference code's method."""
    dist = cdist(x.astype(np.float64), ref.astype(np.float64))
    if exclude_self:
        np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), order


def assert_distances(actual, expected, dtype, what: str = "distances") -> None:
    """Distances are recomputed exactly (double accumulation): float32 output within a few float32 ulps."""
    assert_rel(actual, expected, TOL[dtype].distance, what=what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,m,d,k", SHAPES)
def test_knn_matches_cdist_sort(backend, dtype, n, m, d, k):
    skip_slow(backend, n * m * d)
    rng = np.random.default_rng(n + m + d + k)
    x = rng.normal(size=(n, d)).astype(dtype)
    ref = rng.normal(size=(m, d)).astype(dtype)
    xin = put(x, backend)
    dist, index = knn_distances(xin, put(ref, backend), k, return_index=True, backend=backend)
    assert_output(dist, xin, dtype, (n, k))
    assert_output(index, xin, np.int64, (n, k))
    want_dist, want_index = brute_force(x, ref, k)
    assert_distances(dist, want_dist, dtype)
    np.testing.assert_array_equal(to_numpy(index), want_index)
    ref_dist = reference.knn_distances(torch.from_numpy(x), torch.from_numpy(ref), k).numpy()
    assert_distances(dist, ref_dist, dtype, "distances vs reference")


def test_ties_go_to_the_smaller_index(backend):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 4))
    ref = np.concatenate([base, base, base])  # every distance appears three times
    x = rng.normal(size=(5, 4))
    dist, index = knn_distances(put(x, backend), put(ref, backend), 7, return_index=True, backend=backend)
    want_dist, want_index = brute_force(x, ref, 7)
    np.testing.assert_array_equal(to_numpy(index), want_index)
    assert_rel(dist, want_dist, 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exclude_self_skips_only_the_query_itself(backend, dtype):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 6)).astype(dtype)
    x[10] = x[20]  # a duplicate: its twin (distance 0) must still be found, only itself is skipped
    xin = put(x, backend)
    dist, index = knn_distances(xin, xin, 4, exclude_self=True, return_index=True, backend=backend)
    dist, index = to_numpy(dist), to_numpy(index)
    assert not np.any(index == np.arange(300)[:, None])
    assert dist[10, 0] == 0 and index[10, 0] == 20 and index[20, 0] == 10
    want_dist, want_index = brute_force(x, x, 4, exclude_self=True)
    assert_distances(dist, want_dist, dtype)
    np.testing.assert_array_equal(index, want_index)
    ref_lid = reference.lid(torch.from_numpy(x[:10]), torch.from_numpy(x), 4)  # without exclusion: r_1 = 0
    assert torch.all(ref_lid < 1)  # the reference code's quirk (dropping the query) is what exclude_self fixes


def test_offset_near_duplicates_are_exact_where_naive_gemm_fails(backend):
    """Points 1000 away from the origin with neighbours 1e-3 apart: float32 distances stay ~1e-7 relative."""
    rng = np.random.default_rng(3)
    centres = 1000.0 + rng.normal(size=(64, 32))
    x = centres + 1e-3 * rng.normal(size=centres.shape)
    ref = np.concatenate([centres + 1e-3 * rng.normal(size=centres.shape), centres + 5 * rng.normal(size=(64, 32))])
    x32, ref32 = x.astype(np.float32), ref.astype(np.float32)
    want, want_index = brute_force(x32, ref32, 1)
    dist, index = knn_distances(put(x32, backend), put(ref32, backend), 1, return_index=True, backend=backend)
    np.testing.assert_array_equal(to_numpy(index), want_index)
    ours_err = np.abs(to_numpy(dist) - want).max() / want.max()
    # The naive float32 GEMM expansion ||x||^2 + ||r||^2 - 2 x.r on the same inputs:
    xt, rt = torch.from_numpy(x32), torch.from_numpy(ref32)
    sq = (xt * xt).sum(1)[:, None] + (rt * rt).sum(1)[None] - 2 * xt @ rt.T
    naive = sq.gather(1, torch.from_numpy(want_index)).clamp_min(0).sqrt().numpy()
    naive_err = np.abs(naive - want).max() / want.max()
    assert ours_err < 1e-6, ours_err
    assert naive_err > 1e-1, naive_err  # cancellation of ~3e7-sized norms leaves nothing of a 1e-6 distance


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_input_kinds_strides_and_empty(backend, dtype):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(40, 20)).astype(dtype)
    want, want_index = brute_force(base[::2, ::2], base[:, 1::2], 3)
    x, ref = put(base, backend)[::2, ::2], put(base, backend)[:, 1::2]  # non-contiguous views
    assert not (x.flags.c_contiguous if isinstance(x, np.ndarray) else x.is_contiguous())
    dist, index = knn_distances(x, ref, 3, return_index=True, backend=backend)
    assert_output(dist, x, dtype, (20, 3))
    assert_distances(dist, want, dtype)
    np.testing.assert_array_equal(to_numpy(index), want_index)
    xt = tensor(base[::2, ::2], backend).T.contiguous().T  # column-major torch tensor
    out = knn_distances(xt, tensor(base[:, 1::2], backend), 3, backend=backend)
    assert_output(out, xt, dtype, (20, 3))
    assert_distances(out, want, dtype)
    want_lid = reference.lid(torch.from_numpy(base[::2, ::2]), torch.from_numpy(base[:, 1::2]), 3)
    assert_rel(lid(xt, ref, 3, backend=backend), want_lid, TOL[dtype].value, what="lid")
    empty, empty_index = knn_distances(
        put(np.zeros((0, 10), dtype), backend), ref, 3, return_index=True, backend=backend
    )
    assert empty.shape == (0, 3) and empty_index.shape == (0, 3)
    empty32 = tensor(np.zeros((0, 10)), backend, torch.float32)
    assert lid(empty32, tensor(base[:, 1::2], backend, torch.float32), 3, backend=backend).shape == (0,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_and_torch_backends_agree(dtype):
    rng = np.random.default_rng(5)
    x = (50 + rng.normal(size=(270, 33))).astype(dtype)
    ref = (50 + rng.normal(size=(530, 33))).astype(dtype)
    d_cpu, i_cpu = knn_distances(x, ref, 12, return_index=True, backend="cpu")
    d_torch, i_torch = knn_distances(x, ref, 12, return_index=True, backend="torch")
    np.testing.assert_array_equal(i_cpu, i_torch)
    assert_distances(d_cpu, d_torch, dtype)
    assert_rel(lid(x, ref, 12, backend="cpu"), lid(x, ref, 12, backend="torch"), 10 * TOL[dtype].distance, what="lid")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lid_matches_reference(backend, dtype):
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(100, 8)) @ rng.normal(size=(8, 30))  # 8-dimensional data in 30 dimensions
    x = ref[:40] + 0.1 * rng.normal(size=(40, 30))
    xin, refin = put(x.astype(dtype), backend), put(ref.astype(dtype), backend)
    got = lid(xin, refin, k=20, backend=backend)
    want = reference.lid(torch.from_numpy(x.astype(dtype)), torch.from_numpy(ref.astype(dtype)), 20).numpy()
    assert_output(got, xin, dtype, (40,))
    assert_rel(got, want, TOL[dtype].value, what="lid")
    got_self = lid(refin, refin, k=20, exclude_self=True, backend=backend)
    want_self = reference.lid(torch.from_numpy(ref), torch.from_numpy(ref), 20, exclude_self=True).numpy()
    assert_rel(got_self, want_self, TOL[dtype].value, what="lid, exclude_self")


def test_cpp_kernel_lid_matches_python():
    from engine import _C

    rng = np.random.default_rng(7)
    x, ref = rng.normal(size=(30, 5)), rng.normal(size=(80, 5))
    assert_rel(_C.lid(x, ref, 10), lid(x, ref, 10, backend="cpu"), 1e-12)
    assert_rel(_C.lid(ref, ref, 10, True), lid(ref, ref, 10, exclude_self=True), 1e-12)


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_lid_is_invariant_to_scaling_all_features(backend, scale, seed):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(60, 6))
    x = rng.normal(size=(7, 6))
    scaled = lid(put(scale * x, backend), put(scale * ref, backend), 10, backend=backend)
    assert_rel(scaled, lid(put(x, backend), put(ref, backend), 10, backend=backend), 1e-9)


@settings(max_examples=25, deadline=None)
@given(shift=st.lists(st.floats(-100, 100), min_size=5, max_size=5), seed=st.integers(0, 2**16))
def test_knn_is_invariant_to_a_common_translation(backend, shift, seed):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(50, 5))
    x = rng.normal(size=(9, 5))
    t = np.array(shift)
    d0, i0 = knn_distances(put(x, backend), put(ref, backend), 6, return_index=True, backend=backend)
    d1, i1 = knn_distances(put(x + t, backend), put(ref + t, backend), 6, return_index=True, backend=backend)
    np.testing.assert_array_equal(to_numpy(i0), to_numpy(i1))
    assert_rel(d1, d0, 1e-12, atol=1e-12)


def test_bad_input(backend):
    rng = np.random.default_rng(8)
    x, ref = rng.normal(size=(5, 3)), rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match=r"k must be between 1 and 9 .*requested k=10"):
        knn_distances(x, ref, 10, backend=backend)
    with pytest.raises(ValueError, match=r"k must be between 1 and 8 .*minus the query itself.*requested k=9"):
        knn_distances(ref, ref, 9, exclude_self=True, backend=backend)
    with pytest.raises(ValueError, match="requested k=0"):
        lid(x, ref, 0, backend=backend)
    with pytest.raises(ValueError, match="exclude_self=True needs x to be the reference set"):
        knn_distances(x, ref, 2, exclude_self=True, backend=backend)
    with pytest.raises(TypeError, match="k must be an integer"):
        knn_distances(x, ref, 2.5, backend=backend)
    with pytest.raises(TypeError, match="k must be an integer"):
        knn_distances(x, ref, True, backend=backend)
    with pytest.raises(ValueError, match=r"ref must have shape \(M, 3\)"):
        knn_distances(x, ref[:, :2], 2, backend=backend)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        knn_distances(x[0], ref, 2, backend=backend)
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        knn_distances(bad, ref, 2, backend=backend)
    with pytest.raises(ValueError, match="ref contains NaN or inf"):
        lid(x, np.full((10, 3), np.inf), 2, backend=backend)
    with pytest.raises(TypeError, match="ref has dtype"):
        knn_distances(x, ref.astype(np.float32), 2, backend=backend)
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        knn_distances(x.astype(np.int64), ref, 2, backend=backend)
    with pytest.raises(ValueError, match="ref must have at least 1 row"):
        knn_distances(x, ref[:0], 1, backend=backend)


def test_cpp_side_validation():
    from engine import _C

    ref = np.zeros((4, 2))
    with pytest.raises(ValueError, match="requested k=4"):
        _C.knn(ref, ref, 4)
    with pytest.raises(ValueError, match="N == M"):
        _C.knn(ref[:3], ref, 1, True)
    with pytest.raises(ValueError, match="columns"):
        _C.knn(np.zeros((4, 3)), ref, 1)
    with pytest.raises(TypeError):  # mixed dtypes are never converted silently
        _C.knn(ref.astype(np.float32), ref, 1)
    with pytest.raises(ValueError, match="unavailable|must be"):
        knn_distances(ref, ref, 1, backend="nonexistent")
