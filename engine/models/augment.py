"""Light batch augmentation in plain torch ops (no torchvision), driven by an explicit generator.

Random horizontal flip, a small random rotation + shift (one ``affine_grid``/``grid_sample`` per batch, border
padding) and brightness/contrast jitter, then clamp to [0,1]. All randomness comes from ``generator``, so a
seeded generator gives the same augmented batch every time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.errors import UserError


@dataclass(frozen=True)
class Augment:
    """Augmentation strengths; ``Augment()`` is the default light setting, each 0 / False turns a part off."""

    hflip: bool = True
    vflip: bool = False
    max_rotate_deg: float = 10.0
    max_shift: float = 0.06  # fraction of the image size
    brightness: float = 0.1  # additive, +-
    contrast: float = 0.1  # multiplicative around the image mean, 1 +-

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4:
            raise UserError(f"x must be a batch (N,C,H,W), got shape {tuple(x.shape)}")
        n = x.shape[0]

        def uniform(scale: float, *shape: int) -> torch.Tensor:
            u = torch.rand(n, *shape, generator=generator, dtype=x.dtype, device="cpu")
            return ((2 * u - 1) * scale).to(x.device)

        def coin() -> torch.Tensor:
            return (torch.rand(n, generator=generator, device="cpu") < 0.5).to(x.device).view(n, 1, 1, 1)

        if self.hflip:
            x = torch.where(coin(), x.flip(-1), x)
        if self.vflip:
            x = torch.where(coin(), x.flip(-2), x)
        if self.max_rotate_deg > 0 or self.max_shift > 0:
            angle = uniform(math.radians(self.max_rotate_deg))
            shift = uniform(2 * self.max_shift, 2)  # affine_grid coordinates span [-1, 1]
            cos, sin = torch.cos(angle), torch.sin(angle)
            theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.contrast > 0:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (1 + uniform(self.contrast).view(n, 1, 1, 1)) + mean
        if self.brightness > 0:
            x = x + uniform(self.brightness).view(n, 1, 1, 1)
        return x.clamp(0.0, 1.0)
