"""Image decoding and conversion: files (PIL, DICOM) to uint8 HWC arrays, resizing, channels, fundus crop.

Decoders return numpy uint8 (H, W, C) with C in {1, 3}; ``prepare`` resizes/converts and returns the stored form,
uint8 (C, H, W); ``to_tensor`` gives the float32 (C, H, W) tensor in [0, 1] that datasets return.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from engine.errors import UserError, UserTypeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
DICOM_SUFFIXES = (".dcm", ".dicom")
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, what PIL's convert("L") uses

SizeLike = int | tuple[int, int] | None


def parse_size(image_size: SizeLike) -> tuple[int, int] | None:
    """Normalise ``image_size`` (int or (H, W) or None) to (H, W) or None."""
    if image_size is None:
        return None
    if isinstance(image_size, int | np.integer):
        size = (int(image_size), int(image_size))
    elif isinstance(image_size, tuple | list) and len(image_size) == 2:
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise UserTypeError(f"image_size: expected an int or (height, width), got {image_size!r}")
    if min(size) < 1:
        raise UserError(f"image_size: expected positive sizes, got {image_size!r}")
    return size


def check_channels(channels: int | None) -> int | None:
    if channels not in (None, 1, 3):
        raise UserError(f"channels: expected 1, 3 or None (keep), got {channels!r}")
    return channels


def as_hwc(img: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) with C in 1..4 -> (H, W, C) with C in {1, 3} (alpha dropped)."""
    if img.ndim == 2:
        return img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4):
        raise UserError(f"image: expected (H, W) or (H, W, C) with C in 1..4, got shape {img.shape}")
    if img.shape[2] == 2:  # grey + alpha
        return img[:, :, :1]
    return img[:, :, :3]


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float in [0, 1] or uint8 -> uint8 (rounded)."""
    if img.dtype == np.uint8:
        return img
    return np.clip(np.rint(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def convert_channels(img: np.ndarray, channels: int | None) -> np.ndarray:
    """uint8 HWC -> HWC with ``channels`` channels (grey replicated to RGB; RGB to luminance)."""
    if channels is None or img.shape[2] == channels:
        return img
    if channels == 3:
        return np.repeat(img, 3, axis=2)
    grey = img.astype(np.float64) @ LUMA
    return to_uint8(grey[:, :, None] / 255.0)


def resize(img: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 HWC -> uint8 HWC of ``size`` (H, W); bilinear with antialiasing (PIL) when shrinking."""
    if size is None or img.shape[:2] == size:
        return img
    mode = "L" if img.shape[2] == 1 else "RGB"
    out = Image.fromarray(img[:, :, 0] if mode == "L" else img, mode).resize((size[1], size[0]), Image.BILINEAR)
    return as_hwc(np.asarray(out))


def prepare(img: np.ndarray, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """Any decoded HWC image -> contiguous uint8 (C, H, W) at ``size`` with ``channels``."""
    img = resize(convert_channels(as_hwc(to_uint8(img)), channels), size)
    return np.array(img.transpose(2, 0, 1), order="C")  # a writable copy (PIL arrays are read-only)


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file fully (a truncated file raises OSError) -> uint8 HWC."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return as_hwc(read_dicom(path))
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            return as_hwc(to_uint8(np.clip(arr / top, 0, 1)))
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
        return as_hwc(np.asarray(im))


def window(values: np.ndarray, center: float | None = None, width: float | None = None) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2) to [0, 1]; min-max when no window is given."""
    values = np.asarray(values, dtype=np.float64)
    if center is None or width is None or width < 1:
        lo, hi = float(values.min()), float(values.max())
        return np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return None if value is None else float(value)


def read_dicom(path: str | Path) -> np.ndarray:
    """DICOM -> uint8 (H, W) grey (modality LUT, window centre/width else min-max, MONOCHROME1 inverted)
    or (H, W, 3) for colour files. Multi-frame files give their first frame."""
    import pydicom

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3:
        return to_uint8(window(arr)) if arr.dtype != np.uint8 else arr
    values = arr.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1)
    values += float(getattr(ds, "RescaleIntercept", 0) or 0)
    out = window(values, _first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None)))
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return to_uint8(out)


def fundus_crop(img: np.ndarray, threshold: int = 10, blur: int = 5, stride: int = 4) -> np.ndarray:
    """Crop to the bounding box of pixels brighter than ``threshold`` (0-255, max over channels) after a median
    blur of ``blur`` pixels, computed on a ``stride``-subsampled copy for speed. Unchanged if nothing is brighter."""
    img = as_hwc(img)
    grey = img.max(axis=2)[::stride, ::stride]
    grey = np.asarray(Image.fromarray(grey).filter(ImageFilter.MedianFilter(blur | 1)))
    ys, xs = np.nonzero(grey > threshold)
    if ys.size == 0:
        return img
    y0, y1 = ys.min() * stride, min((ys.max() + 1) * stride, img.shape[0])
    x0, x1 = xs.min() * stride, min((xs.max() + 1) * stride, img.shape[1])
    return img[y0:y1, x0:x1]


def to_tensor(chw: np.ndarray) -> torch.Tensor:
    """uint8 or float (C, H, W) numpy -> float32 torch (C, H, W) in [0, 1]."""
    if chw.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(chw)).float().div_(255.0)
    return torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32))
