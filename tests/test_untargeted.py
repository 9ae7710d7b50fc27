"""Every targeting mode a run accepts (``attack.targeted``: false, true, random, least_likely) through a whole run.

Regression: an untargeted attack's result has no target, and the attack stage once stored that None as a
``target`` metadata array ("metadata 'target' must have N rows, got shape ()").
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.attacks import PGD, AdvWriter, load_adversarial
from engine.auditing import run_audit
from engine.data import ArrayDataset
from engine.models import build_model, predict_logits
from engine.runs import DEFAULTS, Artifacts, RunContext

MODES = [False, True, "random", "least_likely"]


def test_untargeted_result_is_stored_without_target(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    result = PGD(model, eps=0.3, steps=3)(x, y)
    writer = AdvWriter(tmp_path, ["a", "b", "c"])
    writer.append_result(result, index=np.arange(5))
    stored = load_adversarial(tmp_path)
    assert sorted(stored.meta) == ["index", "success"]
    np.testing.assert_array_equal(stored.targets, y.numpy())
    np.testing.assert_array_equal(stored.meta["success"], (model(stored.images).argmax(1) != y).numpy())
    with pytest.raises(ValueError, match=r"metadata \['target'\] is None"):
        writer.append(result.adv, y, index=np.arange(5, 10), target=None, success=result.success)
    assert writer.num_samples == 5  # the refused batch wrote nothing


@pytest.fixture(scope="module")
def squares() -> tuple[ArrayDataset, nn.Module]:
    """A two-class set (a bright square or not) and a briefly trained tiny ResNet that predicts it."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    images = rng.uniform(0.3, 0.5, size=(200, 3, 16, 16)).astype(np.float32)
    images[labels == 1, :, 4:12, 4:12] += 0.4
    torch.manual_seed(0)
    model = build_model("resnet18", 2, width=0.125, small_stem=True, input_size=16, dropout=0.0)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return ArrayDataset(images, labels, ["normal", "lesion"], "squares"), model.eval()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run directory for every mode: the data, model and mixture cells do not depend on the targeting, so
    the modes after the first reuse them from the store."""
    return tmp_path_factory.mktemp("untargeted")


@pytest.mark.slow
@pytest.mark.parametrize("targeted", MODES, ids=str)
def test_run_with_each_targeting_mode(squares, run_root: Path, targeted: bool | str) -> None:
    dataset, model = squares
    spec = {"name": "memory", "fingerprint": dataset.fingerprint, "label": "squares"}
    context = RunContext(Artifacts(run_root / "run" / "artifacts"), progress=False)
    context.register_dataset(spec, dataset)
    config = copy.deepcopy(DEFAULTS)
    config.update(name="run", output_dir=str(run_root), datasets=[spec], attacks=["pgd"], detectors=["kd"])
    config.update(studies=[], eps=["32/256"])
    config["model"].update(checkpoint=context.register_model(model, "squares"), name="tiny")
    config["attack"].update(steps=3, pool=20, targeted=targeted)
    calibration = {"target": 0.5, "grid": [1.0, 0.01], "images": 10}
    config["hfc"].update(layers="layer4*relu*", n_components=1, steps=3, fixed_weights=[], calibration=calibration)
    config["detector"].update(bootstrap=5, arms=None)
    report = run_audit(config, progress=False, context=context)

    sets = report.result.payloads["attack"]
    assert {cell.inputs["variant"] for cell, _ in sets} == {"", "adaptive"} and len(sets) == 3  # plain, hfc, adaptive
    for cell, payload in sets:
        inputs = cell.inputs
        x, y = context.pool(inputs["dataset"], inputs["split"], inputs["seed"], inputs["pool"])
        stored = load_adversarial(context.artifacts.path(payload["directory"]))
        order = np.argsort(stored.meta["index"])
        pred = predict_logits(model, stored.images[torch.from_numpy(order)]).argmax(1)
        success = stored.meta["success"][order]
        np.testing.assert_array_equal(stored.targets[order], y.numpy())
        if targeted is False:
            assert "target" not in stored.meta
            np.testing.assert_array_equal(success, pred != y.numpy())
        else:
            target = stored.meta["target"][order]
            np.testing.assert_array_equal(success, pred == target)
            if targeted == "least_likely":
                np.testing.assert_array_equal(target, predict_logits(model, x).argmin(1))
            else:  # true and random: a random class other than the true one
                assert (target != y.numpy()).all()
        assert success.any(), f"{inputs['label']}: no attack succeeded, so the later stages saw no AE"

    frame = report.frame()
    assert frame.loc[frame["metric"] == "attack_success_rate", "value"].between(0, 1).all()
    assert frame.loc[frame["metric"] == "feature_loglik", "layer"].notna().any()  # the features stage ran
    assert (frame["metric"] == "auroc").any()  # the detect stage scored the sets
    assert frame["metric"].eq("hfc_lam").any()  # the calibrate stage chose a weight
    assert "Attack success" in (run_root / "run" / "report.html").read_text()
