"""Kernel benchmarks: ours vs the baselines users would pick instead, and vs this machine's sgemm.

``run_table(ops, quick)`` gives the rows of ``hfc-engine bench``; each op's module (``engine.bench.gmm`` ...) has
``run(quick) -> list[dict]``. Nothing is written to disk: pass the rows to ``harness.append_csv`` to keep them.
The pytest-benchmark suite in ``benchmarks/`` (source checkout) times the same rows.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from engine.errors import UserError
from engine.ops import OPS  # one benchmark module per kernel op


def run_table(ops: Sequence[str] | None = None, quick: bool = True) -> list[dict[str, str]]:
    """Benchmark rows of ``ops`` (names from OPS; None or empty: all), in that order."""
    ops = list(ops or OPS)
    for op in ops:
        if op not in OPS:
            raise UserError(f"ops: unknown benchmark {op!r}; choose from {list(OPS)}")
    rows = []
    for op in ops:
        rows += importlib.import_module(f"engine.bench.{op}").run(quick)
    return rows
