"""Benchmark helpers: timing medians, this machine's sgemm rate, machine-readable result rows.

Every benchmark times ours and a baseline side by side in one run (ratios, not absolute times, are the claim)
and reports ours as a multiple of the one GEMM that bounds the op on CPU.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from engine import __version__

FIELDS = [
    "timestamp",
    "op",
    "shape",
    "dtype",
    "ours_s",
    "ours_spread_s",
    "baseline",
    "baseline_s",
    "speedup",
    "gflops",
    "gemm_s",
    "gemm_multiple",
    "version",
    "machine",
]


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """(median seconds, interquartile spread) of ``fn()`` over ``repeats`` runs after ``warmup`` discarded ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), quartiles[2] - quartiles[0]


Timer = Callable[[Callable[[], object]], tuple[float, float]]


def default_timer(repeats: int) -> Timer:
    """A Timer returning (median, spread) by :func:`median_time`."""
    return lambda fn: median_time(fn, repeats=repeats)


def scaled_seconds(fn: Callable[[np.ndarray], object], x: np.ndarray, rows: int) -> float:
    """Seconds of one ``fn(x[:rows])`` scaled linearly to all of ``x``: for slow baselines linear in the queries."""
    rows = min(rows, len(x))
    part = x[:rows]
    return median_time(lambda: fn(part), repeats=1)[0] * len(x) / rows


def sgemm_seconds(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """Median time of one (m,k) x (k,n) matmul with torch (MKL/OpenBLAS): the CPU floor for GEMM-bound ops."""
    a = torch.randn(m, k, dtype=dtype)
    b = torch.randn(k, n, dtype=dtype)
    return median_time(lambda: torch.matmul(a, b), repeats=repeats)[0]


def result_row(
    op: str,
    shape: str,
    dtype: str,
    ours: tuple[float, float],
    baseline: str,
    baseline_s: float | None,
    flops: float,
    gemm_s: float,
) -> dict[str, str]:
    """One result row (the FIELDS columns, formatted): ours (median, spread) vs the baseline and the GEMM floor."""
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "op": op,
        "shape": shape,
        "dtype": dtype,
        "ours_s": f"{ours[0]:.6g}",
        "ours_spread_s": f"{ours[1]:.3g}",
        "baseline": baseline,
        "baseline_s": "" if baseline_s is None else f"{baseline_s:.6g}",
        "speedup": "" if baseline_s is None else f"{baseline_s / ours[0]:.2f}",
        "gflops": f"{flops / ours[0] / 1e9:.2f}",
        "gemm_s": f"{gemm_s:.6g}",
        "gemm_multiple": f"{ours[0] / gemm_s:.2f}",
        "version": __version__,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()}cpu torch{torch.__version__}",
    }


def append_csv(rows: Iterable[dict[str, str]], path: str | os.PathLike[str]) -> None:
    """Append rows to the CSV at ``path`` (FIELDS columns only; header written when the file is new)."""
    path = Path(path)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
