"""k-NN distances and LID: ours vs the reference code's scipy cdist + sort, and vs faiss-cpu IndexFlatL2 if installed.

* ``lid`` (float32, N=M=4096, d=512, k=20) vs the LID reference code: scipy ``cdist`` + sort + the LID formula.
  The baseline is timed on BASELINE_ROWS query rows and scaled linearly to N (its cost is linear in N).
* ``knn_distances`` at the same shape vs faiss ``IndexFlatL2`` (add + search, all threads); faiss-cpu is a dev
  extra, so without it the baseline is scipy ``cdist`` + sort (scaled as above), named in the ``baseline`` column.
* Accuracy on near-duplicates far from the origin (points at +1000 with neighbours 1e-3 apart): the largest
  relative error of the k distances against float64 direct differences, ours vs the baseline, in ``max_rel_err``.
Both are reported as a multiple of one N x d x M sgemm (the CPU floor for this op).

Run: ``run(quick)`` (``hfc-engine bench``) or ``python -m pytest benchmarks/bench_knn.py --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.spatial.distance import cdist

from engine.bench.harness import Timer, default_timer, median_time, result_row, scaled_seconds, sgemm_seconds
from engine.ops.knn import knn_distances, lid

D, K = 512, 20
FULL_N, QUICK_N = 4096, 1024
BASELINE_ROWS = 512
ACCURACY_ROWS = 256

KnnSearch = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def features(n: int, d: int, seed: int) -> np.ndarray:
    """n standard normal points in d dimensions, float32."""
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


def cdist_knn(x: np.ndarray, ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest distances and indices the reference code's way: full scipy cdist, sort each row."""
    dist = cdist(x, ref)
    index = np.argsort(dist, axis=1)[:, :k]
    return np.take_along_axis(dist, index, axis=1), index


def faiss_knn(x: np.ndarray, ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest distances and indices by faiss IndexFlatL2 (add + search)."""
    import faiss

    index = faiss.IndexFlatL2(ref.shape[1])
    index.add(ref)
    sq, idx = index.search(x, k)
    return np.sqrt(np.maximum(sq, 0)), idx


def cdist_label(n: int) -> str:
    """The baseline column of a cdist + sort baseline timed on BASELINE_ROWS of n queries."""
    return f"scipy cdist + sort ({min(n, BASELINE_ROWS)} rows, scaled)"


def knn_baseline(x: np.ndarray, ref: np.ndarray, repeats: int) -> tuple[str, float, KnnSearch]:
    """(name, seconds for all of x, search) of the k-NN baseline: faiss IndexFlatL2 when faiss is importable
    (a dev extra), else scipy cdist + sort timed on BASELINE_ROWS queries and scaled."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        seconds = scaled_seconds(lambda part: cdist_knn(part, ref, K), x, BASELINE_ROWS)
        return cdist_label(len(x)), seconds, cdist_knn
    return "faiss IndexFlatL2", median_time(lambda: faiss_knn(x, ref, K), repeats=repeats)[0], faiss_knn


def max_rel_error(dist: np.ndarray, x: np.ndarray, ref: np.ndarray, index: np.ndarray) -> float:
    """Largest relative error of returned distances against float64 direct differences (first ACCURACY_ROWS)."""
    rows = ACCURACY_ROWS
    exact = np.linalg.norm(x[:rows, None, :].astype(np.float64) - ref[index[:rows]].astype(np.float64), axis=2)
    return float(np.max(np.abs(dist[:rows] - exact) / exact))


def knn_rows(n: int, timer: Timer, repeats: int = 3) -> list[dict]:
    """Time lid vs the LID reference code and knn_distances vs :func:`knn_baseline` at N=M=n."""
    x, ref = features(n, D, 1), features(n, D, 2)
    shape = f"N=M={n} d={D} k={K}"
    flops = 2.0 * n * n * D
    gemm_s = sgemm_seconds(n, D, n, repeats=repeats)
    ours_lid = timer(lambda: lid(x, ref, K, backend="cpu"))
    cdist_s = scaled_seconds(lambda part: reference_lid(part, ref, K), x, BASELINE_ROWS)
    ours_knn = median_time(lambda: knn_distances(x, ref, K, backend="cpu"), repeats=repeats)
    baseline, baseline_s, search = knn_baseline(x, ref, repeats)
    rows = [
        result_row("lid", shape, "float32", ours_lid, cdist_label(n), cdist_s, flops, gemm_s),
        result_row("knn_distances", shape, "float32", ours_knn, baseline, baseline_s, flops, gemm_s),
    ]
    xd, rd = near_duplicates(n, D)
    dist, index = knn_distances(xd, rd, K, return_index=True, backend="cpu")
    b_dist, b_index = search(xd[:ACCURACY_ROWS], rd, K)
    ours_err, baseline_err = max_rel_error(dist, xd, rd, index), max_rel_error(b_dist, xd, rd, b_index)
    rows[1]["max_rel_err"] = f"ours {ours_err:.1e} baseline {baseline_err:.1e}"
    return rows


def run(quick: bool = True) -> list[dict]:
    """k-NN / LID benchmark rows (quick: N=M=1024; full: N=M=4096)."""
    return knn_rows(QUICK_N if quick else FULL_N, default_timer(3))
