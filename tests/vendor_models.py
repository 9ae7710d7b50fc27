"""Builders for tests/test_vendor_models.py: tiny versions of the architectures vendors ship (EfficientNet, ViT,
MobileNetV3, DenseNet), fitted to bright-vs-dark images in a few steps, and their ONNX / TorchScript exports."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

SIZE = 16
# the op a converted graph's tap reports for each activation module of the nn.Module path
MODULE_OPS = {
    nn.ReLU: "Relu", nn.ReLU6: "Clip", nn.LeakyReLU: "LeakyRelu", nn.PReLU: "PRelu", nn.ELU: "Elu", nn.SELU: "Selu",
    nn.CELU: "Celu", nn.GELU: "Gelu", nn.SiLU: "Swish", nn.Mish: "Mish", nn.Hardswish: "HardSwish",
    nn.Hardsigmoid: "HardSigmoid", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.Softplus: "Softplus",
}  # fmt: skip


def conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out))  # fmt: skip


class SqueezeExcite(nn.Module):
    """x * gate(fc2(act(fc1(mean(x))))): EfficientNet's (SiLU, Sigmoid) or MobileNetV3's (ReLU, Hardsigmoid)."""

    def __init__(self, channels: int, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.fc1, self.act = nn.Conv2d(channels, max(channels // 4, 2), 1), act()
        self.fc2, self.gate = nn.Conv2d(max(channels // 4, 2), channels, 1), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise 3x3, squeeze-excite, linear 1x1 projection (+ x if shapes keep)."""

    def __init__(self, c_in: int, c_out: int, stride: int, act: type[nn.Module], se: tuple[type, type]) -> None:
        super().__init__()
        hidden = 2 * c_in
        self.expand, self.expand_act = conv_bn(c_in, hidden), act()
        self.depthwise, self.depthwise_act = conv_bn(hidden, hidden, 3, stride, groups=hidden), act()
        self.se = SqueezeExcite(hidden, *se)
        self.project = conv_bn(hidden, c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise_act(self.depthwise(self.expand_act(self.expand(x))))))
        return x + out if self.residual else out


class EfficientNetLike(nn.Module):
    """SiLU everywhere, squeeze-excite with a Sigmoid gate."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        se = (nn.SiLU, nn.Sigmoid)
        self.stem, self.stem_act = conv_bn(3, 8, 3, 2), nn.SiLU()
        self.blocks = nn.Sequential(MBConvBlock(8, 8, 1, nn.SiLU, se), MBConvBlock(8, 16, 2, nn.SiLU, se),
                                    MBConvBlock(16, 16, 1, nn.SiLU, se))  # fmt: skip
        self.head, self.head_act = conv_bn(16, 32), nn.SiLU()
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_act(self.head(self.blocks(self.stem_act(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class MobileNetV3Like(nn.Module):
    """HardSwish and ReLU6 activations, squeeze-excite with ReLU and a HardSigmoid gate, a HardSwish in the head."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        se = (nn.ReLU, nn.Hardsigmoid)
        self.stem, self.stem_act = conv_bn(3, 8, 3, 2), nn.Hardswish()
        self.blocks = nn.Sequential(MBConvBlock(8, 8, 1, nn.ReLU6, se), MBConvBlock(8, 16, 2, nn.Hardswish, se))
        self.head, self.head_act = conv_bn(16, 32), nn.Hardswish()
        self.fc1, self.fc_act, self.fc2 = nn.Linear(32, 32), nn.Hardswish(), nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_act(self.head(self.blocks(self.stem_act(self.stem(x)))))
        return self.fc2(self.fc_act(self.fc1(x.mean((2, 3)))))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)) with a GELU."""

    def __init__(self, dim: int, approximate: str) -> None:
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(dim), Attention(dim, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate=approximate), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTLike(nn.Module):
    """4x4 patches, a class token, two encoder blocks (GELU in its erf form, then its tanh form)."""

    def __init__(self, classes: int = 2, dim: int = 16) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, (SIZE // 4) ** 2 + 1, dim))
        self.blocks = nn.Sequential(EncoderBlock(dim, "none"), EncoderBlock(dim, "tanh"))
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.position
        return self.fc(self.norm(self.blocks(tokens))[:, 0])


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.relu1, self.conv1 = nn.BatchNorm2d(c_in), nn.ReLU(), nn.Conv2d(c_in, 2 * growth, 1)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.Module):
    """torchvision's dense block: each layer reads the concatenation of all earlier outputs; returns all of them."""

    def __init__(self, c_in: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(c_in + i * growth, growth) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNetLike(nn.Module):
    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.stem, self.stem_relu = conv_bn(3, 8, 3, 2), nn.ReLU()
        self.block1 = DenseBlock(8, 4, 3)
        self.transition = nn.Sequential(nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 10, 1), nn.AvgPool2d(2))
        self.block2 = DenseBlock(10, 4, 2)
        self.norm, self.relu = nn.BatchNorm2d(18), nn.ReLU()
        self.fc = nn.Linear(18, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem_relu(self.stem(x)))))
        return self.fc(self.relu(self.norm(x)).mean((2, 3)))


ARCHITECTURES = {"efficientnet": EfficientNetLike, "vit": ViTLike, "mobilenetv3": MobileNetV3Like,
                 "densenet": DenseNetLike}  # fmt: skip


def bright_dark(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy 16 px RGB images in [0, 1] like tests/foreign.py's image folders: bright (label 0, mean 0.7) or
    dark (label 1, mean 0.25), the folders' sorted class order."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.normal(np.where(labels, 0.25, 0.7)[:, None, None, None], 30 / 255, (n, 3, SIZE, SIZE))
    return torch.tensor(np.clip(images, 0, 1), dtype=torch.float32), torch.tensor(labels)


def fitted(name: str, steps: int = 40) -> nn.Module:
    """Architecture ``name`` (seeded) after ``steps`` full-batch Adam steps on :func:`bright_dark` images; eval mode."""
    torch.manual_seed(0)
    model = ARCHITECTURES[name]()
    x, y = bright_dark(64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def export(model: nn.Module, path: Path, opset: int | None = None) -> Path:
    """ONNX (``opset`` given; dynamic batch) or TorchScript (traced; ``opset`` None) file of ``model`` at ``path``."""
    x = torch.rand(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if opset is None:
            torch.jit.trace(model, x).save(str(path))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                              dynamic_axes={"x": {0: "n"}})  # fmt: skip
    return path
