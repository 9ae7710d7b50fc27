"""Packaging: the shipped presets run by name (from a checkout and from an installed layout), the extras and CI's
pins agree with each other, and the onnx2fx internals engine.models.onnx relies on still hold (so an upgrade fails
here, not in a user's audit)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from engine.commands import config_path, presets
from engine.errors import UserError

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PINS = {
    Requirement(line).name: Requirement(line)
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
}


def _requirements(extra: str | None = None) -> dict[str, Requirement]:
    lines = PYPROJECT["dependencies"] if extra is None else PYPROJECT["optional-dependencies"][extra]
    return {Requirement(line).name: Requirement(line) for line in lines}


def test_presets_are_the_shipped_configs_by_name():
    shipped = {p.stem: p for p in (ROOT / "configs").glob("*.yaml")}
    assert presets() == shipped and "paper" in shipped
    assert config_path("paper") == config_path("paper.yaml") == shipped["paper"]
    refusal = r"config 'papr' is neither a YAML file nor a preset; presets: \['clinical', 'full-grid'"
    with pytest.raises(UserError, match=refusal):
        config_path("papr")


def test_a_file_wins_over_a_preset_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "paper.yaml").write_text("name: mine\n")
    assert config_path("paper.yaml") == Path("paper.yaml")


@pytest.mark.slow
def test_presets_are_installed_with_the_package(tmp_path):
    """setup.py's build_py layout (what a wheel holds): configs/*.yaml become engine.presets, found by name."""
    build = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(build)], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    assert sorted(p.name for p in (build / "engine" / "presets").glob("*.yaml")) == sorted(
        p.name for p in (ROOT / "configs").glob("*.yaml")
    )
    code = "from engine.commands import config_path; print(config_path('paper'))"
    env = {**os.environ, "PYTHONPATH": str(build)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert Path(out.stdout.decode().strip()) == build / "engine" / "presets" / "paper.yaml"


def test_ci_pins_satisfy_the_declared_ranges_and_the_torch_floor_is_what_ci_installs():
    declared = {**_requirements(), **_requirements("dev")}
    for name, pin in PINS.items():
        (version,) = {Version(s.version) for s in pin.specifier}
        assert declared[name].specifier.contains(version), (name, str(declared[name].specifier), str(version))
    (floor,) = [Version(s.version) for s in _requirements()["torch"].specifier if s.operator == ">="]
    (pinned,) = [Version(s.version) for s in PINS["torch"].specifier]
    assert floor.release == pinned.release[: len(floor.release)]  # torch>=2.13 and CI's torch==2.13.0


def test_extras_are_consistent():
    dev = _requirements("dev")
    for extra in ("gpu", "ray", "onnx"):  # CI (the dev extra) installs every optional extra's packages, same ranges
        for name, requirement in _requirements(extra).items():
            assert str(dev[name]) == str(requirement), (extra, name)
    assert list(_requirements("ray")["ray"].specifier.filter(["2.10.0", "2.60.0", "3.0.0"])) == ["2.10.0", "2.60.0"]
    # onnxruntime is a dependency: onnxruntime-gpu in any extra would install the pair that loses the CUDA provider
    assert "onnxruntime" in _requirements()
    assert all("onnxruntime-gpu" not in _requirements(extra) for extra in PYPROJECT["optional-dependencies"])
    # the onnx extra installs onnx2fx only where onnx2fx is published (its Requires-Python), on the declared torch
    onnx2fx = _requirements("onnx")["onnx2fx"]
    assert onnx2fx.marker is not None and onnx2fx.marker.evaluate({"python_version": "3.11"})
    assert not onnx2fx.marker.evaluate({"python_version": "3.10"})


def test_the_onnx_extra_matches_onnx2fx_metadata():
    import importlib.metadata

    pytest.importorskip("onnx2fx")
    metadata = importlib.metadata.metadata("onnx2fx")
    assert metadata["Requires-Python"] == ">=3.11"  # the onnx extra's marker
    needs = {Requirement(r).name: Requirement(r) for r in metadata.get_all("Requires-Dist")}
    (torch_floor,) = [Version(s.version) for s in _requirements()["torch"].specifier]
    assert needs["torch"].specifier.contains(torch_floor)  # our torch floor is one onnx2fx accepts


def _tiny_onnx():
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="block/relu"),
        helper.make_node("Add", ["r", "x"], ["a"], name="block/add"),
        helper.make_node("Mul", ["a", "w"], ["m"], name="scale"),
        helper.make_node("Softmax", ["m"], ["y"], name="head/softmax"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx2fx_contract():
    """What engine.models.onnx reads from onnx2fx: is_supported(op_type, domain, opset) positionally, __version__,
    convert(ModelProto) -> fx.GraphModule whose nodes carry meta 'onnx_op_type' and 'onnx_name' (the ONNX node's
    op and name), graph inputs as placeholders and initializers as get_attr nodes (taps and residual adds)."""
    onnx2fx = pytest.importorskip("onnx2fx")
    import torch
    from torch import fx

    assert isinstance(onnx2fx.__version__, str)
    parameters = list(inspect.signature(onnx2fx.is_supported).parameters.values())
    assert [p.name for p in parameters[:3]] == ["op_type", "domain", "opset_version"]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters[:3])
    assert onnx2fx.is_supported("Relu", "", 17) and not onnx2fx.is_supported("NoSuchOp", "", 17)

    module = onnx2fx.convert(_tiny_onnx())
    assert isinstance(module, fx.GraphModule)
    nodes = {n.meta.get("onnx_name"): n for n in module.graph.nodes if n.op != "output"}
    assert {name: n.meta["onnx_op_type"] for name, n in nodes.items() if n.op == "call_function"} == {
        "block/relu": "Relu", "block/add": "Add", "scale": "Mul", "head/softmax": "Softmax",
    }  # fmt: skip
    assert nodes["x"].op == "placeholder" and nodes["w"].op == "get_attr"
    assert nodes["block/add"].args == (nodes["block/relu"], nodes["x"])
    assert nodes["head/softmax"].args[0] is nodes["scale"]
    x = torch.tensor([[-1.0, 0.5, 2.0, -3.0]])
    expected = torch.softmax((x.clamp(min=0) + x) * torch.tensor([1.0, 2.0, 3.0, 4.0]), dim=-1)
    torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize(
    ("version", "message"),
    [((3, 10, 14), r"needs the onnx2fx converter, which needs Python >= 3.11 \(this is Python 3.10\)$"),
     ((3, 11, 7), r"needs the onnx2fx converter: pip install '\.\[onnx\]' in an hfc-engine checkout")],
)  # fmt: skip
def test_a_missing_converter_says_what_to_do(version, message, monkeypatch):
    from engine.models.onnx import _converter

    monkeypatch.setitem(sys.modules, "onnx2fx", None)  # as if not installed
    monkeypatch.setattr(sys, "version_info", version)
    with pytest.raises(UserError, match=message):
        _converter()


def test_a_gpu_without_the_cuda_provider_warns(monkeypatch):
    import onnxruntime
    import torch

    from engine.export import default_providers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.warns(RuntimeWarning, match="no CUDA provider .* pip install onnxruntime-gpu"):
        assert default_providers() == ["CPUExecutionProvider"]
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: both)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the provider is there
        assert default_providers() == both
