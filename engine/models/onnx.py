"""Foreign model files as differentiable torch modules: ONNX through a converter, TorchScript through ONNX.

:func:`convert_onnx` turns an ONNX graph into a ``torch.fx.GraphModule`` with the ``onnx2fx`` converter (the
optional ``onnx`` extra; it needs no torchvision) and checks it against onnxruntime on the same inputs: the largest
absolute output difference is recorded, and above ``tolerance`` the load fails; :func:`certify_gradients` then
checks its input gradients against onnxruntime's central differences. Every activation (a single node, or one
exported as several: SiLU as Sigmoid+Mul, GELU as Erf/Div/Mul/Add...) and every block output (residual Add, DenseNet
concatenation) gets a :class:`Tap` module named after its ONNX node (``net/layer1/0/relu1/Relu``, ``.../act/Gelu``
or the name a user gave the node), so feature hooks find one distinct, stably named layer per call site.
:func:`convert_torchscript` exports a TorchScript module to ONNX in memory and converts it the same way, checked
(outputs and gradients) against the TorchScript module itself.
"""

from __future__ import annotations

import io
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from engine.errors import UserError

# single ONNX ops tapped as activations (ReLU6 exports as Clip)
ACTIVATION_OPS = (
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "HardSwish", "HardSigmoid", "Mish", "Swish", "Clip",
    "Sigmoid", "Tanh", "Softplus",
)  # fmt: skip
# elementwise ops an activation exported as several nodes is made of, and its nonlinear cores with the activation
# a product of two functions of the same input containing them is (x*Sigmoid(x) = Swish/SiLU, ...), in priority order
ELEMENTWISE_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Neg", "Sqrt", "Erf", "Tanh", "Sigmoid", "HardSigmoid",
                   "Softplus", "Relu", "Clip")  # fmt: skip
GATED_ACTIVATIONS = (("Erf", "Gelu"), ("Softplus", "Mish"), ("Tanh", "Gelu"), ("Sigmoid", "Swish"),
                     ("HardSigmoid", "HardSwish"), ("Clip", "HardSwish"), ("Relu", "HardSwish"))  # fmt: skip
TORCHSCRIPT_REFERENCE = "the TorchScript module"
# The gradient certificate at load (certify_gradients): random directions; onnxruntime's central-difference steps
# (per input value, relative to the probe's spread), tried in turn: 1e-4 suits piecewise-linear graphs (ReLU,
# max-pool: a larger step crosses kinks), 1e-2 smooth ones (GELU, LayerNorm, softmax: float32 rounding swamps a
# smaller step); the largest relative error accepted per reference (float32 differences of a deep ReLU net, VGG-16
# at 224 px, reach about 0.05-0.1; against TorchScript's autograd, the conversion through ONNX folds BatchNorm into
# the convolutions, and the rounding flips a few ReLUs at their kink: up to 0.008 on a small ResNet-18 with
# BatchNorm; a zero or detached gradient about 1, a single detached SiLU sigmoid 0.12).
GRADIENT_DIRECTIONS = 3
GRADIENT_STEPS = (1e-4, 1e-2)
GRADIENT_TOLERANCE = {"onnxruntime": 0.2, TORCHSCRIPT_REFERENCE: 0.05}
PROBE_SHAPES = ((3, 224, 224), (1, 224, 224))  # tried in turn when a TorchScript model's input shape is not declared


class Tap(nn.Identity):
    """A feature point of a converted graph: passes its input through; ``layer`` is its name, ``kinds`` say whether
    it is an activation output and/or a block output, ``op`` what it taps (an ONNX op such as ``Relu``, or the
    activation several nodes compute: ``Swish``, ``Gelu``, ``HardSwish``, ``Mish``)."""

    def __init__(self, layer: str, kinds: Sequence[str], op: str = "") -> None:
        super().__init__()
        self.layer = layer
        self.kinds = frozenset(kinds)
        self.op = op


@dataclass
class Conversion:
    """How a foreign model was converted: the converter, the seconds it took, the forward parity (largest absolute
    output difference from ``reference``) and the gradient certificate (relative error of the directional
    derivatives, and the seconds it took); a None tolerance records without refusing."""

    source: str
    converter: str
    seconds: float
    max_abs_diff: float
    tolerance: float | None
    reference: str
    gradient_rel_error: float | None = None
    gradient_tolerance: float | None = None
    gradient_seconds: float = 0.0


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


def _op(node: fx.Node) -> str | None:
    return node.meta.get("onnx_op_type")


def _constants(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose values do not depend on the graph input: initializers, ONNX Constants and ops on them only."""
    constant: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and all(a in constant for a in node.all_input_nodes)):
            constant.add(node)
    return constant


def _is_feature(node: fx.Node) -> bool:
    """A floating-point tensor with a channel axis (shapes known from a ShapeProp pass; without them: True)."""
    meta = node.meta.get("tensor_meta")
    return not isinstance(meta, TensorMetadata) or (meta.dtype.is_floating_point and len(meta.shape) >= 2)


def _fused_activations(graph: fx.Graph, constant: set[fx.Node]) -> dict[fx.Node, tuple[str, set[fx.Node]]]:
    """Activations exported as several elementwise nodes, ``{output node: (activation, its nodes)}``.

    An elementwise chain is followed back to the one computed tensor ``x`` it starts from (constants aside); a
    product of two functions of ``x`` whose chain holds a nonlinear core is a gated activation (``x*Sigmoid(x)``:
    Swish/SiLU; ``x*(1+Erf(x/sqrt2))``, ``x*(1+Tanh(...))``: GELU; ``x*HardSigmoid(x)``, ``x*Clip(x+3)``:
    HardSwish; ``x*Tanh(Softplus(x))``: Mish). Constant scalings right after it (GELU's 0.5, HardSwish's /6) are
    part of it; the product starts a new chain, so stacked activations stay distinct.
    """
    cores = {core for core, _ in GATED_ACTIVATIONS}
    start: dict[fx.Node, fx.Node] = {}  # chain node -> the computed tensor its chain starts from
    found: dict[fx.Node, frozenset[str]] = {}  # chain node -> the cores on its chain
    fused: dict[fx.Node, tuple[str, set[fx.Node]]] = {}
    for node in graph.nodes:
        if _op(node) not in ELEMENTWISE_OPS:
            continue
        inputs = [a for a in node.all_input_nodes if a not in constant]
        starts = {start.get(a, a) for a in inputs}
        if len(starts) != 1:
            continue
        x = starts.pop()
        chain = frozenset({_op(node)} & cores).union(*(found[a] for a in inputs if a in start))
        if _op(node) == "Mul" and len(inputs) == 2 and chain:
            activation = next(name for core, name in GATED_ACTIVATIONS if core in chain)
            fused[node] = (activation, _chain_back(node, x, start))
        else:
            start[node], found[node] = x, chain
    for product, (_, nodes) in list(fused.items()):
        end = product
        while len(end.users) == 1 and start.get(user := next(iter(end.users))) is product and not found[user]:
            end = user
            nodes.add(end)
        fused[end] = fused.pop(product)
    return fused


def _chain_back(node: fx.Node, x: fx.Node, start: Mapping[fx.Node, fx.Node]) -> set[fx.Node]:
    """``node`` and the nodes of its elementwise chain back to (not including) ``x``."""
    nodes, stack = {node}, [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if start.get(arg) is x and arg not in nodes:
                nodes.add(arg)
                stack.append(arg)
    return nodes


def _fused_name(end: fx.Node, activation: str) -> str:
    """A torch exporter's ``scope/Mul_1`` becomes ``scope/Gelu``; any other node name is kept."""
    scope, _, last = _layer_name(end).rpartition("/")
    if scope and re.fullmatch(rf"{_op(end)}(_\d+)?", last):
        return f"{scope}/{activation}"
    return _layer_name(end)


def _is_residual_add(node: fx.Node, constant: set[fx.Node]) -> bool:
    return _op(node) == "Add" and len([a for a in node.all_input_nodes if a not in constant]) == 2


def _dense_concats(graph: fx.Graph, constant: set[fx.Node]) -> list[fx.Node]:
    """Channel concatenations of feature maps (DenseNet, U-Net skips) whose inputs no other such concatenation
    takes all of: a dense block's output, not the growing inputs of its layers. Needs ShapeProp's shapes."""
    concats: dict[fx.Node, set[fx.Node]] = {}
    for node in graph.nodes:
        meta = node.meta.get("tensor_meta")
        if _op(node) != "Concat" or not isinstance(meta, TensorMetadata) or len(meta.shape) != 4:
            continue
        inputs = {a for a in node.all_input_nodes if a not in constant}
        if node.kwargs.get("dim", 0) % 4 == 1 and len(inputs) >= 2 and _is_feature(node):
            concats[node] = inputs
    return [node for node, inputs in concats.items()
            if not any(other is not node and inputs <= more for other, more in concats.items())]  # fmt: skip


def insert_taps(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Add a :class:`Tap` after every activation and block output; returns the module, recompiled.

    Activations are the :data:`ACTIVATION_OPS` nodes and the gated activations several nodes compute
    (:func:`_fused_activations`); blocks are residual Adds (an Add all of whose users belong to one activation marks
    that activation as the block output) and, when ShapeProp recorded shapes, DenseNet-style concatenations.
    """
    graph = graph_module.graph
    constant = _constants(graph)
    fused = _fused_activations(graph, constant)
    owner = {node: end for end, (_, nodes) in fused.items() for node in nodes}  # node -> its activation's tap
    ops: dict[fx.Node, str] = {end: activation for end, (activation, _) in fused.items()}
    for node in graph.nodes:
        if _op(node) in ACTIVATION_OPS and node not in owner:
            owner[node], ops[node] = node, str(_op(node))
    points = {node: {"activations"} for node in ops if _is_feature(node)}
    for node in graph.nodes:
        if _is_residual_add(node, constant) and _is_feature(node) and node not in owner:  # not GELU's x + c x^3
            users = {owner.get(user) for user in node.users}
            end = users.pop() if len(users) == 1 and None not in users else node
            points.setdefault(end, set()).add("blocks")
            ops.setdefault(end, "Add")
    for node in _dense_concats(graph, constant):
        points[node], ops[node] = {"blocks"}, "Concat"
    names: set[str] = set()
    for i, node in enumerate(n for n in graph.nodes if n in points):
        name = _fused_name(node, ops[node]) if node in fused else _layer_name(node)
        name = name if name not in names else f"{name}#{i}"
        names.add(name)
        target = f"tap{i}"
        graph_module.add_submodule(target, Tap(name, sorted(points[node]), ops[node]))
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


def _convert(model: onnx.ModelProto, source: str, probe: torch.Tensor) -> tuple[fx.GraphModule, float, torch.Tensor]:
    """The tapped module, the seconds the converter took, and its output on ``probe`` (from a ShapeProp pass, whose
    shapes the taps use)."""
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
        output = _first(ShapeProp(graph_module).propagate(probe))
    return insert_taps(graph_module), seconds, output


def convert_onnx(
    model: onnx.ModelProto, source: str, probe: torch.Tensor, tolerance: float | None = 1e-4
) -> tuple[fx.GraphModule, Conversion]:
    """Convert ``model`` and check it against onnxruntime on ``probe`` (the raw input the graph takes): outputs,
    then input gradients (:func:`certify_gradients` with onnxruntime's central differences)."""
    graph_module, seconds, converted = _convert(model, source, probe)
    run = _onnxruntime(model)
    outputs = run(probe)
    diff = float(np.max(np.abs(converted.numpy().astype(np.float64) - outputs)))
    conversion = Conversion(source, f"onnx2fx {_converter().__version__}", seconds, diff, tolerance, "onnxruntime")
    check_parity(conversion)
    references = [_central_differences(run, probe, outputs, step) for step in GRADIENT_STEPS]
    certify_gradients(conversion, graph_module, probe, references)
    return graph_module, conversion


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _onnxruntime(model: onnx.ModelProto) -> Callable[[torch.Tensor], np.ndarray]:
    """``x -> the graph's first output`` (float64) from an onnxruntime CPU session of ``model``."""
    import onnxruntime  # noqa: PLC0415 - a dependency, but slow to import; only needed at load

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0].astype(np.float64)


Derivatives = Callable[[torch.Tensor, list[torch.Tensor]], tuple[list[float], list[torch.Tensor], float]]


def certify_gradients(
    conversion: Conversion, module: nn.Module, probe: torch.Tensor, references: Sequence[Derivatives]
) -> None:
    """Compare ``module``'s input gradients with a reference runtime's; record the result in ``conversion`` and
    refuse beyond its tolerance (:func:`check_parity`).

    For :data:`GRADIENT_DIRECTIONS` seeded random unit directions v of the input space and one seeded random unit
    weighting w of the outputs, a reference ``(w, [v...])`` returns its derivatives of ``w . f(x)`` along each v
    and the directions it actually took (central differences move a float32 input, which rounds), and the
    smallest derivative it resolves. ``module``'s derivative along a direction is its autograd input gradient of
    ``w . f(x)`` (one backward pass, the one attacks use) dotted with it; the error is the norm of the differences
    over the norm of the reference's, or over its resolution when larger (a saturated model whose outputs do not
    move in float32 is not refused for rounding).
    ``references`` are tried in turn until one is within the tolerance; the smallest error is recorded.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    x = probe.detach().clone().requires_grad_(True)
    output = _first(module(x))
    weights = torch.randn(output.shape, generator=generator, dtype=output.dtype)
    weights = weights / weights.norm()
    gradient = _input_gradient((output * weights).sum(), x)
    directions = [torch.randn(probe.shape, generator=generator, dtype=probe.dtype) for _ in range(GRADIENT_DIRECTIONS)]
    directions = [v / v.norm() for v in directions]
    if conversion.tolerance is not None:
        conversion.gradient_tolerance = GRADIENT_TOLERANCE[conversion.reference]
    for reference in references:
        expected, taken, resolution = reference(weights, directions)
        ours = np.array([float((gradient.double() * v.double()).sum()) for v in taken])
        scale = max(float(np.linalg.norm(expected)), resolution * len(directions) ** 0.5)
        error = float(np.linalg.norm(ours - np.array(expected)))
        error = error / scale if scale > 0 else (0.0 if error == 0 else float("inf"))
        conversion.gradient_rel_error = min(error, conversion.gradient_rel_error or float("inf"))
        if conversion.gradient_tolerance is None or conversion.gradient_rel_error <= conversion.gradient_tolerance:
            break
    conversion.gradient_seconds = time.perf_counter() - started
    check_parity(conversion)


def _input_gradient(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d value / d x, zero where autograd finds no path (a graph detached from its input)."""
    if not value.requires_grad:
        return torch.zeros_like(x)
    (gradient,) = torch.autograd.grad(value, x, allow_unused=True)
    return torch.zeros_like(x) if gradient is None else gradient


def _central_differences(
    run: Callable[[torch.Tensor], np.ndarray], probe: torch.Tensor, outputs: np.ndarray, step: float
) -> Derivatives:
    """A reference for :func:`certify_gradients` from ``run`` (onnxruntime) by central differences in float32:
    each input value moves by ``step`` times the probe's spread (RMS); the direction taken is the difference of
    the two rounded inputs; the resolution is float32's epsilon times the weighted ``outputs`` (``run(probe)``)
    over the step."""
    step = step * float(probe.double().std()) * probe.numel() ** 0.5

    def derivatives(
        weights: torch.Tensor, directions: list[torch.Tensor]
    ) -> tuple[list[float], list[torch.Tensor], float]:
        w = weights.double().numpy()
        values, taken = [], []
        for direction in directions:
            plus, minus = probe + step * direction, probe - step * direction
            values.append(float((w * (run(plus) - run(minus))).sum()) / (2 * step))
            taken.append((plus.double() - minus.double()) / (2 * step))
        resolution = float(np.finfo(np.float32).eps * np.abs(w * outputs).sum()) / step
        return values, taken, resolution

    return derivatives


def _autograd(module: nn.Module, probe: torch.Tensor) -> Derivatives:
    """The reference for :func:`certify_gradients` from ``module``'s own autograd (the TorchScript module)."""

    def derivatives(
        weights: torch.Tensor, directions: list[torch.Tensor]
    ) -> tuple[list[float], list[torch.Tensor], float]:
        x = probe.detach().clone().requires_grad_(True)
        gradient = _input_gradient((_first(module(x)) * weights).sum(), x)
        return [float((gradient.double() * v.double()).sum()) for v in directions], directions, 0.0

    return derivatives


def check_parity(conversion: Conversion) -> None:
    """Raise when the converted model's outputs, or (when measured) its input gradients, differ from the
    reference's by more than their tolerances."""
    accept = "; pass parity_tolerance=None (model.parity_tolerance: null) to accept it"
    if conversion.tolerance is not None and not conversion.max_abs_diff <= conversion.tolerance:
        raise UserError(
            f"{conversion.source}: the converted model differs from {conversion.reference} by up to "
            f"{conversion.max_abs_diff:.3g} (tolerance {conversion.tolerance:g}){accept}"
        )
    error, tolerance = conversion.gradient_rel_error, conversion.gradient_tolerance
    if error is not None and tolerance is not None and not error <= tolerance:
        raise UserError(
            f"{conversion.source}: the converted model's input gradients differ from {conversion.reference}'s by "
            f"{error:.3g} relative (directional derivatives along {GRADIENT_DIRECTIONS} random directions; tolerance "
            f"{tolerance:g}): attacks on it would be misled and it would look robust{accept}"
        )


def convert_torchscript(
    module: torch.jit.ScriptModule, source: str, shape: Sequence[int] | None, tolerance: float | None = 1e-4
) -> tuple[fx.GraphModule, Conversion]:
    """Export ``module`` to ONNX in memory (batch, height and width dynamic) and convert it; outputs and input
    gradients (autograd) are checked against the TorchScript module on the probe input. ``shape`` (C, H, W) is the
    input it takes; when None, 3- then 1-channel 224 px inputs are tried."""
    module.eval()
    probe = _runnable_probe(module, source, shape)
    buffer = io.BytesIO()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch"}}
        torch.onnx.export(module, (probe,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes=axes)  # fmt: skip
    graph_module, _, converted = _convert(onnx.load_from_string(buffer.getvalue()), source, probe)
    with torch.no_grad():
        expected = _first(module(probe))
    diff = float((expected.double() - converted.double()).abs().max())
    seconds = time.perf_counter() - started
    converter = f"onnx2fx {_converter().__version__}"
    conversion = Conversion(source, converter, seconds, diff, tolerance, TORCHSCRIPT_REFERENCE)
    check_parity(conversion)
    certify_gradients(conversion, graph_module, probe, [_autograd(module, probe)])
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
