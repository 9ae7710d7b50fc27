"""The one batcher: datasets, image arrays and ``(images, labels)`` pairs as float32 batches in [0, 1].

Every consumer (training, prediction, feature extraction, attacks, runs) reads data through :func:`iter_batches`
or :func:`as_tensors`, so there is one rule for pixel values: uint8 images are scaled by 1/255, anything else is
cast to float32 as it is (engine datasets already yield float32 in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from engine.errors import UserError, UserTypeError


def check_batch_size(batch_size: Any, name: str = "batch_size") -> int:
    """``batch_size`` as a positive int, or a ValueError naming the argument."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"{name} must be an int >= 1, got {batch_size!r}")
    return batch_size


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """float32 images; uint8 pixels are scaled to [0, 1]."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def iter_batches(
    data: Dataset | np.ndarray | torch.Tensor | tuple[Any, Any],
    batch_size: int,
    with_labels: bool = False,
    name: str = "data",
) -> Iterator[Any]:
    """Yield float32 image batches (N, C, H, W), or ``(images, labels int64)`` with ``with_labels``, in order.

    ``data`` is a torch Dataset of ``(image, label)`` pairs, an image array/tensor (N, C, H, W) (no labels), or an
    ``(images, labels)`` pair. One batch is in memory at a time (for a Dataset). ``name`` is the argument named
    in errors.
    """
    check_batch_size(batch_size)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (torch.as_tensor(t) for t in data)
        if x.shape[0] != y.shape[0]:
            raise UserError(f"{name}: images and labels differ in length ({x.shape[0]} vs {y.shape[0]})")
        for start in range(0, x.shape[0], batch_size):
            xb = to_unit_float(x[start : start + batch_size])
            yield (xb, y[start : start + batch_size].long()) if with_labels else xb
        return
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if data.ndim != 4:
            raise UserError(f"{name} must be images of shape (N, C, H, W), got shape {tuple(data.shape)}")
        if with_labels:
            raise UserTypeError(f"{name} has no labels: pass a Dataset of (image, label) or an (images, labels) pair")
        for start in range(0, data.shape[0], batch_size):
            yield to_unit_float(torch.as_tensor(data[start : start + batch_size]))
        return
    if not isinstance(data, Dataset):
        raise UserTypeError(
            f"{name} must be a torch Dataset, an image array/tensor or an (images, labels) pair, "
            f"got {type(data).__name__}"
        )
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            if with_labels:
                raise UserTypeError(f"{name} items must be (image, label) pairs")
            yield to_unit_float(batch)
        elif with_labels:
            yield to_unit_float(batch[0]), torch.as_tensor(batch[1]).long()
        else:
            yield to_unit_float(batch[0])


def as_tensors(data: Any, limit: int | None = None, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` items (all when None) of ``data`` as (images float32 (N, C, H, W), labels int64 (N,))."""
    if isinstance(data, Dataset) and limit is not None:
        data = torch.utils.data.Subset(data, range(min(int(limit), len(data))))
    elif isinstance(data, (tuple, list)) and len(data) == 2 and limit is not None:
        data = (data[0][:limit], data[1][:limit])
    batches = list(iter_batches(data, 256, with_labels=True, name=name))
    if not batches:
        raise UserError(f"{name} is empty: expected at least one image")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
