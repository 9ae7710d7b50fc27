"""Architectures: torchvision key/shape compatibility, options, MC-dropout, loading from every source."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.models import (
    build_model,
    load_checkpoint,
    load_model,
    load_torchvision_state_dict,
    mc_dropout,
    save_checkpoint,
    set_mc_dropout,
)


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


def torchvision_resnet(blocks: tuple[int, ...], bottleneck: bool, num_classes: int, w: float = 1.0) -> dict:
    """Keys and shapes of torchvision.models.resnet{18,50}().state_dict(), written out from its architecture."""
    widths = [max(1, round(c * w)) for c in (64, 128, 256, 512)]
    shapes = {"conv1.weight": (widths[0], 3, 7, 7)} | _bn("bn1", widths[0])
    cin = widths[0]
    for stage, (planes, n) in enumerate(zip(widths, blocks, strict=True), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            out = planes * 4 if bottleneck else planes
            if bottleneck:
                shapes |= {f"{p}.conv1.weight": (planes, cin, 1, 1)} | _bn(f"{p}.bn1", planes)
                shapes |= {f"{p}.conv2.weight": (planes, planes, 3, 3)} | _bn(f"{p}.bn2", planes)
                shapes |= {f"{p}.conv3.weight": (out, planes, 1, 1)} | _bn(f"{p}.bn3", out)
            else:
                shapes |= {f"{p}.conv1.weight": (planes, cin, 3, 3)} | _bn(f"{p}.bn1", planes)
                shapes |= {f"{p}.conv2.weight": (planes, planes, 3, 3)} | _bn(f"{p}.bn2", planes)
            if b == 0 and (stage > 1 or cin != out):
                shapes |= {f"{p}.downsample.0.weight": (out, cin, 1, 1)} | _bn(f"{p}.downsample.1", out)
            cin = out
    return shapes | {"fc.weight": (num_classes, cin), "fc.bias": (num_classes,)}


def torchvision_vgg16(batch_norm: bool, num_classes: int) -> dict:
    """Keys and shapes of torchvision.models.vgg16[_bn]().state_dict()."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    shapes, idx, cin = {}, 0, 3
    for item in cfg:
        if item == "M":
            idx += 1
            continue
        shapes |= {f"features.{idx}.weight": (item, cin, 3, 3), f"features.{idx}.bias": (item,)}
        if batch_norm:
            shapes |= _bn(f"features.{idx + 1}", item)
        idx += 3 if batch_norm else 2
        cin = item
    for i, (o, n) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (num_classes, 4096)), strict=True):
        shapes |= {f"classifier.{i}.weight": (o, n), f"classifier.{i}.bias": (o,)}
    return shapes


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "expected", "n_params"),
    [
        ("resnet18", torchvision_resnet((2, 2, 2, 2), False, 1000), 11_689_512),
        ("resnet50", torchvision_resnet((3, 4, 6, 3), True, 1000), 25_557_032),
        ("vgg16", torchvision_vgg16(False, 1000), 138_357_544),
        ("vgg16_bn", torchvision_vgg16(True, 1000), 138_365_992),
    ],
)
def test_standard_configuration_has_torchvision_keys_in_order(name, expected, n_params):
    with torch.device("meta"):  # shapes only, no memory
        net = build_model(name, 1000).net
    assert list(_shapes(net).items()) == list(expected.items())
    assert sum(p.numel() for p in net.parameters()) == n_params  # torchvision's published counts


@pytest.mark.parametrize(
    ("name", "blocks", "bottleneck"), [("resnet18", (2, 2, 2, 2), False), ("resnet50", (3, 4, 6, 3), True)]
)
def test_torchvision_state_dict_round_trip_strict(name, blocks, bottleneck):
    expected = torchvision_resnet(blocks, bottleneck, 5, w=0.25)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) if s else torch.tensor(7) for k, s in expected.items()}
    model = build_model(name, 5, width=0.25)
    load_torchvision_state_dict(model, state)
    loaded = model.net.state_dict()
    assert list(loaded) == list(expected)
    for k, v in state.items():
        assert torch.equal(loaded[k], v.to(loaded[k].dtype)), k
    # The wrapper's own state_dict is the backbone's under "net." plus the normalisation buffers.
    assert set(model.state_dict()) == {f"net.{k}" for k in expected} | {"normalize.mean", "normalize.std"}


def test_load_torchvision_state_dict_head_and_gray_adaptation():
    rgb = build_model("resnet18", 1000, width=0.25).net.state_dict()
    gray = build_model("resnet18", 2, width=0.25, in_channels=1)
    with pytest.raises(ValueError, match="fc.weight"):
        load_torchvision_state_dict(gray, rgb)
    load_torchvision_state_dict(gray, rgb, skip_classifier=True)
    assert torch.allclose(gray.net.conv1.weight, rgb["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(gray.net.layer4[1].conv2.weight, rgb["layer4.1.conv2.weight"])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_torchvision_state_dict(build_model("resnet18", 1000, width=0.25), {**rgb, "extra.weight": rgb["fc.bias"]})


@pytest.mark.parametrize(
    ("name", "options", "size"),
    [
        ("resnet18", {"width": 0.125, "small_stem": True}, 32),
        ("resnet18", {"width": 0.125}, 33),
        ("resnet50", {"width": 0.0625, "in_channels": 1}, 32),
        ("vgg16", {"width": 0.0625, "pool_size": 1}, 32),
        ("vgg16_bn", {"width": 0.0625, "pool_size": 2, "hidden": 16}, 64),
    ],
)
def test_small_variants_forward(name, options, size):
    model = build_model(name, 3, **options).eval()
    x = torch.rand(2, options.get("in_channels", 3), size, size)
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert torch.allclose(model(x[:1]), out[:1], atol=1e-5)  # N=1 works in eval mode


def test_normalisation_inside_model():
    model = build_model("resnet18", 2, width=0.125, mean=[0.2, 0.3, 0.4], std=[0.5, 0.25, 0.125]).eval()
    x = torch.rand(3, 3, 32, 32)
    manual = (x - torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    assert torch.allclose(model(x), model.net(manual), atol=1e-6)
    gray = build_model("resnet18", 2, width=0.125, in_channels=1)
    assert gray.normalize.mean.shape == (1, 1, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"name": "resnet34", "num_classes": 2}, ValueError, "name must be one of"),
        ({"name": "resnet18", "num_classes": 1}, ValueError, "num_classes"),
        ({"name": "resnet18", "num_classes": 2, "in_channels": 4}, ValueError, "in_channels"),
        ({"name": "resnet18", "num_classes": 2, "width": 0}, ValueError, "width"),
        ({"name": "resnet18", "num_classes": 2, "dropout": 1.0}, ValueError, "dropout"),
        ({"name": "resnet18", "num_classes": 2, "pool_size": 1}, TypeError, "pool_size"),
        ({"name": "vgg16", "num_classes": 2, "small_stem": True}, TypeError, "small_stem"),
        ({"name": "resnet18", "num_classes": 2, "mean": [0.5]}, ValueError, "mean and std"),
        ({"name": "resnet18", "num_classes": 2, "std": [1.0, 0.0, 1.0]}, ValueError, "std must be positive"),
    ],
)
def test_build_model_rejects_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        build_model(**kwargs)


def test_mc_dropout_switchable_at_eval():
    model = build_model("resnet18", 2, width=0.125, small_stem=True, dropout=0.5).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # eval: deterministic
        with mc_dropout(model):
            assert not model.net.bn1.training and model.net.dropout.training
            torch.manual_seed(0)
            a, b = model(x), model(x)
            assert not torch.allclose(a, b)  # dropout samples
        assert not model.net.dropout.training  # restored
        assert torch.equal(model(x), model(x))
        assert set_mc_dropout(model, True) == 1 and model.net.dropout.training
        assert set_mc_dropout(model, False) == 1 and not model.net.dropout.training
    with pytest.raises(ValueError, match="dropout"):
        set_mc_dropout(build_model("resnet18", 2, width=0.125), True)
    assert set_mc_dropout(build_model("vgg16", 2, width=0.0625, pool_size=1), True) == 2


def test_load_model_from_every_source(tmp_path):
    model = build_model("resnet18", 3, width=0.125, small_stem=True, dropout=0.2, input_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    assert load_model(model) is model

    ckpt = save_checkpoint(tmp_path / "m.pt", model, {"classes": ["a", "b", "c"]})
    loaded = load_model(ckpt)
    assert isinstance(loaded, type(model)) and loaded.meta["classes"] == ["a", "b", "c"]
    assert loaded.config == model.config and torch.equal(loaded(x), ref)
    meta = load_checkpoint(ckpt)["meta"]
    assert meta["normalization"]["mean"] == model.config["mean"] and "torch" in meta["versions"]

    script = tmp_path / "m.ts"
    torch.jit.trace(model, x).save(str(script))
    assert torch.allclose(load_model(script)(x), ref, atol=1e-6)

    bare = tmp_path / "tv.pt"
    torch.save(model.net.state_dict(), bare)
    with pytest.raises(ValueError, match="arch="):
        load_model(bare)
    same = load_model(bare, arch="resnet18", num_classes=3, width=0.125, small_stem=True, dropout=0.2)
    assert torch.equal(same(x), ref)

    with pytest.raises(ValueError, match="not a file"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="source"):
        load_model(42)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):  # noqa: B017 - torch's unpickling error for a corrupt file
        load_model(tmp_path / "junk.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an hfc-engine checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
