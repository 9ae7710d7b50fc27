"""Batched inference over datasets or arrays with bounded memory: predictions, metrics, channel statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from engine.data import ImageDataset, RelabelledDataset, iter_batches
from engine.errors import UserError
from engine.metrics import classification_metrics
from engine.models.memory import auto_batch_size, eval_mode, fast_input, model_device, model_dtype


@torch.no_grad()
def predict_logits(
    model: nn.Module, data: Any, batch_size: int | None = None, perturbation: torch.Tensor | None = None
) -> np.ndarray:
    """(N, K) float32 logits of ``model`` in eval mode (its mode is restored) over ``data`` (anything
    :func:`engine.data.iter_batches` reads); with ``perturbation`` v (C, H, W), the logits of clamp(x + v, 0, 1).
    ``batch_size`` None: as many images as fit the memory budget (engine.models.memory), at most 256."""
    return _forward(model, data, batch_size, perturbation, with_labels=False)[0]


def label_with_model(model: nn.Module, dataset: ImageDataset, batch_size: int | None = None) -> RelabelledDataset:
    """``dataset`` labelled with ``model``'s predictions (``labels_source`` says so), classes from the model's
    metadata when it records them."""
    logits = predict_logits(model, dataset, batch_size)
    classes = getattr(model, "meta", {}).get("classes") or [str(i) for i in range(logits.shape[1])]
    return RelabelledDataset(dataset, logits.argmax(1), classes, source="model predictions")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int | None = None) -> dict[str, Any]:
    """Mean cross-entropy ``loss`` plus :func:`classification_metrics` of ``model`` on a labelled dataset."""
    logits, labels = _forward(model, dataset, batch_size, None, with_labels=True)
    z, y = torch.from_numpy(logits), torch.from_numpy(labels)
    if int(y.min()) < 0 or int(y.max()) >= z.shape[1]:
        raise UserError(f"labels must be in [0, {z.shape[1] - 1}] for a {z.shape[1]}-logit model")
    out = {"loss": float(F.cross_entropy(z.double(), y))}
    out.update(classification_metrics(labels, torch.softmax(z.double(), 1).numpy()))
    return out


def _forward(
    model: nn.Module, data: Any, batch_size: int | None, perturbation: torch.Tensor | None, with_labels: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, labels or None) over ``data``: the one batched inference loop."""
    if batch_size is None:
        first = next(iter_batches(data, 1), None)
        if first is None:
            raise UserError("data is empty: nothing to predict")
        batch_size = auto_batch_size(model, tuple(first.shape[1:]), backward=False)
    device, dtype = model_device(model), model_dtype(model)
    v = None if perturbation is None else perturbation.to(device=device, dtype=dtype)
    logits, labels = [], []
    with eval_mode(model):
        for batch in iter_batches(data, batch_size, with_labels=with_labels):
            x, y = batch if with_labels else (batch, None)
            x = x.to(device=device, dtype=dtype)
            logits.append(model(fast_input(model, x if v is None else (x + v).clamp(0, 1))).float().cpu().numpy())
            labels.append(y)
    if not logits:
        raise UserError("data is empty: nothing to predict")
    return np.concatenate(logits), torch.cat(labels).numpy() if with_labels else None


def channel_stats(dataset: Dataset, batch_size: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of all pixels of ``dataset`` (float64 accumulation, std floored at 1e-3)."""
    total = sq = None
    count = 0
    for x in iter_batches(dataset, batch_size, name="dataset"):
        x = x.double()
        s, s2 = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total, sq = (s, s2) if total is None else (total + s, sq + s2)
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if total is None:
        raise UserError("dataset is empty")
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-3)
    return mean.tolist(), std.tolist()
