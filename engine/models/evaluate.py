"""Batched inference over datasets or arrays with bounded memory: predictions, metrics, channel statistics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from engine.models.metrics import classification_metrics


def _first(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """float32 images; uint8 pixels are scaled to [0, 1]."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def iterate_batches(
    data: Dataset | np.ndarray | torch.Tensor, batch_size: int, with_labels: bool = False
) -> Iterator[Any]:
    """Yield float32 image batches (N,C,H,W) (or ``(images, labels)`` with ``with_labels``) from a torch Dataset
    of ``(image, label)`` pairs, a numpy array or a tensor of images (uint8 is scaled to [0,1]); one batch in
    memory at a time."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if data.ndim != 4:
            raise ValueError(f"data must be images of shape (N,C,H,W), got shape {tuple(data.shape)}")
        if with_labels:
            raise TypeError("data without labels: pass a Dataset of (image, label) pairs")
        for start in range(0, data.shape[0], batch_size):
            yield _to_unit_float(torch.as_tensor(data[start : start + batch_size]))
        return
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a torch Dataset, numpy array or tensor, got {type(data).__name__}")
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        if with_labels:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError("dataset items must be (image, label) pairs")
            yield _to_unit_float(batch[0]), batch[1].long()
        else:
            yield _to_unit_float(_first(batch))


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, data: Dataset | np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """(N,K) float32 logits of ``model`` (put in eval mode) over ``data``."""
    model.eval()
    device = _device(model)
    outs = [model(x.to(device)).float().cpu().numpy() for x in iterate_batches(data, batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> dict[str, Any]:
    """Mean cross-entropy ``loss`` plus :func:`classification_metrics` of ``model`` on a labelled dataset."""
    model.eval()
    device = _device(model)
    logits, labels = [], []
    for x, y in iterate_batches(dataset, batch_size, with_labels=True):
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    if not logits:
        raise ValueError("dataset is empty")
    z, y = torch.cat(logits), torch.cat(labels)
    if int(y.min()) < 0 or int(y.max()) >= z.shape[1]:
        raise ValueError(f"labels must be in [0, {z.shape[1] - 1}] for a {z.shape[1]}-logit model")
    out = {"loss": float(F.cross_entropy(z.double(), y))}
    out.update(classification_metrics(y.numpy(), torch.softmax(z.double(), 1).numpy()))
    return out


def channel_stats(dataset: Dataset, batch_size: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of all pixels of ``dataset`` (float64 accumulation, std floored at 1e-3)."""
    total = sq = None
    count = 0
    for x in iterate_batches(dataset, batch_size):
        x = x.double()
        s, s2 = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total, sq = (s, s2) if total is None else (total + s, sq + s2)
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if total is None:
        raise ValueError("dataset is empty")
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-3)
    return mean.tolist(), std.tolist()
