"""The dataset contract and its two implementations: in-memory arrays and lazily decoded files.

Every dataset returns ``(image, label)`` with ``image`` a float32 (C, H, W) tensor in [0, 1] and ``label`` an int,
and has ``classes`` (list[str]), ``targets`` (int64 numpy (N,)), ``name``, ``paths`` (list[str] or None) and a
``fingerprint`` (a stable hash of its content used by split hashes and checkpoints).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.data.image import SizeLike, check_channels, parse_size, prepare, to_tensor
from engine.errors import UserError, UserTypeError
from engine.fileio import file_sha256

log = logging.getLogger("engine.data")


def _as_targets(labels: object, n: int | None = None) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        raise UserError(f"labels: expected shape ({n if n is not None else 'N'},), got {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) and not np.all(np.equal(np.mod(arr, 1), 0))):
        raise UserTypeError(f"labels: expected integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise UserError(f"labels: expected non-negative class indices, got min {arr.min()}")
    return arr


def _as_classes(classes: Sequence[str] | None, targets: np.ndarray) -> list[str]:
    n_classes = int(targets.max()) + 1 if targets.size else 0
    if classes is None:
        return [str(i) for i in range(n_classes)]
    classes = [str(c) for c in classes]
    if len(classes) < n_classes:
        raise UserError(f"classes: {len(classes)} names given but labels go up to {n_classes - 1}")
    return classes


class ImageDataset(Dataset):
    """Shared attributes and helpers of every engine dataset. ``labelled`` is False for a set without labels (its
    one class is a placeholder); ``labels_source`` says where the labels came from."""

    classes: list[str]
    targets: np.ndarray
    name: str
    paths: list[str] | None
    labelled: bool = True
    labels_source: str = "dataset"

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.targets, minlength=self.num_classes)

    def _content_digest(self, h: hashlib._Hash) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """sha256 (hex, 16 chars) of class names, targets and content (pixels, or relative paths and file bytes)."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256()
            h.update("\x00".join(self.classes).encode())
            h.update(self.targets.tobytes())
            self._content_digest(h)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}={n}" for c, n in zip(self.classes, self.class_counts(), strict=True))
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, {counts})"


class ArrayDataset(ImageDataset):
    """In-memory images: uint8 or float (in [0, 1]) numpy arrays or torch tensors, (N, H, W), NCHW or NHWC.

    Stored as uint8 (C, H, W) when given uint8, else float32. ``image_size``/``channels`` resize/convert once here.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        classes: Sequence[str] | None = None,
        name: str = "arrays",
        image_size: SizeLike = None,
        channels: int | None = None,
    ) -> None:
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        self.images = _to_nchw(arr, parse_size(image_size), check_channels(channels))
        self.targets = _as_targets(labels, self.images.shape[0])
        self.classes = _as_classes(classes, self.targets)
        self.name = str(name)
        self.paths = None
        self.skipped: list[str] = []

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_tensor(self.images[i]), int(self.targets[i])

    def _content_digest(self, h: hashlib._Hash) -> None:
        h.update(str(self.images.shape).encode() + str(self.images.dtype).encode())
        h.update(np.ascontiguousarray(self.images).data)


def _to_nchw(arr: np.ndarray, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """Validate and convert an image batch to NCHW (uint8 kept, anything else float32 in [0, 1])."""
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        last_is_c, second_is_c = arr.shape[-1] in (1, 3, 4), arr.shape[1] in (1, 3, 4)
        if last_is_c and not second_is_c:
            arr = arr.transpose(0, 3, 1, 2)
        elif not second_is_c:
            raise UserError(f"images: expected NCHW or NHWC with 1, 3 or 4 channels, got shape {arr.shape}")
        arr = arr[:, :3]
    else:
        raise UserError(f"images: expected (N, H, W), (N, C, H, W) or (N, H, W, C), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise UserError("images: the dataset is empty (0 images)")
    if arr.dtype == np.bool_ or not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
        raise UserTypeError(f"images: expected uint8 or float values, got dtype {arr.dtype}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise UserError("images: float images must be finite and in [0, 1] (divide 0-255 data by 255)")
    if size is None and (channels is None or channels == arr.shape[1]):
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint8:
        return np.stack([prepare(im.transpose(1, 2, 0), size, channels) for im in arr])
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if channels == 1 and t.shape[1] == 3:
        t = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif channels == 3 and t.shape[1] == 1:
        t = t.repeat(1, 3, 1, 1)
    if size is not None and tuple(t.shape[2:]) != size:
        t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    return t.clamp_(0, 1).numpy()


class FileDataset(ImageDataset):
    """Images decoded from files by ``decode(path) -> uint8 HWC``, converted to ``image_size``/``channels``.

    Every file is decoded once at construction (``workers`` threads) so unreadable or truncated files are found,
    logged with their path and skipped (``.skipped``) instead of failing mid-training. Decoded images are kept in
    an LRU cache of at most ``cache_mb`` megabytes and re-decoded on demand beyond it.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        name: str,
        decode: Callable[[str], np.ndarray],
        image_size: SizeLike = None,
        channels: int | None = 3,
        root: str | Path | None = None,
        cache_mb: float = 1024.0,
        workers: int | None = None,
        labelled: bool = True,
    ) -> None:
        self.labelled = labelled
        paths = [str(p) for p in paths]
        targets = _as_targets(labels, len(paths))
        self.name, self.classes = str(name), _as_classes(classes, targets)
        self.root = None if root is None else str(root)
        self._size, self._channels, self._decode = parse_size(image_size), check_channels(channels), decode
        self._budget, self._used, self._cache = int(cache_mb * 2**20), 0, OrderedDict()
        self._lock = threading.Lock()
        with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            ok = list(pool.map(self._scan, paths))
        self.skipped = [p for p, good in zip(paths, ok, strict=True) if not good]
        if self.skipped:
            log.warning("%s: skipped %d unreadable file(s) of %d", self.name, len(self.skipped), len(paths))
        keep = np.flatnonzero(ok)
        if keep.size == 0:
            raise UserError(f"{self.name}: the dataset is empty (no readable images among {len(paths)} files)")
        self.paths = [paths[i] for i in keep]
        self.targets = targets[keep]

    def _load(self, path: str) -> np.ndarray:
        return prepare(self._decode(path), self._size, self._channels)

    def _scan(self, path: str) -> bool:
        try:
            img = self._load(path)
        except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable file"
            log.warning("skipping unreadable image %s: %s: %s", path, type(err).__name__, err)
            return False
        self._remember(path, img)
        return True

    def _remember(self, path: str, img: np.ndarray) -> None:
        with self._lock:
            if img.nbytes > self._budget or path in self._cache:
                return
            self._cache[path] = img
            self._used += img.nbytes
            while self._used > self._budget:
                _, old = self._cache.popitem(last=False)
                self._used -= old.nbytes

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.paths[i]
        with self._lock:
            img = self._cache.get(path)
            if img is not None:
                self._cache.move_to_end(path)
        if img is None:
            img = self._load(path)
            self._remember(path, img)
        return to_tensor(img), int(self.targets[i])

    def __getstate__(self) -> dict:  # DataLoader workers pickle the dataset; locks do not pickle
        state = self.__dict__.copy()
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _content_digest(self, h: hashlib._Hash) -> None:
        h.update(repr((self._size, self._channels)).encode())
        for p in self.paths:  # each file's name and bytes: a file replaced under the same name changes it
            rel = os.path.relpath(p, self.root) if self.root else os.path.basename(p)
            h.update(rel.replace(os.sep, "/").encode() + b"\x00" + file_sha256(p).encode())


class SubsetDataset(ImageDataset):
    """A view of ``base`` at ``indices`` that keeps the dataset contract (classes, targets, name, paths)."""

    def __init__(self, base: ImageDataset, indices: np.ndarray, part: str = "subset") -> None:
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.classes, self.targets = base.classes, base.targets[self.indices]
        self.name = f"{base.name}[{part}]"
        self.paths = None if base.paths is None else [base.paths[i] for i in self.indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.base[int(self.indices[i])]

    def _content_digest(self, h: hashlib._Hash) -> None:
        h.update(self.base.fingerprint.encode() + self.indices.tobytes())


class RelabelledDataset(ImageDataset):
    """``base``'s images with other labels (e.g. a model's predictions for an unlabelled set, ``source`` saying so)."""

    def __init__(self, base: ImageDataset, targets: np.ndarray, classes: Sequence[str], source: str) -> None:
        self.base = base
        self.targets = _as_targets(targets, len(base))
        self.classes = _as_classes(classes, self.targets)
        self.name, self.paths, self.labels_source = base.name, base.paths, source

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.base[i][0], int(self.targets[i])

    def _content_digest(self, h: hashlib._Hash) -> None:
        h.update(self.base.fingerprint.encode() + self.labels_source.encode())
