"""Foreign model files as differentiable torch modules: ONNX through a converter, TorchScript through ONNX.

:func:`convert_onnx` turns an ONNX graph into a ``torch.fx.GraphModule`` with the ``onnx2fx`` converter (the
optional ``onnx`` extra; it needs no torchvision) and checks it against onnxruntime on the same inputs: the largest
absolute output difference is recorded, and above ``tolerance`` the load fails. Every activation node and every
residual block output of the graph gets a :class:`Tap` module named after its ONNX node (``net/layer1/0/relu1/Relu``
or the name a user gave the node), so feature hooks find one distinct, stably named layer per call site.
:func:`convert_torchscript` exports a TorchScript module to ONNX in memory and converts it the same way, checked
against the TorchScript module itself.
"""

from __future__ import annotations

import io
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx, nn

from engine.errors import UserError

ACTIVATION_OPS = ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "HardSwish", "Mish", "Clip")
PROBE_SHAPES = ((3, 224, 224), (1, 224, 224))  # tried in turn when a TorchScript model's input shape is not declared


class Tap(nn.Identity):
    """A feature point of a converted graph: passes its input through; ``layer`` is its name, ``kinds`` say whether
    it is an activation output and/or a residual block output."""

    def __init__(self, layer: str, kinds: Sequence[str]) -> None:
        super().__init__()
        self.layer = layer
        self.kinds = frozenset(kinds)


@dataclass
class Conversion:
    """How a foreign model was converted: the converter, the seconds it took and the parity check."""

    source: str
    converter: str
    seconds: float
    max_abs_diff: float
    tolerance: float | None
    reference: str


def _converter() -> Any:
    try:
        import onnx2fx  # noqa: PLC0415 - optional extra, imported when an ONNX or TorchScript model is loaded
    except ImportError:
        what = "loading ONNX or TorchScript models needs the onnx2fx converter"
        if sys.version_info < (3, 11):  # onnx2fx is published for Python >= 3.11 only: the onnx extra is empty here
            python = ".".join(map(str, sys.version_info[:2]))
            raise UserError(f"{what}, which needs Python >= 3.11 (this is Python {python})") from None
        raise UserError(f"{what}: pip install '.[onnx]' in an hfc-engine checkout (or pip install onnx2fx)") from None
    return onnx2fx


def _layer_name(node: fx.Node) -> str:
    return str(node.meta.get("onnx_name") or node.name).strip("/") or node.name


def _is_residual_add(node: fx.Node) -> bool:
    if node.meta.get("onnx_op_type") != "Add":
        return False
    computed = [a for a in node.args if isinstance(a, fx.Node) and a.op not in ("get_attr", "placeholder")]
    return len(computed) == 2


def insert_taps(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Add a :class:`Tap` after every activation node and residual-add block output (an Add whose only user is an
    activation marks that activation as the block output); returns the module, recompiled."""
    graph = graph_module.graph
    points: dict[fx.Node, set[str]] = {}
    for node in graph.nodes:
        if node.meta.get("onnx_op_type") in ACTIVATION_OPS:
            points.setdefault(node, set()).add("activations")
        if _is_residual_add(node):
            users = list(node.users)
            single = len(users) == 1 and users[0].meta.get("onnx_op_type") in ACTIVATION_OPS
            points.setdefault(users[0] if single else node, set()).add("blocks")
    names: set[str] = set()
    for i, node in enumerate(n for n in graph.nodes if n in points):
        name = _layer_name(node)
        name = name if name not in names else f"{name}#{i}"
        names.add(name)
        target = f"tap{i}"
        graph_module.add_submodule(target, Tap(name, sorted(points[node])))
        with graph.inserting_after(node):
            tap = graph.call_module(target, (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
    graph.lint()
    graph_module.recompile()
    return graph_module


def strip_softmax(graph_module: fx.GraphModule) -> bool:
    """If the graph's single output is a Softmax node, output its input (the logits) instead; True if done."""
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    result = output.args[0]
    result = result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result
    if not isinstance(result, fx.Node) or result.meta.get("onnx_op_type") != "Softmax":
        return False
    logits = result.args[0]
    output.args = (logits,) if not isinstance(output.args[0], (tuple, list)) else ((logits,),)
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return True


def _unsupported(model: onnx.ModelProto, source: str) -> str | None:
    """One line naming the first ONNX op the converter cannot handle and its node, or None."""
    converter = _converter()
    opsets = {o.domain or "": o.version for o in model.opset_import}
    for node in model.graph.node:
        domain = node.domain or ""
        if not converter.is_supported(node.op_type, domain, opsets.get(domain, opsets.get("", 1))):
            where = f"node {node.name!r}" if node.name else f"the node with outputs {list(node.output)}"
            return (
                f"{source}: ONNX op {node.op_type!r}{f' (domain {domain})' if domain else ''} at {where} is not "
                f"supported by the converter (onnx2fx {converter.__version__}); re-export the model without it"
            )
    return None


def onnx_input_dims(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """Name and dims (None where dynamic) of the graph's single image input."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"model must have one image input, the ONNX graph has {[i.name for i in inputs]}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def convert_onnx(
    model: onnx.ModelProto, source: str, probe: torch.Tensor, tolerance: float | None = 1e-4
) -> tuple[fx.GraphModule, Conversion]:
    """Convert ``model`` and compare it with onnxruntime on ``probe`` (the raw input the graph takes)."""
    problem = _unsupported(model, source)
    if problem:
        raise UserError(problem)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph_module = _converter().convert(model)
    seconds = time.perf_counter() - started
    graph_module.eval()
    with torch.no_grad():
        converted = graph_module(probe)
    reference = _onnxruntime_outputs(model, probe)
    diff = float(np.max(np.abs(_first(converted).numpy().astype(np.float64) - reference)))
    conversion = Conversion(source, f"onnx2fx {_converter().__version__}", seconds, diff, tolerance, "onnxruntime")
    check_parity(conversion)
    return insert_taps(graph_module), conversion


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _onnxruntime_outputs(model: onnx.ModelProto, probe: torch.Tensor) -> np.ndarray:
    import onnxruntime  # noqa: PLC0415 - a dependency, but slow to import; only needed at load

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: probe.numpy()})[0].astype(np.float64)


def check_parity(conversion: Conversion) -> None:
    """Raise when the converted model's outputs differ from the reference by more than the tolerance."""
    if conversion.tolerance is not None and not conversion.max_abs_diff <= conversion.tolerance:
        raise UserError(
            f"{conversion.source}: the converted model differs from {conversion.reference} by up to "
            f"{conversion.max_abs_diff:.3g} (tolerance {conversion.tolerance:g}); pass parity_tolerance= "
            "(model.parity_tolerance) to accept it"
        )


def convert_torchscript(
    module: torch.jit.ScriptModule, source: str, shape: Sequence[int] | None, tolerance: float | None = 1e-4
) -> tuple[fx.GraphModule, Conversion]:
    """Export ``module`` to ONNX in memory (batch, height and width dynamic) and convert it; parity is checked
    against the TorchScript module on the probe input. ``shape`` (C, H, W) is the input it takes; when None,
    3- then 1-channel 224 px inputs are tried."""
    module.eval()
    probe = _runnable_probe(module, source, shape)
    buffer = io.BytesIO()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch"}}
        torch.onnx.export(module, (probe,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes=axes)  # fmt: skip
    exported = onnx.load_from_string(buffer.getvalue())
    graph_module, conversion = convert_onnx(exported, source, probe, tolerance=None)
    with torch.no_grad():
        expected, converted = _first(module(probe)), _first(graph_module(probe))
    conversion.max_abs_diff = float((expected.double() - converted.double()).abs().max())
    conversion.seconds = time.perf_counter() - started
    conversion.reference, conversion.tolerance = "the TorchScript module", tolerance
    check_parity(conversion)
    return graph_module, conversion


def _runnable_probe(module: nn.Module, source: str, shape: Sequence[int] | None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    for candidate in [tuple(shape)] if shape else PROBE_SHAPES:
        probe = torch.rand(2, *candidate, generator=generator)
        try:
            with torch.no_grad():
                module(probe)
        except Exception as exc:  # noqa: BLE001 - any failure means "not this input shape"
            if shape:
                raise UserError(f"{source}: the model does not run on inputs of shape {tuple(shape)}: {exc}") from None
            continue
        return probe
    raise UserError(f"{source}: the model runs on none of the inputs {PROBE_SHAPES}; declare input_size (C, H, W)")


# -- graph surgery on a converted hfc-engine export (engine.export.converted_export) ------------------------------


def restore_dropout(graph: fx.GraphModule, names: Sequence[str], marks: Mapping[str, float]) -> fx.GraphModule:
    """Put dropout back into a converted graph whose outputs are ``names``: for each output named in ``marks``
    (output name -> dropout rate; the export marks a dropout layer's input as an output), insert ``nn.Dropout(rate)``
    after its node for every other user of that node; returns the graph, recompiled."""
    output = next(n for n in graph.graph.nodes if n.op == "output")
    for i, (name, node) in enumerate(zip(names, output.args[0], strict=True)):
        if name not in marks:
            continue
        target = f"restored_dropout{i}"
        graph.add_submodule(target, nn.Dropout(float(marks[name])))
        with graph.graph.inserting_after(node):
            drop = graph.graph.call_module(target, (node,))
        node.replace_all_uses_with(drop, delete_user_cb=lambda user, drop=drop: user not in (drop, output))
        if not drop.users:
            raise ValueError(f"{name}: nothing in the converted graph reads this dropout layer's output")
    graph.recompile()
    return graph


class FirstOutput(nn.Module):
    """A converted graph with several outputs returning only its first (the logits); ``meta`` as the model's."""

    def __init__(self, graph: fx.GraphModule, meta: Mapping[str, Any]) -> None:
        super().__init__()
        self.graph = graph
        self.meta = dict(meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)[0]
