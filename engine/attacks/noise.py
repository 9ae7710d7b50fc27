"""Noise controls for the detectors' protocol: random perturbations with the same L-inf budget as an attack."""

from __future__ import annotations

from typing import Any

import torch

from engine.attacks.base import box_bounds, check_images, parse_eps
from engine.errors import UserError

NOISE_KINDS = ("uniform", "gaussian")


def noise_like(x: Any, eps: float | str, kind: str = "uniform", seed: int = 0, sigma: float | None = None):
    """Noisy copies of the images ``x`` in [0,1]: x + n, clipped to the L-inf eps-ball and to [0,1].

    ``kind="uniform"``: n ~ U(-eps, eps) per pixel; ``"gaussian"``: n ~ N(0, sigma^2) (sigma defaults to eps),
    clipped to [-eps, eps] so the budget matches the attack's. Deterministic for a given ``seed``.
    """
    x = check_images(x)
    eps = parse_eps(eps)
    if kind not in NOISE_KINDS:
        raise UserError(f"kind must be one of {NOISE_KINDS}, got {kind!r}")
    sigma = eps if sigma is None else parse_eps(sigma, "sigma")
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    if kind == "uniform":
        noise = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) * sigma
    lo, hi = box_bounds(x, eps)
    return torch.clamp(x + noise, lo, hi)


__all__ = ["noise_like", "NOISE_KINDS"]
