"""k-NN distances and LID: ours vs the reference code's scipy cdist + sort, and vs faiss-cpu IndexFlatL2.

* ``lid`` (float32, N=M=4096, d=512, k=20) vs the LID reference code: scipy ``cdist`` + sort + the LID formula.
  The baseline is timed on BASELINE_ROWS query rows and scaled linearly to N (its cost is linear in N).
* ``knn_distances`` at the same shape vs faiss ``IndexFlatL2`` (add + search, all threads).
* Accuracy on near-duplicates far from the origin (points at +1000 with neighbours 1e-3 apart): the largest
  relative error of the k distances against float64 direct differences, ours vs faiss, in ``max_rel_err``.
Both are reported as a multiple of one N x d x M sgemm (the CPU floor for this op).

Run: ``python -m pytest benchmarks/bench_knn.py --benchmark-only`` or ``run(quick)`` (``hfc-engine bench``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cdist

sys.path.insert(0, str(Path(__file__).parent))
from harness import Timer, default_timer, median_time, pytest_timer, record, sgemm_seconds  # noqa: E402  # noqa: E402

from engine.ops.knn import knn_distances, lid  # noqa: E402

D, K = 512, 20
FULL_N, QUICK_N = 4096, 1024
BASELINE_ROWS = 512


def features(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def near_duplicates(n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries 1e-3 from their reference twins, everything 1000 away from the origin."""
    rng = np.random.default_rng(7)
    ref = 1000 + rng.normal(size=(n, d))
    x = ref + 1e-3 * rng.normal(size=(n, d))
    return x.astype(np.float32), ref.astype(np.float32)


def reference_lid(x: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
    """The LID reference code: full cdist, sort each row, LID formula."""
    dist = np.sort(cdist(x, ref), axis=1)[:, :k]
    return -k / np.log(dist / dist[:, -1:]).sum(axis=1)


def faiss_knn(x: np.ndarray, ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatL2(ref.shape[1])
    index.add(ref)
    sq, idx = index.search(x, k)
    return np.sqrt(np.maximum(sq, 0)), idx


def max_rel_error(dist: np.ndarray, x: np.ndarray, ref: np.ndarray, index: np.ndarray, rows: int = 256) -> float:
    """Largest relative error of returned distances against float64 direct differences (first ``rows`` rows)."""
    exact = np.linalg.norm(x[:rows, None, :].astype(np.float64) - ref[index[:rows]].astype(np.float64), axis=2)
    return float(np.max(np.abs(dist[:rows] - exact) / exact))


def knn_rows(n: int, timer: Timer, repeats: int = 3) -> list[dict]:
    x, ref = features(n, D, 1), features(n, D, 2)
    shape = f"N=M={n} d={D} k={K}"
    flops = 2.0 * n * n * D
    gemm_s = sgemm_seconds(n, D, n, repeats=repeats)
    ours_lid = timer(lambda: lid(x, ref, K, backend="cpu"))
    part = min(n, BASELINE_ROWS)
    cdist_s = median_time(lambda: reference_lid(x[:part], ref, K), repeats=1)[0] * n / part
    ours_knn = median_time(lambda: knn_distances(x, ref, K, backend="cpu"), repeats=repeats)
    faiss_s = median_time(lambda: faiss_knn(x, ref, K), repeats=repeats)[0]
    rows = [
        record("lid", shape, "float32", ours_lid, f"scipy cdist + sort ({part} rows, scaled)", cdist_s, flops, gemm_s),
        record("knn_distances", shape, "float32", ours_knn, "faiss IndexFlatL2", faiss_s, flops, gemm_s),
    ]
    xd, rd = near_duplicates(n, D)
    dist, index = knn_distances(xd, rd, K, return_index=True, backend="cpu")
    f_dist, f_index = faiss_knn(xd, rd, K)
    rows[1]["max_rel_err"] = (
        f"ours {max_rel_error(dist, xd, rd, index):.1e} faiss {max_rel_error(f_dist, xd, rd, f_index):.1e}"
    )
    return rows


def run(quick: bool = True) -> list[dict]:
    """k-NN / LID benchmark rows (quick: N=M=1024; full: N=M=4096)."""
    return knn_rows(QUICK_N if quick else FULL_N, default_timer(3))


@pytest.mark.parametrize("n", [FULL_N])
def test_knn_lid(benchmark, n):
    rows = knn_rows(n, pytest_timer(benchmark, 3))
    benchmark.extra_info.update({f"{r['op']}: {r['baseline']}": r["speedup"] for r in rows})
    benchmark.extra_info.update(rows[0])
