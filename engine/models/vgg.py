"""VGG-16 (configuration "D"), optionally with batch norm, with torchvision-compatible parameter names.

``features.N`` is torchvision's Sequential (conv, [bn], relu, ..., maxpool), ``classifier.0/3/6`` its three
Linear layers. Options for small CPU runs: ``width`` scales the conv channels, ``hidden`` the classifier width
(default ``4096 * width``) and ``pool_size`` the adaptive average pool before the classifier (torchvision: 7;
use 1 for 32-64 px inputs). ``dropout`` is the probability of the classifier's two Dropout layers
(torchvision: 0.5). ReLUs are not in-place, so hooked outputs are never overwritten.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.models.resnet import scaled

VGG16_CONFIG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG(nn.Module):
    """torchvision-layout VGG: features, avgpool, classifier."""

    def __init__(
        self,
        config: tuple[int | str, ...] = VGG16_CONFIG,
        batch_norm: bool = False,
        num_classes: int = 1000,
        in_channels: int = 3,
        width: float = 1.0,
        hidden: int | None = None,
        pool_size: int = 7,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            cout = scaled(int(item), width)
            layers.append(nn.Conv2d(cin, cout, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU())
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        hidden = scaled(4096, width) if hidden is None else hidden
        self.classifier = nn.Sequential(
            nn.Linear(cin * pool_size * pool_size, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):  # torchvision's N(0, 0.01) at 4096 wide; scaled up for narrow heads
                nn.init.normal_(m.weight, 0, 0.01 * math.sqrt(4096 / hidden))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def vgg16(**options: object) -> VGG:
    """VGG-16 without batch norm."""
    return VGG(VGG16_CONFIG, batch_norm=False, **options)


def vgg16_bn(**options: object) -> VGG:
    """VGG-16 with batch norm."""
    return VGG(VGG16_CONFIG, batch_norm=True, **options)
