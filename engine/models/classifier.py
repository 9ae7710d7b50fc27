"""Image classifiers that take [0,1] pixels: normalisation inside the model, a torchvision-compatible backbone.

``build_model(name, num_classes, **options)`` returns an :class:`ImageClassifier`: ``.normalize`` (mean/std
buffers) followed by ``.net`` (the backbone, whose ``state_dict`` has exactly torchvision's keys). The wrapper's
own ``state_dict`` prefixes the backbone keys with ``net.`` and adds ``normalize.mean``/``normalize.std``, so a
checkpoint is self-contained; :func:`load_torchvision_state_dict` loads a torchvision state_dict into ``.net``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from engine.errors import UserError, UserTypeError
from engine.models.resnet import resnet18, resnet50
from engine.models.vgg import vgg16, vgg16_bn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.449,)  # ImageNet's channel average, the default for 1-channel inputs
GRAY_STD = (0.226,)

_RESNET_OPTIONS = ("in_channels", "width", "small_stem", "dropout")
_VGG_OPTIONS = ("in_channels", "width", "hidden", "pool_size", "dropout")
ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "resnet18": (resnet18, _RESNET_OPTIONS),
    "resnet50": (resnet50, _RESNET_OPTIONS),
    "vgg16": (vgg16, _VGG_OPTIONS),
    "vgg16_bn": (vgg16_bn, _VGG_OPTIONS),
}
_WRAPPER_OPTIONS = ("mean", "std", "input_size")


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean and std stored as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != len(std):
            raise UserError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
        if not all(v > 0 for v in std):
            raise UserError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Wrapped(nn.Module):
    """A model whose backbone is ``.net``: layer names are relative to it (:func:`backbone`)."""

    net: nn.Module


class ImageClassifier(Wrapped):
    """``net(normalize(x))`` for x in [0,1]^(N,C,H,W); ``config`` rebuilds it with ``build_model(**config)``."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], config: dict[str, Any]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.config = dict(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(ARCHITECTURES)


def build_model(name: str, num_classes: int, **options: Any) -> ImageClassifier:
    """Build architecture ``name`` (see :func:`available_models`) with ``num_classes`` logits (2 for binary tasks).

    Options: ``in_channels`` (1 or 3), ``width`` (channel multiplier), ``dropout``, ``mean``/``std``
    (defaults: ImageNet's, or their channel average for 1 channel), ``input_size`` (recorded in ``config``);
    ResNets also ``small_stem``, VGGs ``hidden`` and ``pool_size``.
    """
    if name not in ARCHITECTURES:
        raise UserError(f"name must be one of {available_models()}, got {name!r}")
    factory, allowed = ARCHITECTURES[name]
    unknown = sorted(set(options) - set(allowed) - set(_WRAPPER_OPTIONS))
    if unknown:
        raise UserTypeError(f"unknown option(s) {unknown} for {name}; accepted: {sorted(allowed + _WRAPPER_OPTIONS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"num_classes must be an int >= 2 (binary tasks use 2 logits), got {num_classes!r}")
    in_channels = options.get("in_channels", 3)
    if in_channels not in (1, 3):
        raise UserError(f"in_channels must be 1 or 3, got {in_channels!r}")
    if not float(options.get("width", 1.0)) > 0:
        raise UserError(f"width must be > 0, got {options['width']!r}")
    if not 0.0 <= float(options.get("dropout", 0.0)) < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {options['dropout']!r}")
    mean = tuple(float(v) for v in options.get("mean", IMAGENET_MEAN if in_channels == 3 else GRAY_MEAN))
    std = tuple(float(v) for v in options.get("std", IMAGENET_STD if in_channels == 3 else GRAY_STD))
    if len(mean) != in_channels or len(std) != in_channels:
        raise UserError(f"mean and std need {in_channels} values (in_channels), got {len(mean)} and {len(std)}")
    net = factory(num_classes=num_classes, **{k: v for k, v in options.items() if k in allowed})
    config = {"name": name, "num_classes": num_classes, **options, "mean": list(mean), "std": list(std)}
    return ImageClassifier(net, mean, std, config)


def backbone(model: nn.Module) -> nn.Module:
    """The part layer names are relative to: ``model.net`` for an :class:`ImageClassifier` (the torchvision-compatible
    backbone) or another :class:`Wrapped` model, else ``model`` itself."""
    while isinstance(model, Wrapped):  # a ForeignModel may wrap an ImageClassifier
        model = model.net
    return model


def load_torchvision_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, skip_classifier: bool = False
) -> None:
    """Load a torchvision state_dict into ``backbone(model)`` with strict key checking.

    ``skip_classifier=True`` keeps the model's own final layer (``fc`` / ``classifier.6``), for fine-tuning from
    ImageNet weights with a different ``num_classes``; every other key must match. For a 1-channel model, RGB
    ``conv1``/``features.0`` weights are summed over their input channels (the grey image seen as R=G=B).
    """
    net = backbone(model)
    own = net.state_dict()
    state = dict(state_dict)
    if skip_classifier:
        head = "fc." if "fc.weight" in own else "classifier.6."
        for key in [k for k in own if k.startswith(head)]:
            state[key] = own[key]
    for key in ("conv1.weight", "features.0.weight"):
        if key in own and key in state and own[key].shape[1] == 1 and state[key].shape[1] == 3:
            state[key] = state[key].sum(dim=1, keepdim=True)
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        details = ", ".join(f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}" for k in mismatched)
        raise UserError(f"state_dict shapes do not match the model ({details})")
    net.load_state_dict(state, strict=True)


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The model's dropout layers (MC-dropout samples them)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def set_mc_dropout(model: nn.Module, enabled: bool = True) -> int:
    """Put every dropout layer in train mode (sampling) or eval mode; other layers keep their mode.

    Returns the number of dropout layers. ``model.eval()`` afterwards switches MC-dropout off again.
    """
    layers = dropout_modules(model)
    if enabled and not layers:
        raise UserError("MC-dropout needs a model with dropout layers; build it with dropout > 0 (e.g. 0.3)")
    for m in layers:
        m.train(enabled)
    return len(layers)


@contextlib.contextmanager
def mc_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """``with mc_dropout(model):`` runs the model in eval mode with dropout sampling, then restores all modes."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    set_mc_dropout(model, True)
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
