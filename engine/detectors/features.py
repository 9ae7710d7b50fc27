"""Features shared by every detector in a run: one forward pass per batch extracts all hooked layers at once.

:class:`Features` holds, for one set of images, the logits, the GAP-pooled (N, C_l) feature of every hooked layer,
optionally the raw (N, C, H, W) maps of some layers (for the DNN detector) and the images themselves (for the
detectors that run the model again: BU's MC-dropout passes and MAHA's input preprocessing).
:class:`FeatureCache` wraps a model and a layer list and turns images into :class:`Features`; a run builds one
cache, extracts each image set once and hands the same :class:`Features` to every detector.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.errors import UserError, UserTypeError
from engine.models import FeatureExtractor, extract_pooled, fast_input, pool_feature
from engine.models.memory import bytes_per_image, memory_budget

Extractor = Callable[[torch.Tensor], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]


@dataclass
class Features:
    """Logits, pooled per-layer features and (optionally) raw maps, images and labels of one image set."""

    logits: np.ndarray
    pooled: dict[str, np.ndarray]
    raw: dict[str, torch.Tensor] = field(default_factory=dict)
    images: torch.Tensor | None = None
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.logits = np.asarray(self.logits)
        if self.logits.ndim != 2:
            raise UserError(f"logits must be (N, classes), got shape {self.logits.shape}")
        n = len(self.logits)
        self.pooled = {name: np.asarray(value) for name, value in self.pooled.items()}
        for name, value in self.pooled.items():
            if value.ndim != 2 or len(value) != n:
                raise UserError(f"pooled feature {name!r} must be ({n}, C), got shape {value.shape}")
        for name, value in self.raw.items():
            if value.dim() < 3 or len(value) != n:
                raise UserError(f"raw feature {name!r} must be ({n}, C, H, W), got shape {tuple(value.shape)}")
        if self.images is not None and len(self.images) != n:
            raise UserError(f"images has {len(self.images)} rows but logits has {n}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (n,):
                raise UserError(f"labels must have shape ({n},), got {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.logits)

    @property
    def preds(self) -> np.ndarray:
        """Predicted classes (N,)."""
        return self.logits.argmax(1)

    @property
    def layer_names(self) -> list[str]:
        return list(self.pooled)

    def layer(self, name: str, dim: int | None = None) -> np.ndarray:
        """Pooled feature of layer ``name``, checked against the expected channel count ``dim``."""
        if name not in self.pooled:
            raise KeyError(f"layer {name!r} was not extracted; available: {self.layer_names}")
        value = self.pooled[name]
        if dim is not None and value.shape[1] != dim:
            raise UserError(f"layer {name!r} has {value.shape[1]} channels but the detector was fitted on {dim}")
        return value

    def raw_map(self, name: str) -> torch.Tensor:
        """Raw (N, C, H, W) map of layer ``name`` (extract it with ``FeatureCache(raw_layers=...)``)."""
        if name not in self.raw:
            raise KeyError(
                f"raw feature map of layer {name!r} was not extracted; pass it in FeatureCache(raw_layers=...) "
                f"(raw maps available: {list(self.raw)})"
            )
        return self.raw[name]

    def require_images(self, who: str) -> torch.Tensor:
        if self.images is None:
            raise UserError(f"{who} runs the model on the images: extract these Features with keep_images=True")
        return self.images

    def select(self, layers: Sequence[str]) -> Features:
        """The same rows with only the pooled features (and raw maps) of ``layers``, in that order."""
        for name in layers:
            self.layer(name)  # raises naming the available layers
        return Features(
            logits=self.logits,
            pooled={name: self.pooled[name] for name in layers},
            raw={name: self.raw[name] for name in layers if name in self.raw},
            images=self.images,
            labels=self.labels,
        )

    def subset(self, index: np.ndarray | Sequence[int]) -> Features:
        """Rows ``index`` (integer indices or a boolean mask)."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        t_idx = torch.as_tensor(idx, dtype=torch.long)
        return Features(
            logits=self.logits[idx],
            pooled={k: v[idx] for k, v in self.pooled.items()},
            raw={k: v[t_idx] for k, v in self.raw.items()},
            images=None if self.images is None else self.images[t_idx],
            labels=None if self.labels is None else self.labels[idx],
        )

    @staticmethod
    def concat(parts: Sequence[Features]) -> Features:
        """Stack feature sets with the same layers row-wise."""
        if not parts:
            raise UserError("concat needs at least one Features")
        first = parts[0]
        for p in parts[1:]:
            if p.layer_names != first.layer_names or list(p.raw) != list(first.raw):
                raise UserError(f"cannot concat Features with layers {p.layer_names} and {first.layer_names}")
        has_images = all(p.images is not None for p in parts)
        has_labels = all(p.labels is not None for p in parts)
        return Features(
            logits=np.concatenate([p.logits for p in parts]),
            pooled={k: np.concatenate([p.pooled[k] for p in parts]) for k in first.pooled},
            raw={k: torch.cat([p.raw[k] for p in parts]) for k in first.raw},
            images=torch.cat([p.images for p in parts]) if has_images else None,
            labels=np.concatenate([p.labels for p in parts]) if has_labels else None,
        )


class FeatureCache:
    """A model plus the layers to hook: ``extract(images)`` runs ONE forward pass per batch for all layers.

    ``layers`` are names or glob patterns understood by ``engine.models.FeatureExtractor`` (or ``None`` for every
    hookable layer); ``raw_layers`` (a subset of the extracted layers) additionally keep their un-pooled maps.
    ``extractor`` overrides the feature extractor: any callable ``x -> (logits, {layer: feature})`` whose forward is
    differentiable w.r.t. ``x`` (MAHA's input preprocessing backpropagates through it).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        raw_layers: Iterable[str] = (),
        batch_size: int = 128,
        device: str | torch.device = "cpu",
        extractor: Extractor | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UserTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.raw_layers = tuple(raw_layers)
        if extractor is None:  # its hooks stay on the model until this cache is collected
            layers = list(layers) if layers is not None else None
            extractor = FeatureExtractor(model, layers=layers, raw_layers=self.raw_layers)
            weakref.finalize(self, extractor.remove)
        self.extractor = extractor
        self._batches: dict[tuple, int] = {}

    def batch_for(self, shape: Sequence[int], backward: bool = False) -> int:
        """Images of ``shape`` (C, H, W) per batch: ``batch_size``, fewer when one image's features and raw maps
        (held for the whole batch) plus its widest layer (with ``backward``: the activations its backward pass
        keeps) would not fit the memory budget (engine.models.memory.memory_budget)."""
        key = (tuple(shape), backward)
        if key not in self._batches:
            with torch.no_grad():
                logits, feats = self.extractor(torch.zeros(1, *shape, device=self.device))
            per_image = logits.nbytes + sum(f.nbytes for f in feats.values())
            per_image += bytes_per_image(self.model, shape, backward=backward)
            self._batches[key] = max(1, min(self.batch_size, memory_budget(self.device) // per_image))
        return self._batches[key]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Differentiable ``(logits, {layer: pooled (N, C)})`` of one batch already on the device."""
        logits, feats = self.extractor(x)
        return logits, {name: pool_feature(f) for name, f in feats.items()}

    def pooled_until(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Differentiable pooled (N, C) features of layers ``names`` for one batch on the device; with a
        FeatureExtractor the pass ends right after the deepest of them."""
        if isinstance(self.extractor, FeatureExtractor):
            last = max(names, key=self.extractor.layers.index)
            _, feats = self.extractor(x, stop_after=last)
        else:
            _, feats = self.extractor(x)
        return {name: pool_feature(feats[name]) for name in names}

    def layer_feature(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """Pooled (N, C) feature of layer ``name`` for one batch on the device (the pass ends after it)."""
        return self.pooled_until(x, [name])[name]

    @torch.no_grad()
    def extract(self, images: Any, labels: Any = None, keep_images: bool = True) -> Features:
        """Features of ``images`` ((N, C, H, W) tensor/array in [0, 1], or a Dataset of (image, label))."""
        images, labels = _as_images(images, labels)
        batch = self.batch_for(images.shape[1:])
        batches = (
            fast_input(self.model, images[start : start + batch].to(self.device, torch.float32))
            for start in range(0, len(images), batch)
        )
        logits, pooled, raw = extract_pooled(self.extractor, batches, self.raw_layers, name="images")
        return Features(
            logits=logits.float().numpy(),
            pooled={k: v.float().numpy() for k, v in pooled.items()},
            raw={k: v.float() for k, v in raw.items()},
            images=images if keep_images else None,
            labels=labels,
        )


def _as_images(images: Any, labels: Any) -> tuple[torch.Tensor, np.ndarray | None]:
    if isinstance(images, torch.utils.data.Dataset) and not isinstance(images, torch.Tensor):
        items = [images[i] for i in range(len(images))]
        images = torch.stack([torch.as_tensor(img) for img, _ in items])
        if labels is None:
            labels = np.array([int(lab) for _, lab in items])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise UserError(f"images must be a (N, C, H, W) tensor/array or a Dataset, got {shape}")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
    return images.detach().cpu(), labels
