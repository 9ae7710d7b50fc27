"""engine.audit as a library function: config keys as keywords (unknown ones refused before work), any common data
form, the model's own device, and the caller's model never changed."""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import engine
from engine.auditing import as_dataset
from engine.data import ArrayDataset
from engine.models import build_model
from engine.runs import ConfigError


def _data(n: int = 120, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], n // 2)
    images = rng.uniform(0.3, 0.5, size=(n, 3, size, size)).astype(np.float32)
    images[labels == 1, :, 4:12, 4:12] += 0.4  # class 1: a bright square
    return torch.from_numpy(images), torch.from_numpy(labels)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 2, width=0.125, small_stem=True, input_size=16)


def test_engine_audit_is_the_function_after_importing_the_module():
    importlib.import_module("engine.auditing")
    from engine import audit

    assert callable(engine.audit) and engine.audit is audit and audit.__module__ == "engine.auditing"


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"devcie": "cpu"}, "unknown config key 'devcie'"),
        ({"steps": 10}, "unknown config key 'steps'"),
        ({"attack": {"stepz": 3}}, "unknown config key 'attack.stepz'"),
        ({"hfc": {"layerz": "blocks"}}, "unknown config key 'hfc.layerz'"),
        ({"detector": {"arms": {"same": {"bogus": 1}}}}, "unknown config key 'detector.arms.same.bogus'"),
        ({"eps": ["16"]}, "config key 'eps.0' must be a budget"),
        ({"name": "vendor"}, "engine.audit sets config keys ['name'] itself"),
        ({"model": {"checkpoint": "x.pt"}}, "engine.audit sets config keys ['model.checkpoint'] itself"),
    ],
)
def test_bad_keywords_are_refused_before_any_work(keywords, message, monkeypatch, tmp_path):
    monkeypatch.setattr("engine.auditing.load_model", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        engine.audit(_model(), _data(), run_dir=tmp_path / "run", **keywords)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("config key 'device' is 'cuda', which this machine does not")):
        engine.audit(_model(), _data(), run_dir=tmp_path / "run", device="cuda")


def test_data_forms_become_the_same_dataset():
    x, y = _data()
    reference = ArrayDataset(x, y)
    forms = [reference, (x, y), (x.numpy(), y.numpy()), TensorDataset(x, y), DataLoader(TensorDataset(x, y), 32)]
    for form in forms:
        dataset = as_dataset(form)
        assert len(dataset) == len(x) and dataset.fingerprint == reference.fingerprint, type(form).__name__
        assert torch.equal(dataset[7][0], x[7]) and dataset[7][1] == int(y[7])


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        ("fundus-synth", TypeError, "data must be an engine dataset"),
        (torch.zeros(4, 3, 8, 8), TypeError, "data must be an engine dataset"),
        ((torch.zeros(4, 3, 8, 8), torch.zeros(3)), ValueError, "labels"),
        ((torch.full((4, 3, 8, 8), 2.0), torch.zeros(4)), ValueError, "in [0, 1]"),
        (DataLoader(TensorDataset(torch.zeros(4, 3, 8, 8)), 2), TypeError, "(images, labels) pairs"),
    ],
)
def test_other_data_is_refused_clearly(data, error, message):
    with pytest.raises(error, match=re.escape(message)):
        as_dataset(data)


@pytest.mark.slow
def test_audit_leaves_the_callers_model_as_it_was(tmp_path):
    x, y = _data(160)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(8):  # a briefly trained model: both classes predicted, attacks can flip them
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.train()
    frozen, first = next(iter(model.named_parameters()))
    first.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    report = engine.audit(
        model, loader, attacks="pgd", detectors="kd", hfc=False, eps=0.12, attack={"steps": 3, "pool": 24},
        detector={"bootstrap": 10, "arms": None}, run_dir=tmp_path / "api",
    )  # fmt: skip
    assert report.rows and report.card and report.result.config["device"] == "cpu"  # the model's own device
    assert model.training and all(m.training for m in model.modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags.pop(frozen) is False and all(flags.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all((grads[n] is None) == (p.grad is None) for n, p in model.named_parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
