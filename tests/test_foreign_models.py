"""Users' own models: ONNX (written with onnx's helper API, or exported from torch), TorchScript, torchvision-style
modules with a shared in-place ReLU; their feature points, input conventions, clear errors; rare and absent
classes; the data users have (CSV, unlabelled folders); and an imported model audited end to end."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
import yaml
from foreign import image_folder, softmax_classifier
from onnx import TensorProto, helper
from torch import nn

from engine import audit
from engine.attacks import HFC, fit_hfc_gmms
from engine.cli import main
from engine.data import load_dataset
from engine.detectors import DNR, KD, Features
from engine.models import FeatureExtractor, available_layers, build_model, load_model

pytest.importorskip("onnx2fx")
COUNTS = {"absent": 0, "bright": 30, "dark": 30, "mid": 1}  # image_folder's class order (sorted folder names)


@pytest.fixture(scope="module")
def vendor(tmp_path_factory):
    """(data folder with an empty and a single-image class, NHWC softmax ONNX model fitted to such images)."""
    root = tmp_path_factory.mktemp("vendor")
    data = image_folder(root / "data", COUNTS)
    model = softmax_classifier(root / "vendor.onnx", {"absent": 0, "bright": 200, "dark": 200, "mid": 200})
    return data, model


def _export(module: nn.Module, path, shape=(1, 3, 32, 32)) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.rand(*shape),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})  # fmt: skip


def test_onnx_helper_model_nhwc_softmax_audited_end_to_end(vendor, tmp_path, caplog):
    data, model = vendor
    config = {
        "name": "byom",
        "output_dir": str(tmp_path),
        "datasets": [{"name": "image_folder", "path": str(data), "label": "clinic-slices"}],
        "model": {"checkpoint": str(model), "input": {"layout": "NHWC"}, "output": "probabilities", "name": "vendor"},
        "attacks": ["pgd"],
        "eps": ["48/256"],
        "attack": {"steps": 3, "pool": 30},
        "split": {"val": 0.2, "test": 0.4},
        "detectors": ["kd", "maha", "bu"],
        "studies": [],
    }
    (tmp_path / "byom.yaml").write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.WARNING):
        assert main(["run", str(tmp_path / "byom.yaml"), "--no-progress"]) == 0
    assert "'absent': no training image" in caplog.text and "'mid': 1 training image" in caplog.text
    assert "bu skipped: the model has no dropout layers" in caplog.text  # the converted graph has none
    rows = pd.read_csv(tmp_path / "byom" / "results.csv")
    assert set(rows["dataset"]) == {"clinic-slices"} and set(rows["model"]) == {"vendor"}
    assert rows.loc[rows["metric"] == "clean_accuracy", "value"].item() > 0.9
    assert rows.loc[rows["metric"] == "conversion_max_abs_diff", "value"].item() < 1e-4
    assert {"auroc", "attack_success_rate"} <= set(rows["metric"])
    assert rows.loc[rows["metric"] == "feature_loglik", "layer"].notna().any()
    card = json.loads((tmp_path / "byom" / "run_card.json").read_text())
    assert 0 < card["peak_rss_gib"] < 4
    (chosen, adaptive) = card["hfc_calibration"]  # the weights chosen on validation images, with their trials
    assert (chosen["variant"], adaptive["variant"]) == ("", "adaptive")
    assert chosen["attack"] == "pgd" and chosen["lam"] in [t["lam"] for t in chosen["trials"]]
    assert "Detectors not run" in (tmp_path / "byom" / "report.html").read_text()


def test_audit_labels_an_unlabelled_folder_with_the_model(vendor, tmp_path):
    data, model = vendor
    unlabelled = tmp_path / "scans"
    unlabelled.mkdir()
    for cls in ("bright", "dark"):
        for png in sorted((data / cls).glob("*.png")):
            (unlabelled / f"{cls}-{png.name}").write_bytes(png.read_bytes())
    dataset = load_dataset(f"image_folder:{unlabelled}")
    assert not dataset.labelled
    report = audit(str(model), dataset, input={"layout": "NHWC"}, output="probabilities", detectors=["maha"],
                   eps=["48/256"], attack={"steps": 3, "pool": 20}, run_dir=tmp_path / "audit")  # fmt: skip
    frame = report.frame()
    assert set(frame["dataset"]) == {"scans (labels: model predictions)"} and set(frame["model"]) == {"vendor"}
    assert ((frame["metric"] == "auroc") & (frame["subset"] == "all")).any()


def test_probabilities_become_logits_and_layers_are_onnx_nodes(vendor):
    _, path = vendor
    model = load_model(path, input={"layout": "NHWC"}, output="probabilities")
    assert model.meta["softmax_removed"] and model.meta["conversion"]["max_abs_diff"] < 1e-4
    assert available_layers(model) == ["stem/relu", "block/relu", "head/relu"]
    assert available_layers(model, "blocks") == ["block/relu"]
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    logits, feats = FeatureExtractor(model)(x)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"x": x.detach().permute(0, 2, 3, 1).numpy()})[0]
    assert np.allclose(torch.softmax(logits, 1).detach().numpy(), probabilities, atol=1e-6)
    assert feats["head/relu"].shape == (4, 8) and feats["stem/relu"].shape == (4, 8)
    grad = torch.autograd.grad(logits[:, 1].sum() + feats["block/relu"].sum(), x)[0]
    assert grad.abs().sum() > 0


def test_torch_exported_onnx_matches_the_module(tmp_path):
    module = build_model("resnet18", 3, width=0.125, dropout=0.2).eval()
    _export(module, tmp_path / "r18.onnx")
    model = load_model(tmp_path / "r18.onnx")
    x = torch.rand(5, 3, 32, 32, requires_grad=True)
    assert torch.allclose(model(x), module(x), atol=1e-4)
    assert model.name == "r18" and model.meta["conversion"]["reference"] == "onnxruntime"
    layers = available_layers(model)
    assert len(layers) == 17 and layers[0] == "net/relu/Relu" and "net/layer4/layer4.1/relu2/Relu" in layers
    logits, feats = FeatureExtractor(model, "net/layer4/*")(x)
    own = FeatureExtractor(module, "layer4.*.relu*")(x)[1]
    assert torch.allclose(feats["net/layer4/layer4.1/relu2/Relu"], own["layer4.1.relu2"], atol=1e-5)
    assert torch.autograd.grad(logits.sum(), x)[0].abs().sum() > 0


class _Block(nn.Module):
    """torchvision's BasicBlock: one in-place ReLU module applied twice."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class _TorchvisionStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(_Block(8), _Block(8))
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_shared_inplace_relu_gives_one_layer_per_call():
    torch.manual_seed(0)
    model = _TorchvisionStyle().eval()
    layers = available_layers(model, "activations")
    assert layers == ["relu", "layer1.0.relu@0", "layer1.0.relu@1", "layer1.1.relu@0", "layer1.1.relu@1"]
    assert available_layers(model, "blocks") == ["layer1.0", "layer1.1"]
    x = torch.rand(3, 3, 12, 12, requires_grad=True)
    logits, maps = FeatureExtractor(model, "activations", pooled=False)(x)
    block = model.layer1[0]
    stem = model.relu(model.bn1(model.conv1(x)))
    first = torch.relu(block.bn1(block.conv1(stem)))
    assert torch.allclose(maps["layer1.0.relu@0"], first, atol=1e-6)
    assert torch.allclose(maps["layer1.0.relu@1"], torch.relu(block.bn2(block.conv2(first)) + stem), atol=1e-6)
    _, pooled = FeatureExtractor(model)(x)
    for name in layers:  # gradients flow from every call site
        assert torch.autograd.grad(pooled[name].sum(), x, retain_graph=True)[0].abs().sum() > 0
    gmms = fit_hfc_gmms(model, (torch.rand(8, 3, 12, 12), torch.arange(8) % 2), "layer1.*@*", n_components=1)
    assert list(gmms) == layers[1:]
    loss = HFC(gmms, mode="loglik").loss(FeatureExtractor(model, list(gmms))(x)[1], torch.zeros(3, dtype=torch.long))
    assert torch.autograd.grad(loss.sum(), x)[0].abs().sum() > 0


@pytest.mark.parametrize("compile_with", ["trace", "script"])
def test_torchscript_models_are_converted(tmp_path, compile_with, capsys):
    torch.manual_seed(0)
    module = _TorchvisionStyle().eval()
    x = torch.rand(2, 3, 24, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script = torch.jit.trace(module, x) if compile_with == "trace" else torch.jit.script(module)
    script.save(str(tmp_path / "m.ts"))
    model = load_model(tmp_path / "m.ts", input={"size": [3, 24, 24]})
    assert model.meta["conversion"]["reference"] == "the TorchScript module"
    assert torch.allclose(model(x), module(x), atol=1e-4)
    assert len(available_layers(model, "activations")) == 5 and available_layers(model, "blocks")
    x.requires_grad_(True)
    _, feats = FeatureExtractor(model)(x)
    assert torch.autograd.grad(sum(f.sum() for f in feats.values()), x)[0].abs().sum() > 0
    assert main(["layers", "--model", str(tmp_path / "m.ts"), "--input-size", "3", "24", "24"]) == 0
    assert "5 layers" in capsys.readouterr().out


def test_clear_errors(vendor, tmp_path, capsys):
    _, path = vendor
    assert main(["layers", "--model", str(path)]) == 2  # declared NCHW, the graph takes NHWC
    assert "declare layout: NHWC" in capsys.readouterr().err
    node = helper.make_node("FancyNorm", ["x"], ["y"], name="vendor_norm", domain="")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "custom.onnx"))
    with pytest.raises(ValueError, match=r"ONNX op 'FancyNorm' at node 'vendor_norm' is not supported") as err:
        load_model(tmp_path / "custom.onnx")
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(ValueError, match="neither an ONNX file, a TorchScript file"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="tolerance 0"):
        load_model(path, input={"layout": "NHWC"}, parity_tolerance=0.0)
    model = load_model(path, input={"layout": "NHWC", "range": [0, 255]}, parity_tolerance=None)
    with pytest.raises(ValueError, match=r"takes \(C, H, W\) = \(3, 16, 16\)"):
        model(torch.rand(1, 3, 20, 20))
    with pytest.raises(ValueError, match="layout must be one of"):
        load_model(path, input={"layout": "CHWN"})
    with pytest.raises(ValueError, match="output must be one of"):
        load_model(path, output="scores")


def test_rare_and_absent_classes_degrade_gracefully(caplog):
    torch.manual_seed(0)
    model = build_model("resnet18", 4, width=0.125).eval()
    x, y = torch.rand(12, 3, 32, 32), torch.tensor([1] * 6 + [2] * 5 + [3])  # class 0 absent, class 3: one image
    with caplog.at_level(logging.WARNING):
        gmms = fit_hfc_gmms(model, (x, y), ["layer4.1.relu2"], n_components=2, reg_covar=1e-4)
    per_class = gmms["layer4.1.relu2"]
    assert [len(g.weights) for g in per_class] == [2, 2, 2, 1] and per_class[3].means.shape == (1, 64)
    assert "0: no training image" in caplog.text and "3: 1 training image(s)" in caplog.text
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 6)).astype(np.float32)
    labels = np.array([0] * 2 + [1] * 20 + [2] * 18)
    train = Features(logits=np.zeros((40, 3), np.float32), pooled={"f": feats}, labels=labels)
    clean = Features(logits=np.zeros((20, 3), np.float32), pooled={"f": feats[:20]})
    adv = Features(logits=np.zeros((20, 3), np.float32), pooled={"f": feats[:20] + 3})
    KD(layers=["f"]).fit(None, clean, adv, train=train)  # a class of 2 training images: no 1-NN bandwidth from it
    with caplog.at_level(logging.WARNING):
        DNR(layers=["f"]).fit(None, clean, adv, train=train)
    assert "dnr: fitted without classes {0: 2}" in caplog.text


def test_csv_datasets_and_kind_with_a_name(tmp_path, vendor):
    data, _ = vendor
    rows = ["path,label"] + [f"{p.relative_to(data)},{p.parent.name}" for p in sorted(data.glob("*/*.png"))]
    (data / "labels.csv").write_text("\n".join(rows))
    labelled = load_dataset(str(data / "labels.csv"))
    assert labelled.classes == ["bright", "dark", "mid"] and labelled.class_counts().tolist() == [30, 30, 1]
    (data / "paths.csv").write_text("\n".join(r.split(",")[0] for r in rows).replace("path", "file", 1))
    unlabelled = load_dataset({"kind": "image_csv", "path": str(data / "paths.csv"), "path_column": "file"})
    assert not unlabelled.labelled and len(unlabelled) == 61
    arrays = load_dataset({"kind": "arrays", "name": "my-scans", "images": np.zeros((2, 8, 8)), "labels": [0, 1]})
    assert arrays.name == "my-scans"
