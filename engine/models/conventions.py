"""A foreign model behind the engine's conventions: it takes [0, 1] NCHW pixels and returns logits.

A model trained elsewhere may take NHWC inputs, values in [0, 255], its own mean/std applied outside the graph,
a fixed input size, and may output probabilities or log-probabilities. :class:`InputConvention` declares that
(``model.input`` / ``model.output`` in a run config, ``input=`` / ``output=`` of ``load_model``) and
:class:`ForeignModel` applies it inside ``forward``, so attacks, budgets and clamping stay in [0, 1] pixel space
and always see logits: a probability output whose last graph node is a Softmax is read before that node (exact),
otherwise converted as ``log(max(p, tiny))``; log-probabilities are logits already.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from google.protobuf.message import DecodeError
from torch import fx, nn

from engine.errors import UserError, UserTypeError
from engine.models.classifier import Wrapped
from engine.models.onnx import Conversion, convert_onnx, convert_torchscript, onnx_input_dims, strip_softmax

LAYOUTS = ("NCHW", "NHWC")
OUTPUT_KINDS = ("logits", "probabilities", "log_probabilities")
FINGERPRINT_KEY = "fingerprint"  # ONNX metadata / converted model meta: the source model's fingerprint


def _weights_digest(module: nn.Module) -> str:
    """Hash (16 hex digits) of ``module``'s parameters and persistent buffers: dtypes, shapes and values in
    state_dict order, not their names (a wrapper's prefix or a TorchScript copy keeps the fingerprint)."""
    digest = hashlib.sha256()
    for value in module.state_dict().values():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A model's one fingerprint (what fitted detectors record): the source model's when ``model`` was converted
    from a file that carries one (an ONNX export's metadata, a TorchScript module's weights), else a hash (16 hex
    digits) of its weights: parameters and persistent buffers, dtypes, shapes and values in state_dict order."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, Mapping) and meta.get(FINGERPRINT_KEY):
        return str(meta[FINGERPRINT_KEY])
    return _weights_digest(model)


@dataclass(frozen=True)
class InputConvention:
    """What the wrapped model takes: ``layout``, value ``range`` (what [0, 1] pixels map to), ``mean``/``std`` in
    those units (None: none applied), ``size`` (C, H, W) it requires (None: any)."""

    layout: str = "NCHW"
    range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    size: tuple[int, int, int] | None = None

    @classmethod
    def parse(cls, value: InputConvention | Mapping[str, Any] | None, key: str = "input") -> InputConvention:
        """From a mapping (a config's ``model.input``); errors name ``<key>.<field>``."""
        if value is None or isinstance(value, InputConvention):
            return value or cls()
        if not isinstance(value, Mapping):
            raise UserTypeError(f"{key} must be a mapping of {[f.name for f in fields(cls)]}, got {value!r}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"{key} has unknown keys {unknown}; allowed: {[f.name for f in fields(cls)]}")
        layout = str(value.get("layout") or "NCHW").upper()
        if layout not in LAYOUTS:
            raise UserError(f"{key}.layout must be one of {LAYOUTS}, got {value.get('layout')!r}")
        low, high = _numbers(value.get("range") or (0.0, 1.0), f"{key}.range", length=2)
        if not high > low:
            raise UserError(f"{key}.range must be [low, high] with high > low, e.g. [0, 255], got {[low, high]}")
        mean, std = (_numbers(value[k], f"{key}.{k}") if value.get(k) is not None else None for k in ("mean", "std"))
        if (mean is None) != (std is None) or (mean and len(mean) != len(std)) or (std and min(std) <= 0):
            raise UserError(f"{key}.mean and {key}.std must be given together, of equal length, std > 0")
        size = value.get("size")
        if size is not None:
            size = tuple(int(v) for v in _numbers(size, f"{key}.size", length=3))
            if min(size) < 1:
                raise UserError(f"{key}.size must be (C, H, W) of positive integers, got {list(size)}")
        return cls(layout, (low, high), mean, std, size)


def _numbers(value: Any, key: str, length: int | None = None) -> tuple[float, ...]:
    items = [value] if isinstance(value, (int, float)) else value
    if (
        not isinstance(items, Sequence)
        or isinstance(items, str)
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)
        or (length is not None and len(items) != length)
        or not items
    ):
        raise UserError(f"{key} must be a list of {length or 'one or more'} numbers, got {value!r}")
    return tuple(float(v) for v in items)


def check_output(output: str, key: str = "output") -> str:
    if output not in OUTPUT_KINDS:
        raise UserError(f"{key} must be one of {OUTPUT_KINDS}, got {output!r}")
    return output


class ForeignModel(Wrapped):
    """``net`` behind :class:`InputConvention` ``convention``, returning logits whatever ``output`` it gives.

    ``name`` labels result rows; ``meta`` records the source and, for converted files, the conversion (converter,
    seconds, parity with the reference runtime).
    """

    def __init__(
        self, net: nn.Module, convention: InputConvention, output: str = "logits", name: str = "model",
        meta: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.net = net
        self.convention = convention
        self.output = check_output(output)
        self.name = name
        self.meta = dict(meta or {})
        low, high = convention.range
        self.register_buffer("low", torch.tensor(low), persistent=False)
        self.register_buffer("scale", torch.tensor(high - low), persistent=False)
        shape = (1, -1, 1, 1)
        mean, std = convention.mean or (0.0,), convention.std or (1.0,)
        self.register_buffer("mean", torch.tensor(mean).reshape(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.convention.size
        if size is not None and tuple(x.shape[1:]) != size:
            raise UserError(
                f"{self.name} takes (C, H, W) = {size} images, got {tuple(x.shape[1:])}: set the dataset's "
                "image_size / channels to match (or model.input.size if that is wrong)"
            )
        x = ((self.low + x * self.scale) - self.mean) / self.std
        if self.convention.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        out = self.net(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if self.output == "probabilities":
            return torch.log(out.clamp_min(torch.finfo(out.dtype).tiny))
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, convention={self.convention}, output={self.output!r}"


def onnx_model(
    path: Path, convention: InputConvention, output: str, tolerance: float | None, name: str | None = None
) -> ForeignModel:
    """Convert the ONNX file at ``path`` (checked against onnxruntime) behind ``convention``."""
    try:
        proto = onnx.load(str(path))
    except DecodeError as exc:
        raise UserError(f"{str(path)!r} is not a readable ONNX file (truncated or not ONNX: {exc})") from None
    input_name, dims = onnx_input_dims(proto)
    convention = _with_onnx_size(convention, input_name, dims, str(path))
    c, h, w = convention.size or (3, 224, 224)
    raw = (c, h, w) if convention.layout == "NCHW" else (h, w, c)
    shape = [dims[0] or 2, *[d or r for d, r in zip(dims[1:], raw, strict=True)]]
    low, high = convention.range
    probe = low + (high - low) * torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    graph, conversion = convert_onnx(proto, str(path), probe, tolerance)
    fingerprint = {p.key: p.value for p in proto.metadata_props}.get(FINGERPRINT_KEY)
    return _foreign(graph, convention, output, name or path.stem, conversion, fingerprint)


def _with_onnx_size(
    convention: InputConvention, input_name: str, dims: list[int | None], source: str
) -> InputConvention:
    """Check the declared layout against the graph input's static dims; take (C, H, W) from them if static."""
    if len(dims) != 4:
        raise UserError(f"{source}: input {input_name!r} has {len(dims)} dims; an image model takes 4 (N, C, H, W)")
    nchw, nhwc = dims[1:], [dims[3], dims[1], dims[2]]
    channels_first = dims[1] in (1, 3, 4) and dims[3] not in (1, 3, 4)
    channels_last = dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4)
    if (convention.layout == "NCHW" and channels_last) or (convention.layout == "NHWC" and channels_first):
        other = "NHWC" if convention.layout == "NCHW" else "NCHW"
        raise UserError(
            f"{source}: layout {convention.layout} declared, but input {input_name!r} has shape "
            f"{['N' if d is None else d for d in dims]} ({other}); declare layout: {other} (model.input.layout)"
        )
    static = nchw if convention.layout == "NCHW" else nhwc
    size = convention.size
    if size is not None and any(d not in (None, s) for d, s in zip(static, size, strict=True)):
        raise UserError(
            f"{source}: input {input_name!r} takes (C, H, W) = {tuple('any' if d is None else d for d in static)}, "
            f"not {convention.size}: resize the data (the dataset's image_size / channels) or fix model.input.size"
        )
    if convention.size is None and all(d is not None for d in static):
        return replace(convention, size=tuple(static))
    return convention


def torchscript_model(
    module: torch.jit.ScriptModule, source: str, convention: InputConvention, output: str,
    tolerance: float | None, name: str,
) -> ForeignModel:  # fmt: skip
    """Convert a TorchScript module (exported to ONNX in memory, checked against itself) behind ``convention``."""
    shape = None
    if convention.size is not None:
        c, h, w = convention.size
        shape = (c, h, w) if convention.layout == "NCHW" else (h, w, c)
    graph, conversion = convert_torchscript(module, source, shape, tolerance)
    return _foreign(graph, convention, output, name, conversion, model_fingerprint(module))


def _foreign(
    graph: fx.GraphModule, convention: InputConvention, output: str, name: str, conversion: Conversion,
    fingerprint: str | None = None,
) -> ForeignModel:  # fmt: skip
    """Wrap a converted graph; a probability output ending in a Softmax node is read before it (exact logits).
    ``fingerprint`` is the source model's (see :func:`model_fingerprint`)."""
    stripped = output == "probabilities" and strip_softmax(graph)
    meta = {"conversion": asdict(conversion), "output_declared": output, "softmax_removed": stripped}
    if fingerprint:
        meta[FINGERPRINT_KEY] = fingerprint
    return ForeignModel(graph, convention, "logits" if stripped else output, name, meta).eval()


def input_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """The (C, H, W) images ``model`` takes, where it records it (declared size, or an engine model's input_size)."""
    if isinstance(model, ForeignModel):
        return model.convention.size
    config = getattr(model, "config", None)
    size = config.get("input_size") if isinstance(config, dict) else None
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    return int(config.get("in_channels", 3)), int(h), int(w)
