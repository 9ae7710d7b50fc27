"""ResNet-18/50 with torchvision-compatible parameter names (a torchvision state_dict loads with strict=True).

Differences from torchvision that leave the state_dict unchanged:

* every ReLU application is its own module (``relu`` in the stem; ``relu1``/``relu2`` in a BasicBlock,
  ``relu1``/``relu2``/``relu3`` in a Bottleneck), so each ReLU *output* can be hooked by name. ReLUs have no
  parameters, so the keys are exactly torchvision's. They are not in-place, so a hooked output is never overwritten.
* ``width`` scales every channel count (64, 128, 256, 512) for small CPU runs; ``width=1`` is torchvision's.
* ``small_stem=True`` replaces the 7x7/2 conv + max-pool stem by a 3x3/1 conv and no pool (for 32-64 px inputs);
  ``conv1`` keeps its name but not torchvision's shape.
* ``dropout > 0`` adds ``dropout`` (nn.Dropout) before ``fc`` (the HFC paper's ResNet-50 uses 0.3).
"""

from __future__ import annotations

import torch
from torch import nn


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels * width``, rounded, at least 1."""
    return max(1, int(round(channels * width)))


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus identity (torchvision ``BasicBlock``)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (stride here, "ResNet v1.5") - 1x1 x4 plus identity (torchvision ``Bottleneck``)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(nn.Module):
    """torchvision-layout ResNet: conv1, bn1, relu, maxpool, layer1..layer4, avgpool, [dropout], fc."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        width: float = 1.0,
        small_stem: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        stem = scaled(64, width)
        if small_stem:
            self.conv1 = _conv3x3(in_channels, stem)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, stride=2, padding=1)
        self._cin = stem
        self.layer1 = self._make_layer(block, scaled(64, width), layers[0], 1)
        self.layer2 = self._make_layer(block, scaled(128, width), layers[1], 2)
        self.layer3 = self._make_layer(block, scaled(256, width), layers[2], 2)
        self.layer4 = self._make_layer(block, scaled(512, width), layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        if dropout > 0:
            self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self._cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._cin != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._cin, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self._cin, planes, stride, downsample)]
        self._cin = planes * block.expansion
        layers += [block(self._cin, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        if hasattr(self, "dropout"):
            x = self.dropout(x)
        return self.fc(x)


def resnet18(**options: object) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **options)


def resnet50(**options: object) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **options)
