"""``cxr-synth``: random views of the real chest radiograph ``RG1_UNCI.dcm`` (package ``pydicom-data``;
MONOCHROME1, so inverted) with or without synthetic pneumonia: soft, lobular consolidations (clusters of
overlapping Gaussian lobules with a mottled texture, brighter = more attenuating) confined to the lung fields.
Both classes get a low-frequency exposure field so "brighter somewhere" alone is no shortcut.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

import numpy as np
from scipy import ndimage

from engine.data.synthetic.common import blob, downscale, photometric, pick_points, sample, smooth_noise, view_coords
from engine.errors import UserError

CLASSES = ["normal", "pneumonia"]
# Lung fields of this radiograph as ellipses (centre y, centre x, radius y, radius x) in image fractions,
# intersected with "darker than the 80th percentile of the smoothed lung area" to drop heart and diaphragm.
LUNGS = [(0.44, 0.285, 0.29, 0.135), (0.42, 0.715, 0.29, 0.135)]


def radiograph_path() -> Path:
    """Locate RG1_UNCI.dcm among the installed files of the ``pydicom-data`` distribution (never downloads)."""
    try:
        files = importlib.metadata.files("pydicom-data") or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError("cxr-synth needs the 'pydicom-data' package (pip install pydicom-data)") from None
    for f in files:
        if f.name == "RG1_UNCI.dcm":
            return Path(f.locate())
    raise UserError("RG1_UNCI.dcm not found among the files of the installed 'pydicom-data' package")


@functools.lru_cache(maxsize=4)
def source(side: int) -> dict[str, np.ndarray]:
    """The radiograph (inverted, 0.5-99.5 percentile window, gamma 1.4) at ``side`` pixels with a lung mask."""
    import pydicom

    raw = pydicom.dcmread(radiograph_path()).pixel_array.astype(np.float32)
    raw = raw.max() - raw  # MONOCHROME1: high values are dark
    lo, hi = np.percentile(raw, [0.5, 99.5])
    img = downscale(np.clip((raw - lo) / (hi - lo), 0, 1) ** 1.4, side)
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side
    lungs = np.zeros((side, side), dtype=bool)
    for cy, cx, ry, rx in LUNGS:
        lungs |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    smooth = ndimage.gaussian_filter(img, side / 80)
    lungs &= smooth < np.percentile(smooth[lungs], 80)
    lungs = ndimage.binary_opening(lungs, iterations=max(1, side // 100))
    return {"img": img, "lungs": lungs.astype(np.float32)}


def render(rng: np.random.Generator, label: int, size: int, contrast: float = 1.0) -> np.ndarray:
    """One radiograph view, with pneumonia when ``label`` is 1, at ``size`` x ``size`` (float HW1 in [0, 1])."""
    work = 2 * size
    src = source(2 * work)
    side = src["img"].shape[0]
    coords = view_coords(rng, work, (side / 2, side / 2), side * rng.uniform(0.85, 1.05), 7, 0.04, False)
    img = sample(src["img"], coords)
    lungs = sample(src["lungs"], coords) > 0.5
    u = work / 128.0

    if label:
        opacity = np.zeros((work, work))
        n_regions = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        inner = ndimage.binary_erosion(lungs, iterations=int(3 * u) + 1)
        for cy, cx in pick_points(rng, inner if inner.any() else lungs, n_regions):
            radius = u * rng.uniform(9, 18)
            for _ in range(int(rng.integers(4, 9))):
                dy, dx = rng.normal(0, 0.45 * radius, 2)
                blob(rng, opacity, cy + dy, cx + dx, radius * rng.uniform(0.35, 0.6))
        texture = 0.5 + 0.5 * smooth_noise(rng, (work, work), 1.5 * u)
        soft_lungs = ndimage.gaussian_filter(lungs.astype(np.float64), 2 * u)
        alpha = np.clip(opacity, 0, 1) * texture * soft_lungs * contrast * rng.uniform(0.35, 0.65)
        img = 1 - (1 - img) * (1 - alpha)

    exposure = (smooth_noise(rng, (work, work), 12 * u) - 0.5) * rng.uniform(0, 0.1)
    img = np.clip(img + exposure, 0, 1)
    return downscale(photometric(rng, img[..., None], strength=0.6).astype(np.float32), size)
