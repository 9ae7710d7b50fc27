"""FeatureExtractor: one forward pass, hooked values equal a manual forward, naming/patterns, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError
from engine.models import (
    RAW_MAX_SIDE,
    FeatureExtractor,
    available_layers,
    build_model,
    cap_raw_map,
    extract_pooled,
    pool_feature,
    resolve_layers,
)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = build_model("resnet18", 3, width=0.125, small_stem=True).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def manual_resnet_forward(model, x):
    """Every ReLU output of a (BasicBlock) ImageClassifier, recomputed with functional ops."""
    net, out = model.net, {}
    h = (x - model.normalize.mean) / model.normalize.std
    h = out["relu"] = F.relu(net.bn1(net.conv1(h)))
    h = net.maxpool(h)
    for stage in range(1, 5):
        for b, block in enumerate(getattr(net, f"layer{stage}")):
            p = f"layer{stage}.{b}"
            identity = h if block.downsample is None else block.downsample(h)
            mid = out[f"{p}.relu1"] = F.relu(block.bn1(block.conv1(h)))
            h = out[f"{p}.relu2"] = out[p] = F.relu(block.bn2(block.conv2(mid)) + identity)
    logits = net.fc(torch.flatten(net.avgpool(h), 1))
    return logits, out


def test_naming_scheme(resnet):
    layers = available_layers(resnet)
    assert layers[:4] == ["relu", "layer1.0", "layer1.0.relu1", "layer1.0.relu2"]
    assert len(available_layers(resnet, "activations")) == 1 + 8 * 2
    assert available_layers(resnet, "blocks") == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    bottleneck = build_model("resnet50", 2, width=0.0625)
    assert "layer3.5.relu3" in available_layers(bottleneck) and len(available_layers(bottleneck, "activations")) == 49
    vgg = available_layers(build_model("vgg16", 2, width=0.0625, pool_size=1), "activations")
    assert vgg == [f"features.{i}" for i in (1, 3, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27, 29)] + [
        "classifier.1",
        "classifier.4",
    ]
    with pytest.raises(ValueError, match="kind"):
        available_layers(resnet, "convs")


def test_pattern_addressing(resnet):
    assert resolve_layers(resnet, "layer2.*.relu1") == ["layer2.0.relu1", "layer2.1.relu1"]
    assert resolve_layers(resnet, ["layer4.1", "relu", "layer4.1"]) == ["relu", "layer4.1"]  # order, no duplicates
    assert resolve_layers(resnet, "*relu*") == available_layers(resnet, "activations")
    assert resolve_layers(resnet, "layer1.0.conv1") == ["layer1.0.conv1"]  # any exact module name
    assert resolve_layers(resnet, None) == available_layers(resnet, "activations")
    with pytest.raises(ValueError, match="matches no module"):
        resolve_layers(resnet, "layer*.relu")  # block ReLUs are relu1/relu2
    with pytest.raises(ValueError, match="non-empty"):
        resolve_layers(resnet, [])


def test_features_equal_manual_forward_in_one_pass(resnet):
    x = torch.rand(3, 3, 32, 32)
    calls = []
    handle = resnet.register_forward_pre_hook(lambda m, i: calls.append(1))
    extractor = FeatureExtractor(resnet, "*")
    try:
        logits, raw = extractor(x, pooled=False)
        assert len(calls) == 1
        _, pooled = extractor(x)
        assert len(calls) == 2
    finally:
        handle.remove()
        extractor.remove()
    ref_logits, ref = manual_resnet_forward(resnet, x)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert list(raw) == available_layers(resnet) and set(raw) == set(ref)
    for name, value in ref.items():
        assert raw[name].shape == value.shape
        assert torch.allclose(raw[name], value, atol=1e-5), name
        assert torch.allclose(pooled[name], value.mean(dim=(2, 3)), atol=1e-5), name
    assert torch.equal(resnet(x), logits)  # hooks removed, model unchanged


def test_hooks_idle_outside_extractor_and_removable(resnet):
    extractor = FeatureExtractor(resnet, ["layer1.0"])
    x = torch.rand(1, 3, 32, 32)
    resnet(x)  # plain calls record nothing
    assert extractor._store is None
    extractor.remove()
    assert all(not m._forward_hooks for m in resnet.modules())


def test_gradients_flow_to_input_through_features(resnet):
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    model64 = build_model("resnet18", 3, width=0.125, small_stem=True).double().eval()
    model64.load_state_dict(resnet.state_dict())
    extractor = FeatureExtractor(model64, ["layer2.0.relu1", "layer3.1"])
    _, feats = extractor(x)
    weights = torch.randn(feats["layer3.1"].shape, dtype=torch.float64)
    loss = feats["layer2.0.relu1"].pow(2).sum() + (weights * feats["layer3.1"]).sum()
    (grad,) = torch.autograd.grad(loss, x)
    _, ref = manual_resnet_forward(model64, x)
    ref_loss = ref["layer2.0.relu1"].mean(dim=(2, 3)).pow(2).sum() + (weights * ref["layer3.1"].mean(dim=(2, 3))).sum()
    (ref_grad,) = torch.autograd.grad(ref_loss, x)
    assert grad.abs().sum() > 0
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)
    extractor.remove()


def test_vgg_features_and_feature_dims():
    model = build_model("vgg16_bn", 2, width=0.0625, pool_size=1, in_channels=1).eval()
    extractor = FeatureExtractor(model, ["features.2", "classifier.1"])
    dims = extractor.feature_dims((1, 32, 32))
    assert dims == {"features.2": (4,), "classifier.1": (256,)}
    logits, raw = extractor(torch.rand(1, 1, 32, 32), pooled=False)
    assert raw["features.2"].shape == (1, 4, 32, 32) and raw["classifier.1"].shape == (1, 256)
    assert logits.shape == (1, 2)


def test_user_module_and_reused_module_errors():
    relu = nn.ReLU()
    reused = nn.Sequential(nn.Conv2d(1, 2, 3), relu, nn.Conv2d(2, 2, 3), relu, nn.Flatten(), nn.LazyLinear(2))
    reused(torch.rand(1, 1, 8, 8))  # materialise the lazy layer
    assert available_layers(reused) == ["1@0", "1@1"]  # one layer per call of a reused module
    _, feats = FeatureExtractor(reused, "1@*")(torch.rand(1, 1, 8, 8))
    assert feats["1@0"].shape == feats["1@1"].shape == (1, 2) and not torch.equal(feats["1@0"], feats["1@1"])
    with pytest.raises(UserError, match="ran twice"):  # its module name alone means one call
        FeatureExtractor(reused, "1")(torch.rand(1, 1, 8, 8))
    distinct = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.GELU())
    logits, feats = FeatureExtractor(distinct)(torch.rand(2, 1, 8, 8))
    assert list(feats) == ["1", "3"] and feats["3"].shape == (2, 2)
    with pytest.raises(TypeError, match="TorchScript"):
        FeatureExtractor(torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())))
    with pytest.raises(TypeError, match="nn.Module"):
        available_layers("resnet18")


def test_pool_feature_shapes():
    assert pool_feature(torch.ones(2, 3)).shape == (2, 3)
    assert torch.equal(pool_feature(torch.arange(8.0).view(1, 2, 4)), torch.tensor([[1.5, 5.5]]))
    x = torch.rand(2, 3, 4, 5).transpose(2, 3)  # non-contiguous
    assert torch.allclose(pool_feature(x), x.mean(dim=(2, 3)))


def test_extract_pooled_batches_equal_one_pass(resnet):
    extractor = FeatureExtractor(resnet, ["relu", "layer4.1.relu2"], pooled=False)
    x = torch.rand(7, 3, 16, 16)
    logits, pooled, raw = extract_pooled(extractor, (x[i : i + 3] for i in range(0, 7, 3)), raw_layers=["relu"])
    with torch.no_grad():
        want_logits, want = extractor(x)
    torch.testing.assert_close(logits, want_logits)
    for name, f in want.items():
        torch.testing.assert_close(pooled[name], pool_feature(f))
    torch.testing.assert_close(raw["relu"], want["relu"])
    assert list(raw) == ["relu"] and not pooled["relu"].requires_grad
    with pytest.raises(ValueError, match="raw_layers"):
        extract_pooled(extractor, [x], raw_layers=["layer1"])
    with pytest.raises(ValueError, match="train_dataset is empty"):
        extract_pooled(extractor, [], name="train_dataset")
    extractor.remove()


def test_raw_maps_wider_than_the_cap_are_average_pooled_to_it():
    small = torch.rand(2, 3, RAW_MAX_SIDE, 7)
    assert cap_raw_map(small) is small and cap_raw_map(torch.ones(2, 5)).shape == (2, 5)
    wide = torch.rand(2, 3, 2 * RAW_MAX_SIDE, 20)
    capped = cap_raw_map(wide)
    assert capped.shape == (2, 3, RAW_MAX_SIDE, 20)
    torch.testing.assert_close(capped, (wide[:, :, 0::2] + wide[:, :, 1::2]) / 2)  # 2x1 means: 64 rows to 32
    torch.testing.assert_close(pool_feature(capped), pool_feature(wide))  # the pooled feature is unchanged
    torch.manual_seed(0)
    model = build_model("resnet18", 2, width=0.125, small_stem=True).eval()  # the stem keeps the input's side
    extractor = FeatureExtractor(model, ["relu"], pooled=False)
    x = torch.rand(2, 3, 80, 80)
    _, pooled, raw = extract_pooled(extractor, [x], raw_layers=["relu"])
    with torch.no_grad():
        full = extractor(x)[1]["relu"]
    assert full.shape[-1] == 80 and raw["relu"].shape[-2:] == (RAW_MAX_SIDE, RAW_MAX_SIDE)
    torch.testing.assert_close(raw["relu"], F.adaptive_avg_pool2d(full, RAW_MAX_SIDE))
    torch.testing.assert_close(pooled["relu"], pool_feature(full))
    extractor.remove()
    pooling = FeatureExtractor(model, ["relu", "layer1.0.relu1"], raw_layers=["relu"])  # caps and pools in the pass
    with torch.no_grad():
        _, feats = pooling(x)
    torch.testing.assert_close(feats["relu"], raw["relu"])
    assert feats["layer1.0.relu1"].shape == (2, model.net.layer1[0].conv1.out_channels)
    with pytest.raises(UserError, match="raw_layers"):
        FeatureExtractor(model, ["relu"], raw_layers=["layer1.0.relu1"])
    pooling.remove()


def test_stop_after_ends_the_pass_at_that_layer(resnet):
    extractor = FeatureExtractor(resnet, ["relu", "layer2.1.relu2", "layer4.1.relu2"])
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        logits, full = extractor(x)
        none, early = extractor(x, stop_after="layer2.1.relu2")
    assert none is None and list(early) == ["relu", "layer2.1.relu2"]
    torch.testing.assert_close(early["layer2.1.relu2"], full["layer2.1.relu2"])
    with torch.no_grad():  # the next full pass is unaffected
        torch.testing.assert_close(extractor(x)[0], logits)
    with pytest.raises(ValueError, match="stop_after"):
        extractor(x, stop_after="layer1")
    extractor.remove()
