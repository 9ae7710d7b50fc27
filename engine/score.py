"""Batch scoring: stream a dataset through a model (PyTorch checkpoint or ONNX file) and fitted detectors.

Writes one row per image — index, label, prediction, logits and every detector's score — to CSV or Parquet,
appending batch by batch so memory stays bounded by one batch whatever the dataset size. An ONNX model must have
been exported with the detectors' layers as feature outputs (``hfc-engine export --layers ...``); detectors that
re-run the model differentiably or stochastically (BU, MAHA with input preprocessing) need the PyTorch model.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from engine.detectors import Detector, FeatureCache
from engine.export import FEATURE_PREFIX, LOGITS_NAME, OnnxModel
from engine.models import load_model


@dataclass
class ScoreSummary:
    rows: int
    seconds: float
    model_seconds: float
    detector_seconds: float
    output: Path

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


class OnnxClassifier(nn.Module):
    """An ONNX model behind the ``(logits, {layer: feature})`` extractor interface of the feature cache."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.onnx = OnnxModel(path)
        self.logits_name = LOGITS_NAME
        self.layers = [n.removeprefix(FEATURE_PREFIX) for n in self.onnx.output_names if n.startswith(FEATURE_PREFIX)]
        self._prefix = FEATURE_PREFIX

    def extract(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.onnx.run(x)
        feats = {name: torch.from_numpy(out[self._prefix + name]) for name in self.layers}
        return torch.from_numpy(out[self.logits_name]), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract(x)[0]


def find_detectors(path: str | os.PathLike[str]) -> list[Path]:
    """Fitted detector directories (holding config.json) at or under ``path``."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"detectors: {str(root)!r} does not exist")
    found = [root] if (root / "config.json").is_file() else sorted(p.parent for p in root.rglob("config.json"))
    if not found:
        raise ValueError(f"detectors: no fitted detector (a directory with config.json) under {str(root)!r}")
    return found


def score_dataset(
    model_path: str | os.PathLike[str],
    detector_paths: Sequence[str | os.PathLike[str]],
    dataset: Any,
    output: str | os.PathLike[str],
    batch_size: int = 128,
    progress: bool = True,
) -> ScoreSummary:
    """Score every image of ``dataset``; write rows to ``output`` (.csv or .parquet) as batches finish."""
    output = Path(output)
    if output.suffix not in (".csv", ".parquet"):
        raise ValueError(f"output must end in .csv or .parquet, got {str(output)!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dirs = [d for p in detector_paths for d in find_detectors(p)]
    if str(model_path).endswith(".onnx"):
        model = OnnxClassifier(model_path)
        cache = FeatureCache(model, batch_size=batch_size, extractor=model.extract)
    else:
        model = load_model(model_path)
        cache = FeatureCache(model, layers=_layers_needed(dirs), batch_size=batch_size)
    detectors = [Detector.load(d, source=cache) for d in dirs]
    names = _unique_names([d.name for d in detectors])
    writer = _RowWriter(output)
    start, model_s, det_s, n = time.perf_counter(), 0.0, 0.0, 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    completed = False
    try:
        for images, labels in tqdm(loader, desc="score", unit="batch", disable=not progress):
            t0 = time.perf_counter()
            feats = cache.extract(images, labels.numpy())
            t1 = time.perf_counter()
            scores = {name: det.score(feats) for name, det in zip(names, detectors, strict=True)}
            det_s += time.perf_counter() - t1
            model_s += t1 - t0
            frame = pd.DataFrame(
                {"index": np.arange(n, n + len(labels)), "label": labels.numpy(), "prediction": feats.logits.argmax(1)}
            )
            for j in range(feats.logits.shape[1]):
                frame[f"logit_{j}"] = feats.logits[:, j]
            for name, values in scores.items():
                frame[f"score_{name}"] = values
            writer.write(frame)
            n += len(labels)
        completed = True
    finally:
        writer.close(completed)
    return ScoreSummary(
        rows=n, seconds=time.perf_counter() - start, model_seconds=model_s, detector_seconds=det_s, output=output
    )


def _layers_needed(dirs: Sequence[Path]) -> list[str] | None:
    layers: list[str] = []
    for d in dirs:
        for name in json.loads((d / "config.json").read_text()).get("layers") or []:
            if name not in layers:
                layers.append(name)
    return layers or None


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


class _RowWriter:
    """Appends DataFrames to ``.<name>.partial`` and renames it to ``path`` once complete; an interrupted run
    leaves the rows written so far in the .partial file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.partial")
        self.parquet = None
        self.first = True

    def write(self, frame: pd.DataFrame) -> None:
        if self.path.suffix == ".csv":
            frame.to_csv(self.tmp, mode="w" if self.first else "a", header=self.first, index=False)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.tmp, table.schema)
            self.parquet.write_table(table)
        self.first = False

    def close(self, complete: bool) -> None:
        if self.parquet is not None:
            self.parquet.close()
        if complete and self.tmp.exists():
            os.replace(self.tmp, self.path)
