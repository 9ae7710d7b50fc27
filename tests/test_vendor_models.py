"""What vendors ship: EfficientNet-, ViT-, MobileNetV3- and DenseNet-like models exported to ONNX at opsets 13 and 17
and to TorchScript get the activation taps of the nn.Module path (SiLU, GELU, HardSwish exported as several nodes),
their features equal the module's, they are audited end to end; the gradient certificate refuses a conversion
whose backward is broken while its forward still matches."""

from __future__ import annotations

import copy
import re
import warnings
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from foreign import image_folder
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from vendor_models import ARCHITECTURES, MODULE_OPS, SIZE, bright_dark, export, fitted

import engine.models.onnx as onnx_import
from engine.errors import UserError
from engine.models import FeatureExtractor, feature_points, load_model
from engine.runs import execute, load_config

onnx2fx = pytest.importorskip("onnx2fx")
FORMATS = {"onnx13": 13, "onnx17": 17, "torchscript": None}
# block outputs of the converted graphs: residual Adds (a ViT block has two), a dense block's final concatenation
BLOCKS = {"efficientnet": ["Add", "Add"], "vit": ["Add"] * 4, "mobilenetv3": ["Add"], "densenet": ["Concat"] * 2}


@pytest.fixture(scope="module")
def vendor_files(tmp_path_factory):
    """{architecture: (fitted module, {format: file})}."""
    root = tmp_path_factory.mktemp("vendor_models")
    files = {}
    for name in ARCHITECTURES:
        module = fitted(name)
        paths = {fmt: export(module, root / f"{name}-{fmt}.{'ts' if opset is None else 'onnx'}", opset)
                 for fmt, opset in FORMATS.items()}  # fmt: skip
        files[name] = (module, paths)
    return files


def _activation_ops(model: nn.Module) -> list[str]:
    """The op of each activation layer: a converted graph's tap op, or the module path's module class as an op."""
    points = feature_points(model).values()
    return [p.module.op if isinstance(p.module, onnx_import.Tap) else MODULE_OPS[type(p.module)]
            for p in points if "activations" in p.kinds]  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_converted_models_get_the_module_paths_activations(vendor_files, name, fmt):
    module, paths = vendor_files[name]
    model = load_model(paths[fmt], input={"size": [3, SIZE, SIZE]})
    assert _activation_ops(model) == _activation_ops(module)
    points = feature_points(model)
    assert [p.module.op for p in points.values() if "blocks" in p.kinds] == BLOCKS[name]
    assert all(re.search(rf"/{p.module.op}(_\d+)?$", layer) for layer, p in points.items())  # exporter's scope + op
    conversion = model.meta["conversion"]
    assert conversion["max_abs_diff"] < 1e-4 and conversion["gradient_rel_error"] < conversion["gradient_tolerance"]
    x = bright_dark(4, seed=1)[0].requires_grad_(True)
    logits, taps = FeatureExtractor(model, "activations", pooled=False)(x)
    _, own = FeatureExtractor(module, "activations", pooled=False)(x)
    for (layer, tapped), expected in zip(taps.items(), own.values(), strict=True):  # same values at the same places
        assert torch.allclose(tapped, expected, atol=1e-5), layer
    assert torch.autograd.grad(logits[:, 0].sum() + sum(f.sum() for f in taps.values()), x)[0].abs().sum() > 0


def test_names_of_the_taps(vendor_files):
    efficientnet = load_model(vendor_files["efficientnet"][1]["onnx13"])
    assert list(feature_points(efficientnet))[:6] == [
        "stem_act/Swish", "blocks/blocks.0/expand_act/Swish", "blocks/blocks.0/depthwise_act/Swish",
        "blocks/blocks.0/se/act/Swish", "blocks/blocks.0/se/gate/Sigmoid", "blocks/blocks.0/Add",
    ]  # fmt: skip
    vit = load_model(vendor_files["vit"][1]["onnx17"])
    assert [n for n, p in feature_points(vit).items() if "activations" in p.kinds] == [
        "blocks/blocks.0/mlp/mlp.1/Gelu", "blocks/blocks.1/mlp/mlp.1/Gelu"]  # fmt: skip
    densenet = load_model(vendor_files["densenet"][1]["torchscript"], input={"size": [3, SIZE, SIZE]})
    assert [n for n, p in feature_points(densenet).items() if "blocks" in p.kinds] == [
        "block1/Concat", "block2/Concat"]  # fmt: skip


class _Zoo(nn.Module):
    """A 1x1 convolution before each activation module the engine taps."""

    ACTIVATIONS = (nn.LeakyReLU(0.1), nn.PReLU(), nn.ELU(), nn.Softplus(), nn.Tanh(), nn.Sigmoid(), nn.Hardsigmoid(),
                   nn.ReLU6(), nn.Mish(), nn.SELU(), nn.CELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish())

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[m for act in self.ACTIVATIONS for m in (nn.Conv2d(3, 3, 1), act)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean((2, 3))


@pytest.mark.parametrize("opset", [13, 17, None])
def test_every_activation_module_is_tapped(tmp_path, opset):
    torch.manual_seed(0)
    module = _Zoo().eval()
    model = load_model(export(module, tmp_path / f"zoo-{opset}", opset), input={"size": [3, SIZE, SIZE]})
    assert _activation_ops(model) == _activation_ops(module) and len(_activation_ops(module)) == 14
    x = torch.rand(3, 3, SIZE, SIZE)
    taps = FeatureExtractor(model, pooled=False)(x)[1].values()
    own = FeatureExtractor(module, pooled=False)(x)[1].values()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(taps, own, strict=True))


def _hand_written(path) -> None:
    """An ONNX graph written by hand (not torch's exporter): GELU as Hugging Face writes it, h-swish as
    x * Clip(x + 3, 0, 6) / 6, a swish with its product's inputs swapped, stacked on a second swish."""
    c = 4
    scalars = {"c_half": 0.5, "rsqrt2": 0.70710677, "one": 1.0, "three": 3.0, "zero": 0.0, "six": 6.0}
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars.items()]
    inits += [numpy_helper.from_array(np.random.default_rng(0).normal(0, 1, (c, 3, 1, 1)).astype(np.float32), "w")]
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w"], ["c"], name="conv"),
        node("Mul", ["c", "c_half"], ["h"], name="gelu_half"), node("Mul", ["c", "rsqrt2"], ["s"], name="gelu_scale"),
        node("Erf", ["s"], ["e"], name="gelu_erf"), node("Add", ["e", "one"], ["a"], name="gelu_add"),
        node("Mul", ["h", "a"], ["g"], name="gelu_out"),
        node("Add", ["g", "three"], ["t"], name="hswish_add"), node("Clip", ["t", "zero", "six"], ["k"], name="clip"),
        node("Mul", ["g", "k"], ["m"], name="hswish_mul"), node("Div", ["m", "six"], ["hs"], name="hswish_out"),
        node("Sigmoid", ["hs"], ["sg"], name="act/Sigmoid"), node("Mul", ["sg", "hs"], ["sw"], name="act/Mul_3"),
        node("Sigmoid", ["sw"], ["sg2"], name="swish2_sigmoid"), node("Mul", ["sw", "sg2"], ["y"], name="swish2"),
        node("GlobalAveragePool", ["y"], ["p"], name="gap"), node("Flatten", ["p"], ["logits"], name="flatten"),
    ]  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c])]
    graph = helper.make_graph(nodes, "hand", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_hand_written_activation_patterns(tmp_path):
    _hand_written(tmp_path / "hand.onnx")
    model = load_model(tmp_path / "hand.onnx")
    points = feature_points(model)
    assert {n: p.module.op for n, p in points.items()} == {
        "gelu_out": "Gelu", "hswish_out": "HardSwish", "act/Swish": "Swish", "swish2": "Swish"}  # fmt: skip
    x = torch.rand(2, 3, 8, 8)
    maps = FeatureExtractor(model, pooled=False)(x)[1]
    w = torch.tensor(np.random.default_rng(0).normal(0, 1, (4, 3, 1, 1)), dtype=torch.float32)
    gelu = nn.functional.gelu(nn.functional.conv2d(x, w))
    hswish = nn.functional.hardswish(gelu)
    expected = [gelu, hswish, nn.functional.silu(hswish), nn.functional.silu(nn.functional.silu(hswish))]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(maps.values(), expected, strict=True))


class _ZeroGradient(torch.autograd.Function):
    """The identity with a zero backward: a conversion whose forward matches but whose gradients vanish."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)


def _zero_gradient(x: torch.Tensor) -> torch.Tensor:
    return _ZeroGradient.apply(x)


def _broken_converter(op: str, breaker):
    """onnx2fx, but ``breaker`` is applied to the output of the first ``op`` node of every converted graph."""

    def convert(model):
        graph_module = onnx2fx.convert(model)
        node = next(n for n in graph_module.graph.nodes if n.meta.get("onnx_op_type") == op)
        with graph_module.graph.inserting_after(node):
            broken = graph_module.graph.call_function(breaker, (node,))
        node.replace_all_uses_with(broken, delete_user_cb=lambda user: user is not broken)
        graph_module.recompile()
        return graph_module

    return SimpleNamespace(convert=convert, is_supported=onnx2fx.is_supported, __version__=onnx2fx.__version__)


@pytest.mark.parametrize(
    ("fmt", "op", "breaker"),
    [
        ("onnx13", "Conv", _zero_gradient),  # every gradient zero
        ("torchscript", "Conv", _zero_gradient),
        ("onnx13", "Mul", torch.detach),  # the stem's SiLU output detached: no gradient reaches the input
        ("torchscript", "Sigmoid", torch.detach),  # SiLU's sigmoid detached: 12% off, within float32 differences'
    ],  # reach (0.2) but not autograd's (0.05)
)
def test_a_broken_backward_is_refused(vendor_files, monkeypatch, fmt, op, breaker):
    path = vendor_files["efficientnet"][1][fmt]
    monkeypatch.setattr(onnx_import, "_converter", lambda: _broken_converter(op, breaker))
    tolerance = onnx_import.GRADIENT_TOLERANCE["onnxruntime" if fmt == "onnx13" else "the TorchScript module"]
    with pytest.raises(UserError, match=rf"{path}: the converted model's input gradients differ .* by [0-9.]+ "
                                        rf"relative .*tolerance {tolerance:g}\)") as err:  # fmt: skip
        load_model(path, input={"size": [3, SIZE, SIZE]})
    assert "\n" not in str(err.value)
    model = load_model(path, input={"size": [3, SIZE, SIZE]}, parity_tolerance=None)  # recorded, not refused
    conversion = model.meta["conversion"]
    assert conversion["max_abs_diff"] < 1e-5 and conversion["gradient_rel_error"] > tolerance
    assert conversion["gradient_tolerance"] is None


def test_central_differences_match_float64_autograd(vendor_files):
    """onnxruntime's float32 central differences at each certificate step, against the module's float64 autograd."""
    module, paths = vendor_files["mobilenetv3"]
    proto = onnx.load(str(paths["onnx17"]))
    probe = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    weights, direction = torch.rand(2, 2), torch.randn(probe.shape)
    weights, direction = weights / weights.norm(), direction / direction.norm()
    x = probe.double().requires_grad_(True)
    (gradient,) = torch.autograd.grad((copy.deepcopy(module).double()(x) * weights.double()).sum(), x)
    run = onnx_import._onnxruntime(proto)
    step = onnx_import.GRADIENT_STEPS[0]  # a ReLU6 / HardSwish graph: the small step
    reference = onnx_import._central_differences(run, probe, run(probe), step)
    (value,), (taken,), resolution = reference(weights, [direction])
    assert 0 < resolution < abs(value)  # this derivative is resolved
    expected = float((gradient * taken).sum())
    assert value == pytest.approx(expected, rel=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_vendor_architectures_audited_end_to_end(vendor_files, tmp_path, name, fmt):
    data = image_folder(tmp_path / "data", {"bright": 24, "dark": 24})
    overrides = [
        f"output_dir={tmp_path}",
        f"datasets=[{{name: image_folder, path: '{data}', label: scans}}]",
        f"model.checkpoint='{vendor_files[name][1][fmt]}'",
        f"model.name={name}-{fmt}",
        "split={val: 0.25, test: 0.4}",
        "attacks=[pgd]",
        "eps=['96/256']",  # bright and dark images differ by 0.45 in mean
        "attack.steps=5",
        "attack.pool=24",
        "hfc.layers=activations",  # a ViT has one resolution: no early stages
        "hfc.n_components=1",
        "hfc.lam=0.1",
        "hfc.steps=3",
        "hfc.adaptive=false",
        "detectors=[kd, maha]",
        "detector.bootstrap=10",
        "studies=[]",
        "threads=1",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = execute(load_config(overrides=overrides), progress=False).frame()
    value = frame.set_index("metric")["value"].groupby(level=0).first()
    assert value["clean_accuracy"] > 0.9
    assert value["conversion_max_abs_diff"] < 1e-4 and value["conversion_gradient_rel_error"] < 0.2
    assert value["attack_success_rate"] > 0 and "auroc" in value.index
