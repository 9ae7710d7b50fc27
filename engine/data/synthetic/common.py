"""Building blocks shared by the synthetic generators: balanced labels, random views of a source image,
soft lesion primitives and photometric jitter. All randomness comes from the ``numpy.random.Generator`` passed in.

Coordinates are (y, x) in pixels of the working canvas (``work`` = 2x the output size, averaged down at the end).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage


def balanced_labels(n: int, weights: np.ndarray, seed: int) -> np.ndarray:
    """``n`` labels with class counts as close as possible to ``n * weights`` (largest remainder), shuffled."""
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = np.floor(n * weights).astype(np.int64)
    order = np.argsort(-(n * weights - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    labels = np.repeat(np.arange(len(weights)), counts)
    return np.random.default_rng([seed, 0x1AB]).permutation(labels)


def downscale(img: np.ndarray, size: int) -> np.ndarray:
    """Float HWC (or HW) image in [0, 1] -> ``size`` x ``size`` with antialiasing (PIL, per channel)."""
    chans = img[..., None] if img.ndim == 2 else img
    out = [
        np.asarray(Image.fromarray(chans[..., c].astype(np.float32), "F").resize((size, size), Image.BILINEAR))
        for c in range(chans.shape[2])
    ]
    res = np.stack(out, axis=2)
    return res[..., 0] if img.ndim == 2 else res


def view_coords(
    rng: np.random.Generator,
    work: int,
    center: tuple[float, float],
    side: float,
    max_angle: float,
    shift: float,
    flip: bool,
) -> np.ndarray:
    """Source coordinates (2, work, work) of a random view: a square of ``side`` source pixels around ``center``
    (jittered by ``shift`` * side), rotated by up to ``max_angle`` degrees, mirrored left-right if ``flip``."""
    theta = np.deg2rad(rng.uniform(-max_angle, max_angle))
    cy = center[0] + rng.uniform(-shift, shift) * side
    cx = center[1] + rng.uniform(-shift, shift) * side
    t = (np.arange(work) + 0.5) / work - 0.5
    gy, gx = np.meshgrid(t * side, t * side * (-1.0 if flip else 1.0), indexing="ij")
    cos, sin = np.cos(theta), np.sin(theta)
    return np.stack([cy + cos * gy - sin * gx, cx + sin * gy + cos * gx])


def sample(src: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Bilinear sampling of a float HW or HWC source at ``coords`` (zero outside)."""
    if src.ndim == 2:
        return ndimage.map_coordinates(src, coords, order=1, mode="constant", cval=0.0)
    return np.stack([sample(src[..., c], coords) for c in range(src.shape[2])], axis=2)


def stamp(layer: np.ndarray, y: float, x: float, sy: float, sx: float, angle: float = 0.0, amp: float = 1.0) -> None:
    """Add an oriented Gaussian blob (std ``sy``, ``sx`` pixels, peak ``amp``) to ``layer`` in place."""
    r = int(np.ceil(3 * max(sy, sx))) + 1
    y0, y1 = max(int(y) - r, 0), min(int(y) + r + 1, layer.shape[0])
    x0, x1 = max(int(x) - r, 0), min(int(x) + r + 1, layer.shape[1])
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - y, xx - x
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dy + sin * dx, -sin * dy + cos * dx
    layer[y0:y1, x0:x1] += amp * np.exp(-0.5 * ((u / sy) ** 2 + (v / sx) ** 2))


def blob(rng: np.random.Generator, layer: np.ndarray, y: float, x: float, radius: float, lobes: int = 1) -> None:
    """An irregular soft blob of about ``radius`` pixels made of ``lobes`` overlapping Gaussians (peak ~1)."""
    for _ in range(lobes):
        off = rng.normal(0, 0.35 * radius, 2) if lobes > 1 else (0.0, 0.0)
        s = radius * rng.uniform(0.45, 0.75)
        stamp(layer, y + off[0], x + off[1], s * rng.uniform(0.7, 1.3), s, rng.uniform(0, np.pi))


def curve(rng: np.random.Generator, layer: np.ndarray, y: float, x: float, steps: int, step: float, turn: float):
    """Splat a random-walk curve (``steps`` points ``step`` pixels apart, heading turning by N(0, ``turn``))."""
    heading = rng.uniform(0, 2 * np.pi)
    turns = np.cumsum(rng.normal(0, turn, steps)) + heading
    ys = y + np.cumsum(step * np.sin(turns))
    xs = x + np.cumsum(step * np.cos(turns))
    iy, ix = np.rint(ys).astype(int), np.rint(xs).astype(int)
    ok = (iy >= 0) & (iy < layer.shape[0]) & (ix >= 0) & (ix < layer.shape[1])
    np.add.at(layer, (iy[ok], ix[ok]), 1.0)


def pick_points(rng: np.random.Generator, mask: np.ndarray, k: int) -> np.ndarray:
    """``k`` (y, x) points drawn uniformly from the pixels where ``mask`` is true (jittered within the pixel)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        ys, xs = np.array([mask.shape[0] // 2]), np.array([mask.shape[1] // 2])
    idx = rng.integers(0, ys.size, k)
    return np.stack([ys[idx], xs[idx]], axis=1) + rng.uniform(0, 1, (k, 2))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to [0, 1] (a texture / low-frequency field)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    lo, hi = field.min(), field.max()
    return (field - lo) / (hi - lo + 1e-12)


def photometric(rng: np.random.Generator, img: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Acquisition jitter on a float HWC image in [0, 1]: channel gains, brightness, gamma, blur, vignetting,
    sensor noise. ``strength`` scales every jitter."""
    h, w, c = img.shape
    gain = np.exp(rng.normal(0, 0.06 * strength, c) + rng.normal(0, 0.12 * strength))
    img = np.clip(img * gain, 0, 1) ** np.exp(rng.normal(0, 0.15 * strength))
    sigma = rng.uniform(0, 0.9 * strength)
    if sigma > 0.2:
        img = ndimage.gaussian_filter(img, (sigma, sigma, 0))
    cy, cx = h / 2 + rng.normal(0, 0.1 * h), w / 2 + rng.normal(0, 0.1 * w)
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (0.5 * h) ** 2
    img = img * (1 - rng.uniform(0, 0.35 * strength) * np.clip(r2, 0, 2)[..., None] / 2)
    img = img + rng.normal(0, rng.uniform(0.003, 0.015) * strength, img.shape)
    return np.clip(img, 0, 1)
