"""Logits plus hierarchical features of chosen layers in one forward pass (forward hooks, gradients kept).

Layer names are module names relative to the backbone (``model.net`` of an ImageClassifier, else the model):
``relu``, ``layer1.0.relu1``, ``layer1.0`` (block output), ``features.3``, ... :func:`available_layers` lists
every activation module (ReLU family) and every residual block; any other exact module name may be hooked too.
Patterns use shell globs (``fnmatch``, ``*`` also matches dots) against :func:`available_layers`.
"""

from __future__ import annotations

import fnmatch
import itertools
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from engine.errors import UserError, UserTypeError
from engine.models.classifier import backbone
from engine.models.onnx import Tap

# activation modules (nn.ReLU6 is an nn.Hardtanh); a converted graph taps the same activations (engine.models.onnx)
_ACTIVATIONS = (nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus)  # fmt: skip
LAYER_KINDS = ("all", "activations", "blocks")
STAGE_OUTPUTS = "stage_outputs"  # a layer selection (e.g. detector.maha.layers) meaning :func:`stage_outputs`
EARLY_STAGES = "early_stages"  # a layer selection (e.g. hfc.layers) meaning :func:`early_stages`
CONSTRAINED = "constrained"  # a detector layer selection: the layers HFC constrains (resolved by the run layer)
CALL_SEP = "@"  # ``relu@1``: the second call of a module that runs several times in one forward pass


@dataclass(frozen=True)
class FeaturePoint:
    """A layer: the output of ``module`` at its ``call``-th run in a forward pass (None: its only run)."""

    module: nn.Module
    call: int | None
    kinds: frozenset[str]


def _is_block(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("Block") or name.endswith("Bottleneck")


def _check_hookable(model: nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise UserTypeError("model is a TorchScript module, whose layers cannot be hooked; load it with load_model()")
    if not isinstance(model, nn.Module):
        raise UserTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


_CALLS: weakref.WeakKeyDictionary[nn.Module, Counter[str]] = weakref.WeakKeyDictionary()


def _call_counts(net: nn.Module) -> Counter[str]:
    """How often each submodule runs in one forward pass, from a symbolic trace (empty if it cannot be traced)."""
    if net not in _CALLS:
        try:
            graph = fx.symbolic_trace(net).graph
            _CALLS[net] = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
        except Exception:  # noqa: BLE001 - data-dependent control flow: every module is taken to run once
            _CALLS[net] = Counter()
    return _CALLS[net]


def feature_points(model: nn.Module) -> dict[str, FeaturePoint]:
    """Every activation output and residual-block output of ``model``, by layer name, in forward order.

    A converted graph (engine.models.onnx) lists its taps. Otherwise activation modules (ReLU family) and
    modules whose class name ends in ``Block``/``Bottleneck`` are listed by module name; a module that runs
    several times in one pass (torchvision's shared ``relu``) gives one layer per call, ``name@0``, ``name@1``...
    """
    _check_hookable(model)
    net = backbone(model)
    modules = [(name, m) for name, m in net.named_modules() if name]
    taps = [m for _, m in modules if isinstance(m, Tap)]
    if taps:
        return {tap.layer: FeaturePoint(tap, None, tap.kinds) for tap in taps}
    points: dict[str, FeaturePoint] = {}
    counts = None
    for name, module in modules:
        kinds = frozenset({"activations"} if isinstance(module, _ACTIVATIONS) else {"blocks"} if _is_block(module)
                          else set())  # fmt: skip
        if not kinds:
            continue
        counts = _call_counts(net) if counts is None else counts
        calls = counts.get(name, 1)
        for call in range(calls) if calls > 1 else [None]:
            points[name if call is None else f"{name}{CALL_SEP}{call}"] = FeaturePoint(module, call, kinds)
    return points


def available_layers(model: nn.Module, kind: str = "all") -> list[str]:
    """Activation outputs and/or residual-block outputs of ``model`` (``kind``), in forward order."""
    if kind not in LAYER_KINDS:
        raise UserError(f"kind must be one of {LAYER_KINDS}, got {kind!r}")
    return [name for name, point in feature_points(model).items() if kind == "all" or kind in point.kinds]


def resolve_layers(model: nn.Module, layers: str | Iterable[str] | None = None) -> list[str]:
    """Expand exact names and glob patterns to a duplicate-free list of layer names in forward order.

    ``None`` or ``"activations"`` means every activation output, ``"blocks"`` every residual block, ``"all"``
    both (:func:`available_layers`): selections that work on any architecture.
    """
    _check_hookable(model)
    if layers is None or layers in LAYER_KINDS:
        return available_layers(model, layers or "activations")
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise UserError(f"layers must be a non-empty name/pattern or list of them, got {layers!r}")
    order = _layer_order(model)
    listed = available_layers(model)
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern in order and pattern:
            chosen.add(pattern)
            continue
        matches = fnmatch.filter(listed, pattern)
        if not matches:
            raise UserError(f"layer {pattern!r} matches no module or available layer; available: {listed}")
        chosen.update(matches)
    return sorted(chosen, key=order.__getitem__)


def _layer_order(model: nn.Module) -> dict[str, int]:
    """Forward position of every layer name and module name (a module's call sites at its position)."""
    by_module: dict[int, list[str]] = {}
    for name, point in feature_points(model).items():
        by_module.setdefault(id(point.module), []).append(name)
    order: dict[str, int] = {}
    for name, module in backbone(model).named_modules():
        for point in by_module.get(id(module), []):
            order.setdefault(point, len(order))
        order.setdefault(name, len(order))
    return order


def _points(model: nn.Module, layers: Sequence[str]) -> dict[str, FeaturePoint]:
    """The feature point of each of ``layers`` (resolved names); any other module name is its single run."""
    points = feature_points(model)
    modules = dict(backbone(model).named_modules())
    return {name: points.get(name) or FeaturePoint(modules[name], None, frozenset()) for name in layers}


def spatial_layers(model: nn.Module, layers: Sequence[str], input_shape: Sequence[int]) -> list[str]:
    """The layers among ``layers`` whose outputs are (C, H, W) maps (not the flat vectors of a dense head)."""
    return [name for name, shape in layer_shapes(model, layers, input_shape).items() if len(shape) == 3]


def layer_shapes(model: nn.Module, layers: Sequence[str], input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of each of ``layers`` for one input of ``input_shape`` (C, H, W)."""
    extractor = FeatureExtractor(model, list(layers), pooled=False)
    try:
        return extractor.feature_dims(input_shape)
    finally:
        extractor.remove()


def stage_outputs(model: nn.Module, layers: Sequence[str], input_shape: Sequence[int]) -> list[str]:
    """The deepest of ``layers`` at each spatial resolution, in forward order: for a ResNet the stem and the last
    ReLU of every stage, for a VGG the last ReLU before each max-pool (Lee et al.'s choice of layers for MAHA).
    Resolutions come from one forward pass of a zero image of ``input_shape`` (C, H, W)."""
    shapes = layer_shapes(model, layers, input_shape)
    last: dict[tuple[int, ...], str] = {}
    for name, shape in shapes.items():
        last[tuple(shape[1:])] = name
    order = list(shapes)
    return sorted(set(last.values()), key=order.index)


def early_stages(model: nn.Module, layers: Sequence[str], input_shape: Sequence[int]) -> list[str]:
    """The layers among ``layers`` at every spatial resolution but the smallest, in forward order: for a ResNet the
    stem to the third stage, for a VGG every block but the last (the early and middle stages the HFC reference
    constrains, whose width rule leaves a ResNet-50's last stages free). A flat (dense) output counts as the
    smallest resolution."""
    shapes = layer_shapes(model, layers, input_shape)
    sizes = {name: (shape[1] * shape[2] if len(shape) == 3 else 0) for name, shape in shapes.items()}
    smallest = min(sizes.values())
    return [name for name in shapes if sizes[name] > smallest]


RAW_MAX_SIDE = 32  # raw maps wider than this are average-pooled to it (see cap_raw_map)


def cap_raw_map(feature: torch.Tensor) -> torch.Tensor:
    """A raw (N, C, H, W) map average-pooled to at most RAW_MAX_SIDE x RAW_MAX_SIDE; narrower maps as they are.
    Metzen et al.'s detector subnetworks sat on CIFAR-10's 32 x 32 maps; a 224 px model's early maps are 50 times
    larger, which would keep gigabytes of maps per image set and train each subnetwork on them."""
    if feature.dim() != 4 or max(feature.shape[-2:]) <= RAW_MAX_SIDE:
        return feature
    side = (min(feature.shape[-2], RAW_MAX_SIDE), min(feature.shape[-1], RAW_MAX_SIDE))
    return torch.nn.functional.adaptive_avg_pool2d(feature, side)


def pool_feature(feature: torch.Tensor) -> torch.Tensor:
    """Global average pool over every axis after the channel axis: (N,C,H,W) -> (N,C); (N,C) is returned as is."""
    return feature.flatten(2).mean(dim=2) if feature.dim() > 2 else feature


@torch.no_grad()
def extract_pooled(
    extractor: Callable[[torch.Tensor], tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
    batches: Iterable[torch.Tensor],
    raw_layers: Iterable[str] = (),
    name: str = "data",
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(logits, {layer: GAP (N, C)}, {layer: raw map (cap_raw_map)})`` over ``batches``, one forward pass per
    batch, on the CPU.

    ``extractor`` is a :class:`FeatureExtractor` or any callable ``x -> (logits, {layer: feature})``; features
    keep the model's dtype; raw maps are kept for ``raw_layers`` only. The caller sets eval mode. ``name`` is the
    argument the batches come from, for the error on empty data.
    """
    raw_layers = set(raw_layers)
    logits: list[torch.Tensor] = []
    pooled: dict[str, list[torch.Tensor]] = {}
    raw: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        out, feats = extractor(batch)
        logits.append(out.cpu())
        for name, f in feats.items():
            pooled.setdefault(name, []).append(pool_feature(f).cpu())
            if name in raw_layers:
                raw.setdefault(name, []).append(cap_raw_map(f).cpu().contiguous())
    if not logits:
        raise UserError(f"{name} is empty: no images to extract features from")
    missing = sorted(raw_layers - set(pooled))
    if missing:
        raise UserError(f"raw_layers {missing} are not among the extracted layers {list(pooled)}")
    return torch.cat(logits), {k: torch.cat(v) for k, v in pooled.items()}, {k: torch.cat(v) for k, v in raw.items()}


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the requested layer has run (see ``stop_after``)."""


class FeatureExtractor(nn.Module):
    """``forward(x) -> (logits, {layer: feature})`` in one pass of ``model``.

    ``layers``: exact module names and/or glob patterns (see :func:`resolve_layers`); default: every activation.

    ``pooled=True`` returns GAP features (N,C), ``False`` the raw maps (N,C,H,W); ``forward(x, pooled=...)``
    overrides it per call; ``raw_layers`` (some of ``layers``) stay maps even when pooled, average-pooled to at most
    RAW_MAX_SIDE (:func:`cap_raw_map`). Maps are pooled as they are produced, so a pass holds only the capped maps of
    ``raw_layers`` (all hooked maps of a 240 px VGG-16 are 60 MB per image). Features are not detached, so attacks
    can differentiate through them. The hooks only record while this extractor's forward runs; calling ``model``
    directly is unaffected. ``remove()`` detaches the hooks for good. A module that runs several times in one pass
    is hooked at the call each layer names (``relu@1``); a layer named without a call index whose module runs twice
    raises UserError. Pooled features are taken as the module returns, so an in-place operation later in the
    pass cannot change them.
    """

    def __init__(
        self, model: nn.Module, layers: str | Sequence[str] | None = None, pooled: bool = True,
        raw_layers: Iterable[str] = (),
    ) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.layers = resolve_layers(model, layers)
        self.pooled = pooled
        self.raw_layers = frozenset(raw_layers)
        unknown = sorted(self.raw_layers - set(self.layers))
        if unknown:
            raise UserError(f"raw_layers {unknown} are not among the extracted layers {self.layers}")
        self._store: dict[str, torch.Tensor] | None = None
        self._stop_after: str | None = None
        self._pool_now = pooled
        self._calls: Counter[nn.Module] = Counter()
        per_module: dict[nn.Module, dict[int | None, str]] = {}
        for name, point in _points(model, self.layers).items():
            per_module.setdefault(point.module, {})[point.call] = name
        self._handles = [m.register_forward_hook(self._hook(calls)) for m, calls in per_module.items()]

    def _hook(self, calls: Mapping[int | None, str]) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self._store is None:
                return
            call = self._calls[module]
            self._calls[module] += 1
            name = calls.get(call, calls.get(None))
            if name is None:
                return
            if name in self._store:
                raise UserError(
                    f"layer {name!r} ran twice in one forward pass (a reused module that could not be traced); "
                    f"name its calls {name}{CALL_SEP}0, {name}{CALL_SEP}1 ... or hook distinct modules"
                )
            if self._pool_now:
                output = cap_raw_map(output) if name in self.raw_layers else pool_feature(output)
            self._store[name] = output
            if name == self._stop_after:
                raise _StopForward

        return hook

    def forward(
        self, x: torch.Tensor, pooled: bool | None = None, stop_after: str | None = None
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        pooled = self.pooled if pooled is None else pooled
        if stop_after is not None and stop_after not in self.layers:
            raise UserError(f"stop_after must be one of the hooked layers {self.layers}, got {stop_after!r}")
        self._store, self._stop_after, self._pool_now = {}, stop_after, pooled
        self._calls.clear()
        logits = None
        try:
            logits = self.model(x)
        except _StopForward:
            pass
        finally:
            store, self._store, self._stop_after = self._store, None, None
        expected = self.layers if stop_after is None else [stop_after]
        missing = [name for name in expected if name not in store]
        if missing:
            raise UserError(f"layers {missing} did not run in the forward pass")
        names = self.layers if stop_after is None else [n for n in self.layers if n in store]
        return logits, {name: store[name] for name in names}

    def remove(self) -> None:
        """Remove the hooks from ``model``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def feature_dims(self, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """Per-layer feature shape (without batch) for inputs of shape ``input_shape`` = (C, H, W)."""
        tensor = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        device = tensor.device if tensor is not None else torch.device("cpu")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                _, feats = self(torch.zeros(1, *input_shape, device=device))
        finally:
            self.model.train(was_training)
        return {name: tuple(f.shape[1:]) for name, f in feats.items()}
