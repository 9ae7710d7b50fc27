"""Batching for the attack helpers: a torch Dataset of (image, label) pairs or an ``(images, labels)`` pair."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size


def iter_batches(data: Any, batch_size: int, name: str = "data") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images float, labels int64) batches in order."""
    check_batch_size(batch_size)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (torch.as_tensor(t) for t in data)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: images and labels differ in length ({x.shape[0]} vs {y.shape[0]})")
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size].float(), y[start : start + batch_size].long()
        return
    if not isinstance(data, Dataset):
        raise TypeError(f"{name} must be a torch Dataset of (image, label) or an (images, labels) pair")
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"{name} items must be (image, label) pairs")
        yield batch[0].float(), torch.as_tensor(batch[1]).long()


def load_all(data: Any, name: str = "data", batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole of ``data`` as (images (N,C,H,W) float, labels (N,) int64) on the CPU."""
    batches = list(iter_batches(data, batch_size, name))
    if not batches:
        raise ValueError(f"{name} is empty")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
