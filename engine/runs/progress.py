"""Progress with an honest ETA: per-stage bars plus an overall bar weighted by each cell's expected cost.

Each stage estimates a cell's cost in seconds (:attr:`engine.runs.cells.Stage.cost`) from FLOP counts of the
model it runs (:meth:`Machine.model_flops`) at a nominal rate, with per-stage constants measured on the quick
audit (see each stage's cost function). Estimates are then refined from real timings: every finished cell, in this
invocation or an earlier one (the store keeps each cell's seconds), sets a correction factor for its cost class
(stage, plus the method for attack/detect cells); classes with no finished cell yet use the median factor of the
classes seen so far. The ETA is the corrected cost of the cells not yet done. ``trace`` records (elapsed, predicted
total) at every finished cell, so a run card can show how good the ETA was.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from engine.models import build_model

IO_CLASSES = ("data",)  # cost classes whose speed says nothing about the model computations of the others
NOMINAL_FLOPS_PER_SECOND = 3e10  # effective training throughput of a small CNN on 2 cores (the prior)


class Machine:
    """Cost arithmetic: FLOPs of a model per image, and FLOPs to seconds at a nominal rate.

    The nominal rate is only a prior: the cost model rescales every estimate by the measured / estimated
    seconds of the cells already finished, so the machine's real speed enters through the first cells.
    """

    def __init__(self, flops_per_second: float = NOMINAL_FLOPS_PER_SECOND) -> None:
        self.flops_per_second = float(flops_per_second)
        self._flops: dict[Any, float] = {}

    def model_flops(self, arch: str, image_size: int, channels: int = 3, **options: Any) -> float:
        """Forward FLOPs of one image through ``arch`` built with ``options`` (counted on the meta device)."""
        key = (arch, image_size, channels, tuple(sorted(options.items())))
        if key not in self._flops:
            with torch.device("meta"):
                model = build_model(arch, 2, in_channels=channels, **options).eval()
                with FlopCounterMode(display=False) as counter:
                    model(torch.zeros(1, channels, image_size, image_size))
            self._flops[key] = float(counter.get_total_flops())
        return self._flops[key]

    def seconds(self, flops: float) -> float:
        return flops / self.flops_per_second


class CostModel:
    """Expected seconds per cell, corrected by the timings of finished cells of the same cost class."""

    def __init__(self, estimates: Mapping[str, tuple[str, float]]) -> None:
        self.estimates = dict(estimates)  # cell key -> (cost class, estimated seconds)
        self.actual: dict[str, float] = {}  # cell key -> measured seconds, for finished cells

    def finished(self, key: str, seconds: float) -> None:
        self.actual[key] = float(seconds)

    def factor(self, cost_class: str) -> float:
        """Measured / estimated seconds over the finished cells of ``cost_class``; for a class with none yet, the
        median factor of the compute classes seen so far (one slow class does not rescale all the others); else 1."""
        sums: dict[str, list[float]] = {}
        for key, seconds in self.actual.items():
            if key in self.estimates:
                cls, est = self.estimates[key]
                total = sums.setdefault(cls, [0.0, 0.0])
                total[0], total[1] = total[0] + est, total[1] + seconds
        factors = {cls: s / est for cls, (est, s) in sums.items() if est > 0}
        if cost_class in factors:
            return factors[cost_class]
        compute = [f for cls, f in factors.items() if cls not in IO_CLASSES]
        return float(np.median(compute)) if compute else 1.0

    def remaining(self, pending: Sequence[str], running: str | None = None, running_for: float = 0.0) -> float:
        """Expected seconds for the ``pending`` cells; the ``running`` one has already run ``running_for``."""
        total = 0.0
        for key in pending:
            cost_class, est = self.estimates[key]
            expected = est * self.factor(cost_class)
            if key == running:
                expected = max(expected - running_for, 0.1 * expected)
            total += expected
        return total


class Progress:
    """Per-stage bars (cells done / cells) and an overall bar (share of the expected cost) with the ETA."""

    def __init__(self, cells: Sequence[Any], done: set[str], costs: CostModel, enabled: bool = True) -> None:
        self.costs = costs
        self.pending = [c.key for c in cells if c.key not in done]
        self.labels = {c.key: c.label or c.stage for c in cells}
        self.stage_of = {c.key: c.stage for c in cells}
        self.enabled = enabled
        self.start = time.perf_counter()
        self.running: str | None = None
        self.running_since = 0.0
        self.parallel = 1  # cells running at once (an executor with several workers sets it)
        self.trace: list[tuple[float, float]] = []
        stages = list(dict.fromkeys(c.stage for c in cells))
        self.overall = tqdm(
            total=1000, desc="run", disable=not enabled, bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}"
        )
        self.bars = {
            stage: tqdm(
                total=sum(c.stage == stage for c in cells),
                initial=sum(c.stage == stage and c.key in done for c in cells),
                desc=f"  {stage}",
                unit="cell",
                disable=not enabled,
                leave=False,
            )
            for stage in stages
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        if enabled:
            self._thread.start()
        self._refresh()

    def begin(self, key: str) -> None:
        with self._lock:
            self.running, self.running_since = key, time.perf_counter()
        self._refresh()

    def end(self, key: str, seconds: float) -> None:
        with self._lock:
            self.costs.finished(key, seconds)
            self.pending.remove(key)
            self.running = None
            self.bars[self.stage_of[key]].update(1)
            self.trace.append((self.elapsed(), self.elapsed() + self.eta()))
        self._refresh()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self) -> float:
        """Expected seconds left: the corrected cost of the pending cells, shared by the parallel workers."""
        running_for = time.perf_counter() - self.running_since if self.running else 0.0
        return self.costs.remaining(self.pending, self.running, running_for) / self.parallel

    def close(self) -> None:
        self._stop.set()
        for bar in self.bars.values():
            bar.close()
        self.overall.close()

    def _refresh(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            elapsed, eta = self.elapsed(), self.eta()
            share = elapsed / (elapsed + eta) if elapsed + eta > 0 else 1.0
            self.overall.n = int(1000 * share)
            label = self.labels.get(self.running, "") if self.running else ""
            self.overall.set_postfix_str(f"{_clock(elapsed)} elapsed, ETA {_clock(eta)} {label}", refresh=False)
            self.overall.refresh()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self._refresh()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
