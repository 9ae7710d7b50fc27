"""``natural``: random crops of the colour photos bundled with scikit-image and scikit-learn.

Tasks:
- ``splice`` (default, 2 classes): is a soft-edged piece of *another* photo blended into the crop? Like the
  lesion tasks, it asks for a small local anomaly on a natural background (colour-matched partially to its
  surroundings so the decision needs texture, not just a colour patch), which keeps the medical-vs-natural
  stress test about image statistics rather than task type.
- ``source`` (6 classes): which photo the crop comes from.
"""

from __future__ import annotations

import functools

import numpy as np

from engine.data.synthetic.common import blob, downscale, photometric, sample, view_coords

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "china", "flower"]
CLASSES = {"splice": ["intact", "spliced"], "source": PHOTOS}


@functools.lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """The six bundled photos as float32 HWC in [0, 1] (skimage: 4, sklearn load_sample_images: 2)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    sk = [getattr(skimage.data, name)() for name in PHOTOS[:4]]
    sl = list(load_sample_images().images)  # china.jpg, flower.jpg
    return tuple(im.astype(np.float32) / 255.0 for im in sk + sl)


def _crop(rng: np.random.Generator, photo: np.ndarray, work: int) -> np.ndarray:
    h, w = photo.shape[:2]
    side = min(h, w) * rng.uniform(0.3, 0.55)
    margin = side * 0.72  # keeps the rotated square inside the photo
    center = (rng.uniform(margin, h - margin), rng.uniform(margin, w - margin))
    return sample(photo, view_coords(rng, work, center, side, 15, 0.0, rng.random() < 0.5))


def render(rng: np.random.Generator, label: int, size: int, task: str = "splice", contrast: float = 1.0) -> np.ndarray:
    """One crop at ``size`` x ``size`` (float HWC RGB); ``label`` is spliced/intact or the photo index."""
    work = 2 * size
    pics = photos()
    base = int(label) if task == "source" else int(rng.integers(len(pics)))
    img = _crop(rng, pics[base], work)
    if task == "splice" and label:
        u = work / 128.0
        for _ in range(int(rng.integers(1, 3))):
            other = (base + int(rng.integers(1, len(pics)))) % len(pics)
            patch = _crop(rng, pics[other], work)
            mask = np.zeros((work, work))
            y, x = rng.uniform(0.2 * work, 0.8 * work, 2)
            blob(rng, mask, y, x, u * rng.uniform(14, 24), lobes=int(rng.integers(2, 5)))
            alpha = np.clip(2.0 * mask, 0, 1)[..., None] * (contrast * rng.uniform(0.85, 1.0))
            w = alpha / (alpha.sum() + 1e-9)
            match = rng.uniform(0.0, 0.4)  # shift the patch's mean colour toward what it covers
            patch = patch + match * ((img * w).sum((0, 1)) - (patch * w).sum((0, 1)))
            img = img * (1 - alpha) + np.clip(patch, 0, 1) * alpha
    return downscale(photometric(rng, img).astype(np.float32), size)
