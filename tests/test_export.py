"""ONNX export: parity with PyTorch (<= 1e-4) for logits and hooked features, dynamic batch, streaming inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from engine.export import FEATURE_PREFIX, OnnxModel, export_onnx
from engine.models import FeatureExtractor, build_model, save_checkpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("resnet18", 3, width=0.125, small_stem=True, dropout=0.3, input_size=32)
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(3):
            m(torch.rand(8, 3, 32, 32))
    return m.eval()


def test_logits_parity_dynamic_batch_and_streaming(tmp_path, model):
    images = torch.rand(11, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    path = export_onnx(model, tmp_path / "m.onnx", example=images)
    onnx_model = OnnxModel(path)
    assert onnx_model.output_names == ["logits"] and onnx_model.metadata["config"] == model.config
    with torch.no_grad():
        want = model(images).numpy()
    for batch_size in (1, 4, 11, 64):  # dynamic batch axis, uneven last batch
        got = onnx_model.predict(images.numpy(), batch_size=batch_size)
        assert got.shape == (11, 3) and np.max(np.abs(got - want)) <= 1e-4
    as_uint8 = (images * 255).round().to(torch.uint8)
    with torch.no_grad():
        want_uint8 = model(as_uint8.float() / 255).numpy()
    assert np.max(np.abs(onnx_model.predict(as_uint8.numpy(), batch_size=5) - want_uint8)) <= 1e-4
    dataset = TensorDataset(images, torch.zeros(11, dtype=torch.long))
    assert np.max(np.abs(onnx_model.predict(dataset, batch_size=3) - want)) <= 1e-4
    streamed = list(onnx_model.iter_batches(images[:5], batch_size=2))
    assert [s["logits"].shape[0] for s in streamed] == [2, 2, 1]
    assert not model.training  # export leaves the model's mode alone


@pytest.mark.parametrize("pooled", [True, False])
def test_feature_outputs_match_extractor(tmp_path, model, pooled):
    layers = ["relu", "layer2.*.relu1", "layer4.1"]
    path = export_onnx(model, tmp_path / "f.onnx", layers=layers, pooled=pooled, input_shape=(3, 32, 32))
    onnx_model = OnnxModel(path)
    names = ["relu", "layer2.0.relu1", "layer2.1.relu1", "layer4.1"]
    assert onnx_model.output_names == ["logits"] + [FEATURE_PREFIX + n for n in names]
    assert onnx_model.metadata["layers"] == names
    x = torch.rand(3, 3, 32, 32)
    extractor = FeatureExtractor(model, layers, pooled=pooled)
    with torch.no_grad():
        logits, feats = extractor(x)
    extractor.remove()
    out = onnx_model.run(x)
    assert np.max(np.abs(out["logits"] - logits.numpy())) <= 1e-4
    for name in names:
        assert out[FEATURE_PREFIX + name].shape == tuple(feats[name].shape)
        assert np.allclose(out[FEATURE_PREFIX + name], feats[name].numpy(), atol=1e-4, rtol=1e-5), name
    assert not any(m._forward_hooks for m in model.modules())  # export removed its hooks


def test_dynamo_exporter_and_other_architectures(tmp_path):
    vgg = build_model("vgg16_bn", 2, width=0.0625, pool_size=1, in_channels=1, input_size=32).eval()
    path = export_onnx(vgg, tmp_path / "v.onnx", layers="features.*", exporter="dynamo")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want = vgg(x).numpy()
    assert np.max(np.abs(OnnxModel(path).predict(x, batch_size=2) - want)) <= 1e-4


def test_export_from_checkpoint_and_torchscript(tmp_path, model):
    ckpt = save_checkpoint(tmp_path / "m.pt", model, {"classes": ["a", "b", "c"], "input_size": [3, 32, 32]})
    onnx_model = OnnxModel(export_onnx(ckpt, tmp_path / "c.onnx"))
    assert onnx_model.metadata["classes"] == ["a", "b", "c"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.max(np.abs(onnx_model.predict(x) - want)) <= 1e-4
    script = tmp_path / "m.ts"
    torch.jit.trace(model, x).save(str(script))
    got = OnnxModel(export_onnx(script, tmp_path / "s.onnx", input_shape=(3, 32, 32))).predict(x)
    assert np.max(np.abs(got - want)) <= 1e-4
    # TorchScript is converted on load (engine.models.onnx): its layers, named after ONNX nodes, export too
    layered = OnnxModel(export_onnx(script, tmp_path / "t.onnx", input_shape=(3, 32, 32), layers="*layer4*"))
    assert layered.metadata["layers"] and all("layer4" in name for name in layered.metadata["layers"])


def test_parity_failure_raises_and_writes_nothing(tmp_path, model, monkeypatch):
    import engine.export as export_mod

    real = export_mod.OnnxModel.run

    def corrupted(self, x, outputs=None):
        out = real(self, x, outputs)
        out["logits"] = out["logits"] + 1e-3
        return out

    monkeypatch.setattr(export_mod.OnnxModel, "run", corrupted)
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "bad.onnx", input_shape=(3, 32, 32))
    assert list(tmp_path.iterdir()) == []


def test_bad_input(tmp_path, model):
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, tmp_path / "x.onnx", exporter="tf")
    with pytest.raises(ValueError, match="input_shape"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    path = export_onnx(model, tmp_path / "ok.onnx")  # input size recorded in the model's config
    onnx_model = OnnxModel(path)
    with pytest.raises(ValueError, match="N,C,H,W"):
        onnx_model.run(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="not in the model"):
        onnx_model.run(np.zeros((1, 3, 32, 32), np.float32), outputs=["feature:relu"])
    with pytest.raises(ValueError, match="batch_size"):
        onnx_model.predict(np.zeros((1, 3, 32, 32), np.float32), batch_size=0)
    with pytest.raises(TypeError, match="Dataset"):
        onnx_model.predict([1, 2, 3])
    with pytest.raises(ValueError, match="not a file"):
        OnnxModel(tmp_path / "missing.onnx")
