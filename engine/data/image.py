"""Image decoding and conversion: files (PIL, DICOM) to uint8 HWC arrays, resizing, channels, fundus crop.

Decoders return numpy uint8 (H, W, C) with C in {1, 3}; ``prepare`` resizes/converts and returns the stored form,
uint8 (C, H, W); ``to_tensor`` gives the float32 (C, H, W) tensor in [0, 1] that datasets return.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

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


def header_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image or DICOM file read from its header, without decoding the pixels; PIL's ``verify`` checks
    a PNG's chunks and a JPEG must end with its end-of-image marker, so truncated files fail here."""
    if Path(path).suffix.lower() in DICOM_SUFFIXES or not Path(path).suffix:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    with Image.open(path) as im:
        width, height = im.size
        im.verify()
        if im.format == "JPEG" and not _ends_with_eoi(path):
            raise OSError("JPEG file is truncated (no end-of-image marker)")
    return height, width


def _ends_with_eoi(path: str | Path) -> bool:
    """Whether a JPEG file ends with the end-of-image marker FFD9 (trailing zero padding allowed)."""
    with open(path, "rb") as fh:
        fh.seek(max(0, os.fstat(fh.fileno()).st_size - 64))
        return fh.read().rstrip(b"\x00").endswith(b"\xff\xd9")


def minmax(values: np.ndarray) -> np.ndarray:
    """Values to [0, 1] by their own minimum and maximum (all zeros when constant)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    return np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo)


def _window_range(ds: Any) -> tuple[float, float]:
    """What a VOI window maps onto (PS3.3 C.11.2.1.2, as pydicom's apply_windowing): the range of the stored values,
    or of the modality LUT's entries, through the rescale."""
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, 2.0 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    elif ds.PixelRepresentation == 0:
        lo, hi = 0.0, 2.0**ds.BitsStored - 1
    else:
        lo, hi = -(2.0 ** (ds.BitsStored - 1)), 2.0 ** (ds.BitsStored - 1) - 1
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = lo * slope + intercept, hi * slope + intercept
    return lo, hi


def _voi_lut_view(ds: Any) -> Any:
    """A dataset holding only ``ds``'s first VOI LUT, its entries declared 16-bit: pydicom 3.0's apply_voi_lut
    indexes an 8-bit LUT with uint8 indices, which wrap for LUTs of more than 256 entries (the entries are decoded
    the same way: one per 16-bit word)."""
    from pydicom.dataset import Dataset

    lut = ds.VOILUTSequence[0].copy()
    entries, first, _ = lut.LUTDescriptor
    lut.LUTDescriptor = [entries, first, 16]
    view = Dataset()
    view.VOILUTSequence = [lut]
    if hasattr(ds, "file_meta"):  # the transfer syntax decodes OW LUT data
        view.file_meta = ds.file_meta
    return view


def display(ds: Any, arr: np.ndarray, source: str = "DICOM") -> np.ndarray:
    """A grey DICOM frame's display values in [0, 1]: pydicom's apply_modality_lut (Modality LUT Sequence or
    rescale), then apply_voi_lut with the *first* VOI transform (index 0: the first LUT of a VOI LUT Sequence, or the
    first of several window centre/width pairs, with the file's VOI LUT Function), a VOI LUT Sequence taking
    precedence over windows when a file has both. The VOI output is scaled from its nominal range (0 to 2**bits - 1
    of the LUT's descriptor; the window's output range) to [0, 1]; a file with neither, or whose LUT or window
    pydicom refuses (a warning naming ``source`` says so), is min-max scaled. MONOCHROME1 is inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds)
    try:
        if ds.get("VOILUTSequence"):
            entries, first, bits = ds.VOILUTSequence[0].LUTDescriptor
            last = first + (entries or 2**16) - 1  # values outside [first, last] take the end entries
            inputs = np.clip(np.rint(values), first, last).astype(np.int64)
            out = apply_voi_lut(inputs, _voi_lut_view(ds), index=0) / (2.0**bits - 1)
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            lo, hi = _window_range(ds)
            out = (apply_voi_lut(values, ds, index=0, prefer_lut=False) - lo) / (hi - lo)
        else:
            out = minmax(values)
    except (ValueError, NotImplementedError) as exc:  # e.g. window width 0, a 9-bit LUT
        warnings.warn(f"{source}: {exc}; showing its values min-max scaled instead", stacklevel=2)
        out = minmax(values)
    out = np.clip(out, 0.0, 1.0)
    return 1.0 - out if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1" else out


def read_dicom(path: str | Path) -> np.ndarray:
    """DICOM -> uint8 (H, W) grey through :func:`display`, or (H, W, 3) for colour files (min-max scaled when not
    8-bit). Multi-frame files give their first frame."""
    import pydicom

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return to_uint8(minmax(arr)) if arr.dtype != np.uint8 else arr
    return to_uint8(display(ds, arr, f"DICOM {str(path)!r}"))


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
