"""``fundus-synth``: random views of the real fundus photo ``skimage.data.retina()`` with synthetic diabetic
retinopathy lesions whose kind and count follow the grade (international clinical DR scale):

0 none; 1 microaneurysms only; 2 + dot/blot haemorrhages and hard exudates; 3 + many haemorrhages, venous beading
and cotton-wool spots; 4 + neovascularisation (fine tangled new vessels, at the disc or elsewhere).
Every grade also gets acquisition artefacts (dust specks, light reflexes) so "any bright/dark spot" is no shortcut.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from engine.data.synthetic.common import (
    blob,
    curve,
    downscale,
    photometric,
    pick_points,
    sample,
    stamp,
    view_coords,
)

CLASSES = {
    "grade": ["0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative"],
    "binary": ["no DR", "DR"],
}
# Lesion counts per grade: (low, high) inclusive.
COUNTS = {
    "microaneurysm": [(0, 0), (3, 7), (5, 12), (6, 14), (4, 10)],
    "haemorrhage": [(0, 0), (0, 0), (1, 4), (7, 14), (3, 10)],
    "exudate": [(0, 0), (0, 0), (3, 9), (4, 12), (3, 10)],
    "cotton_wool": [(0, 0), (0, 0), (0, 0), (2, 4), (1, 3)],
    "beading": [(0, 0), (0, 0), (0, 0), (1, 2), (0, 2)],
    "neovascular": [(0, 0), (0, 0), (0, 0), (0, 0), (1, 2)],
}
HAEM_TINT = np.array([0.55, 0.3, 0.32])  # multiplicative: dark red
EXUDATE = np.array([1.0, 0.9, 0.45])  # waxy yellow
COTTON = np.array([0.93, 0.88, 0.8])  # pale, fluffy


def grade_weights(task: str) -> np.ndarray:
    """Grade frequencies: uniform for 'grade'; for 'binary' half grade 0 and the rest spread over grades 1-4."""
    return np.full(5, 0.2) if task == "grade" else np.array([0.5, 0.125, 0.125, 0.125, 0.125])


def task_label(grade: int, task: str) -> int:
    return int(grade) if task == "grade" else int(grade > 0)


@functools.lru_cache(maxsize=4)
def source(side: int) -> dict[str, np.ndarray]:
    """The retina photo at ``side`` pixels with its fundus mask, vessel map and optic-disc centre."""
    from skimage.data import retina

    rgb = downscale(retina().astype(np.float32) / 255.0, side)
    grey = rgb.max(axis=2)
    mask = ndimage.median_filter(grey, 5) > 0.08
    mask = ndimage.binary_erosion(mask, iterations=max(1, side // 60))
    green = rgb[..., 1]
    r = max(2, side // 80)
    vessel = ndimage.grey_closing(green, size=(2 * r + 1, 2 * r + 1)) - green
    vessel = ndimage.gaussian_filter(vessel, 0.7) * mask
    vessel_mask = vessel > np.quantile(vessel[mask], 0.9)
    disc = np.unravel_index(np.argmax(ndimage.gaussian_filter(grey, side / 30) * mask), grey.shape)
    return {"rgb": rgb, "mask": mask.astype(np.float32), "vessel": vessel_mask.astype(np.float32), "disc": disc}


def _count(rng: np.random.Generator, kind: str, grade: int) -> int:
    lo, hi = COUNTS[kind][grade]
    return int(rng.integers(lo, hi + 1))


def render(rng: np.random.Generator, grade: int, size: int, contrast: float = 1.0) -> np.ndarray:
    """One fundus view of DR ``grade`` at ``size`` x ``size`` (uint8 HWC RGB)."""
    work = 2 * size
    src = source(2 * work)
    side = src["rgb"].shape[0]
    coords = view_coords(rng, work, (side / 2, side / 2), side * rng.uniform(0.82, 1.08), 20, 0.04, rng.random() < 0.5)
    img = sample(src["rgb"], coords)
    inside = sample(src["mask"], coords) > 0.5
    vessels = (sample(src["vessel"], coords) > 0.5) & inside
    u = work / 128.0  # lesion sizes are given in pixels of a 128-pixel canvas
    safe = ndimage.binary_erosion(inside, iterations=int(4 * u) + 1)

    dark, yellow, pale = (np.zeros((work, work)) for _ in range(3))
    for y, x in pick_points(rng, safe, _count(rng, "microaneurysm", grade)):
        s = u * rng.uniform(0.75, 1.1)
        stamp(dark, y, x, s, s, amp=rng.uniform(0.75, 1.0))
    for y, x in pick_points(rng, safe, _count(rng, "haemorrhage", grade)):
        blob(rng, dark, y, x, u * rng.uniform(2.0, 4.5), lobes=int(rng.integers(1, 4)))
    n_ex = _count(rng, "exudate", grade)
    for cy, cx in pick_points(rng, safe, max(1, n_ex // 4) if n_ex else 0):  # exudates come in clusters
        for dy, dx in rng.normal(0, 5 * u, (int(rng.integers(2, 6)), 2)):
            s = u * rng.uniform(0.8, 1.5)
            stamp(yellow, cy + dy, cx + dx, s, s * rng.uniform(0.7, 1.3), amp=rng.uniform(0.6, 1.0))
    for y, x in pick_points(rng, safe, _count(rng, "cotton_wool", grade)):
        blob(rng, pale, y, x, u * rng.uniform(3.5, 6.0), lobes=3)
    for y, x in pick_points(rng, vessels & safe, _count(rng, "beading", grade)):  # beads along a venous segment
        near = vessels & ((np.arange(work)[:, None] - y) ** 2 + (np.arange(work)[None, :] - x) ** 2 < (12 * u) ** 2)
        for by, bx in pick_points(rng, near, int(rng.integers(5, 10))):
            stamp(dark, by, bx, 1.6 * u, 1.6 * u, amp=0.6)
    neo = np.zeros((work, work))
    for _ in range(_count(rng, "neovascular", grade)):
        disc = np.array(src["disc"], dtype=np.float64) + 0.5
        near_disc = (np.abs(coords[0] - disc[0]) < side * 0.08) & (np.abs(coords[1] - disc[1]) < side * 0.08)
        y, x = pick_points(rng, (near_disc & safe) if rng.random() < 0.5 and (near_disc & safe).any() else safe, 1)[0]
        for _ in range(int(rng.integers(3, 7))):  # a tangled tuft of fine loops
            curve(rng, neo, y + rng.normal(0, 3 * u), x + rng.normal(0, 3 * u), int(24 * u), 0.5, 0.4)
    dark += np.clip(ndimage.gaussian_filter(neo, 0.5 * u) * 1.2, 0, 0.75)

    # artefacts on every grade: grey dust specks (dark, colourless) and soft light reflexes
    dust, glare = np.zeros((work, work)), np.zeros((work, work))
    for y, x in pick_points(rng, inside, int(rng.integers(0, 4))):
        stamp(dust, y, x, u * rng.uniform(1.0, 2.5), u * rng.uniform(1.0, 2.5), amp=rng.uniform(0.15, 0.35))
    for y, x in pick_points(rng, inside, int(rng.integers(0, 3))):
        stamp(glare, y, x, u * rng.uniform(2, 4), u * rng.uniform(6, 14), rng.uniform(0, np.pi), rng.uniform(0.1, 0.2))

    k = contrast * rng.uniform(0.7, 1.0)
    a = np.clip(dark * k, 0, 0.95)[..., None]
    img = img * (1 - a * (1 - HAEM_TINT))
    img = img + np.clip(yellow * k, 0, 1)[..., None] * (EXUDATE * img.max(axis=2, keepdims=True) ** 0.3 - img)
    img = img + np.clip(pale * 0.45 * k, 0, 1)[..., None] * (COTTON * img.max(axis=2, keepdims=True) ** 0.5 - img)
    img = img * (1 - np.clip(dust, 0, 1)[..., None]) + np.clip(glare, 0, 1)[..., None] * (1 - img) * inside[..., None]
    img = photometric(rng, img) * ndimage.gaussian_filter(inside.astype(np.float64), u)[..., None]
    return downscale(img.astype(np.float32), size)
