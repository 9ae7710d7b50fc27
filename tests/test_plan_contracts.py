"""Stage contracts: a config key changes the keys of exactly the cells that read it (and of their dependants), and
method facts on the classes, not names, decide what a cell gets.

Cells are built from configs (engine.runs.plan.build_cells); no work runs except one detect stage on a tiny
dataset with a stubbed model, attack set and protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from engine.detectors import DETECTORS, Detector, Requirements, register
from engine.models import build_model
from engine.runs import STAGES, Artifacts, Cell, RunContext, Stage, load_config
from engine.runs.cells import reads
from engine.runs.plan import build_cells
from engine.runs.stages import detect as detect_stage
from engine.runs.stages.detect import DetectInputs

TINY_DATA = "datasets=[{name: fundus-synth, task: binary, n: 200, image_size: 16, seed: 0}]"


def cells_by_label(*overrides: str) -> dict[str, Cell]:
    cells = build_cells(load_config(quick=True, overrides=list(overrides)))
    by_label = {c.label: c for c in cells}
    assert len(by_label) == len(cells)  # labels name the cells one to one
    return by_label


def changed(before: dict[str, Cell], after: dict[str, Cell]) -> set[str]:
    """Labels of the cells whose key differs (both plans have the same cells)."""
    assert set(before) == set(after)
    return {label for label in before if before[label].key != after[label].key}


def with_dependants(cells: dict[str, Cell], labels: set[str]) -> set[str]:
    """``labels`` and every cell that depends on one of them, directly or through others."""
    label_of = {c.key: label for label, c in cells.items()}
    out, grew = set(labels), True
    while grew:
        grew = False
        for label, c in cells.items():
            if label not in out and any(label_of[d] in out for d in c.deps):
                out.add(label)
                grew = True
    return out


def test_calibration_grid_changes_no_cell_with_a_fixed_weight():
    before = cells_by_label("hfc.lam=0.5")
    after = cells_by_label("hfc.lam=0.5", "hfc.calibration.grid=[1.0, 0.5, 0.25]")
    assert not any(c.stage == "calibrate" for c in before.values())
    assert changed(before, after) == set()


def test_calibration_grid_changes_the_calibrate_cells_and_their_dependants_with_auto():
    before = cells_by_label()
    after = cells_by_label("hfc.calibration.grid=[1.0, 0.5, 0.25]")
    calibrate = {label for label, c in before.items() if c.stage == "calibrate"}
    assert len(calibrate) == 2  # the main HFC set's weight and the adaptive set's
    expected = with_dependants(before, calibrate)
    assert changed(before, after) == expected
    stages = {before[label].stage for label in expected}
    assert stages == {"calibrate", "attack", "detect", "features"}  # the data, model, mixtures, plain set stay
    assert all(before[label].inputs["hfc"] for label in expected if before[label].stage == "attack")


def test_a_detector_option_changes_only_that_detectors_cells():
    before = cells_by_label()
    after = cells_by_label("detector.lid.k=10")
    lid = {label for label, c in before.items() if c.stage == "detect" and c.inputs["detector"] == "lid"}
    assert len(lid) == 2  # one per layer arm
    assert changed(before, after) == lid
    assert all(after[label].inputs["options"] == {"k": 10} for label in lid)


def test_a_key_reads_only_where_declared():
    """``detector.train_limit`` enters the cells of detectors that fit on training features only; the attack
    steps enter the attack and calibration cells and their dependants, never the data, model or mixtures."""
    before = cells_by_label()
    train = {label for label, c in before.items() if c.stage == "detect" and c.inputs["train_features"]}
    assert {before[label].inputs["detector"] for label in train} == {"kd", "maha", "dnr"}
    assert changed(before, cells_by_label("detector.train_limit=500")) == train
    attacks = {label for label, c in before.items() if c.stage in ("attack", "calibrate")}
    steps = changed(before, cells_by_label("attack.steps=7"))
    assert steps == with_dependants(before, attacks)
    assert {before[label].stage for label in set(before) - steps} == {"data", "model", "gmms"}


def test_a_key_added_to_a_stage_declaration_enters_its_cells_keys(monkeypatch):
    before = cells_by_label("projection.layers=[layer1]")
    assert changed(before, cells_by_label("projection.layers=[layer2]")) == {
        label for label, c in before.items() if c.stage == "features"
    }

    @dataclass(frozen=True, kw_only=True)
    class Extended(DetectInputs):
        projection: Any = reads("projection.layers")

    stage = STAGES["detect"]
    monkeypatch.setitem(STAGES, "detect", Stage(stage.name, stage.run, stage.cost, Extended))
    before = cells_by_label("projection.layers=[layer1]")
    detect = {label for label, c in before.items() if c.stage == "detect"}
    assert all(before[label].inputs["projection"] == ["layer1"] for label in detect)
    assert changed(before, cells_by_label("projection.layers=[layer2]")) == detect | {
        label for label, c in before.items() if c.stage == "features"
    }


def test_a_field_given_and_read_is_refused():
    with pytest.raises(TypeError, match="reads config key 'attack.pool'"):
        DetectInputs.from_config(load_config(quick=True), pool=10)


class ClassConditional(Detector):
    """A test detector that fits on labelled training features (never fitted here)."""

    name = "class-conditional-test"
    requires = Requirements(training_features=True)


@pytest.fixture
def registered():
    register(ClassConditional)
    yield ClassConditional
    del DETECTORS[ClassConditional.name]


class ProtocolReached(Exception):
    pass


def test_a_class_that_requires_training_features_gets_them_through_the_stage(registered, tmp_path, monkeypatch):
    overrides = [TINY_DATA, "hfc.enabled=false", "attack.pool=40", "detector.train_limit=30", "detector.arms=null"]
    cells = build_cells(load_config(quick=True, overrides=[*overrides, f"detectors=[{registered.name}, lid]"]))
    detect = {c.inputs["detector"]: c for c in cells if c.stage == "detect"}
    assert detect[registered.name].inputs["train_features"] and detect[registered.name].inputs["train_limit"] == 30
    assert not detect["lid"].inputs["train_features"] and detect["lid"].inputs["train_limit"] is None

    ctx = RunContext(Artifacts(tmp_path), progress=False)
    torch.manual_seed(0)
    model = build_model("resnet18", 2, width=0.0625, small_stem=True).eval()
    monkeypatch.setattr(ctx, "model", lambda checkpoint: model)
    x, _ = ctx.pool(detect["lid"].inputs["dataset"], detect["lid"].inputs["split"], 0, 40)
    adversarial = SimpleNamespace(images=x.flip(-1), success=np.ones(len(x), bool))
    monkeypatch.setattr(ctx.artifacts, "adversarial", lambda ref: adversarial)
    seen = {}

    def protocol(detectors, *args, train=None, **kwargs):
        seen[detectors[0].name] = train
        raise ProtocolReached

    monkeypatch.setattr(detect_stage, "run_protocol", protocol)
    for cell in detect.values():
        model_cell, plain_cell = cell.inputs["model_cell"], cell.inputs["plain_cell"]
        deps = {
            model_cell: {"checkpoint": "stub", "classes": ["0", "1"], "metrics": {}, "conversion": None},
            plain_cell: {"directory": "stub", "n": 40},
        }
        with pytest.raises(ProtocolReached):
            STAGES["detect"](ctx, cell.inputs, deps)
    train = seen[registered.name]
    assert train is not None and len(train) == 30 and train.labels is not None  # 30 labelled training images
    assert seen["lid"] is None
