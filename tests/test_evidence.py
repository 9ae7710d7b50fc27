"""The evidence layer of an audit end to end on a tiny run: seeds, detector layer arms, the weight-0 and adaptive HFC
sets, the typicality detector, the cross-attack transfer matrix, and the report's verdicts, tables and diagnostics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from engine.cli import main
from engine.runs import load_config
from engine.runs.catalog import catalog
from engine.runs.plan import GENERATOR_SEED_OFFSET, build_cells

TINY = {
    "name": "evidence",
    "seeds": [3, 4],
    "datasets": [{"name": "fundus-synth", "task": "binary", "n": 400, "image_size": 32}],
    "model": {"width": 0.125, "epochs": 2, "batch_size": 32},
    "attacks": ["pgd", "bim"],
    "eps": ["8/256"],
    "attack": {"steps": 3, "pool": 80, "batch_size": 80},
    "hfc": {"n_components": 1, "lam": 0.1, "steps": 3, "adaptive": True},
    "detectors": ["kd", "lid", "typicality"],
    "detector": {"bootstrap": 20, "train_limit": 100, "lid": {"k": 5}},
    "studies": [],
}


def test_each_seed_draws_its_own_data_and_cells():
    config = load_config(overrides=["seeds=[0, 1]", "studies=[]"])
    data = [c for c in build_cells(config) if c.stage == "data"]
    seeds = {(c.inputs["seed"], c.inputs["dataset"]["seed"]) for c in data}
    assert seeds == {(s, GENERATOR_SEED_OFFSET + s) for s in (0, 1)}
    assert len(data) == 2 * len(config["datasets"])


def test_plan_scores_every_set_once_per_arm():
    config = load_config(overrides=["attacks=[pgd, bim]", "studies=[]"])
    detect = [c for c in build_cells(config) if c.stage == "detect"]
    assert len(detect) == 2 * 2 * 2 * len(config["detectors"])  # datasets x attacks x arms x detectors
    headline = [c for c in detect if c.inputs["attack"] == "pgd"][0]
    assert set(headline.inputs["sets"]) == {"hfc", "w0", "adaptive", "transfer:bim", "transfer:bim+hfc"}
    other = [c for c in detect if c.inputs["attack"] == "bim"][0]
    assert set(other.inputs["sets"]) == {"hfc", "w0", "transfer:pgd", "transfer:pgd+hfc"}  # adaptive: headline only
    assert {c.inputs["arm"] for c in detect} == {"same", "unconstrained"}


@pytest.fixture(scope="module")
def evidence_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(root / "runs")}))
    assert main(["run", str(config), "--no-progress"]) == 0
    return root / "runs" / "evidence"


@pytest.mark.slow
def test_rows_carry_seed_arm_and_variant(evidence_run):
    frame = pd.read_csv(evidence_run / "results.csv")
    assert set(frame["seed"].dropna().astype(int)) == {3, 4}
    det = frame[frame["detector"].fillna("").ne("")]
    assert set(det["arm"]) == {"same", "unconstrained"}
    variants = set(det["variant"].fillna(""))
    assert {"", "w0", "adaptive", "transfer:bim", "transfer:bim+hfc", "transfer:pgd"} <= variants
    assert set(det["detector"]) == {"kd", "lid", "typicality"}
    asr = frame[frame["metric"] == "attack_success_rate"]
    assert len(asr) == 2 * (4 + 3)  # seeds x (pgd: plain, HFC, w0, adaptive + bim: plain, HFC, w0)
    diag = frame[frame["metric"].str.startswith("diag_")]
    assert set(diag["subset"]) == {"clean", "noise", "plain", "hfc"}
    reversed_ = frame[frame["metric"] == "auroc_reversed"]
    plain = frame[(frame["metric"] == "auroc") & frame["subset"].isin(["successful", "failed", "all"])]
    assert len(reversed_) == len(plain)


@pytest.mark.slow
def test_report_shows_the_verdicts_per_arm_and_the_new_tables(evidence_run):
    html = (evidence_run / "report.html").read_text()
    for text in (
        "detectors on the &#x27;same&#x27; layers",
        "detectors on the &#x27;unconstrained&#x27; layers",
        "What still catches HFC",
        "The drop comes from the constraint",
        "Defence table",
        "Cross-attack transfer",
        "Diagnostics on",
        "between-seed",
        "HFC w0",
        "schedule with weight 0",  # the paired tables' caption explains the weight-0 column they show
    ):
        assert text in html, text


@pytest.mark.slow
def test_catalog_keys_name_seed_and_arm(evidence_run):
    keys = {e.key for e in catalog(evidence_run)}
    assert "fundus-synth_binary/resnet18/seed3/pgd/8-256/same/kd" in keys
    assert "fundus-synth_binary/resnet18/seed4/bim/8-256/unconstrained/typicality" in keys
    assert len(keys) == 2 * 2 * 2 * 3


def test_release_keeps_only_what_was_handed_over_in_memory(tmp_path):
    from engine.data import ArrayDataset
    from engine.models import build_model
    from engine.runs import Artifacts, RunContext

    ctx = RunContext(Artifacts(tmp_path), progress=False)
    given = ArrayDataset(np.zeros((4, 3, 8, 8), np.float32), np.array([0, 1, 0, 1]), ["a", "b"], "given")
    ctx.register_dataset({"name": "memory", "label": "given"}, given)
    ref = ctx.register_model(build_model("resnet18", 2, width=0.0625), "m")
    ctx.memo("features", lambda: np.ones(3))
    ctx.dataset({"name": "fundus-synth", "task": "binary", "n": 20, "image_size": 16})
    ctx.release()
    assert ctx.dataset({"name": "memory", "label": "given"}) is given
    assert ctx.model(ref) is not None
    assert ctx.memo("features", lambda: None) is None  # rebuilt on demand
    assert len(ctx._datasets) == 1


@pytest.fixture
def arms(tmp_path):
    """A run context with a tiny ResNet-18 (16 px), its activations and constrained layers, a maker of detect
    inputs on an arm's layers, a maker of the cell's feature source, and the batch sizes of the model's passes."""
    from types import SimpleNamespace

    from engine.models import build_model, early_stages, resolve_layers
    from engine.runs import Artifacts, RunContext
    from engine.runs.stages.detect import _Source

    ctx = RunContext(Artifacts(tmp_path), progress=False)
    ref = ctx.register_model(build_model("resnet18", 2, width=0.0625), "m")
    model, shape = ctx.model(ref), (3, 16, 16)
    activations = resolve_layers(model, "activations")
    constrained = early_stages(model, activations, shape)
    passes = []
    handle = model.register_forward_hook(lambda m, inputs, out: passes.append(len(inputs[0])))
    source = lambda layers, detector="kd": _Source(  # noqa: E731
        ctx, ref, SimpleNamespace(layers=layers, raw_layers=None, detector=detector), shape, constrained
    )
    yield SimpleNamespace(ctx=ctx, ref=ref, model=model, shape=shape, activations=activations,
                          constrained=constrained, source=source, passes=passes)  # fmt: skip
    handle.remove()


def test_layer_arms_share_one_feature_pass_per_image_set(arms):
    x, y = torch.rand(6, *arms.shape), torch.tensor([0, 1] * 3)
    constrained, activations, passes = arms.constrained, arms.activations, arms.passes
    same = arms.source("constrained").features(("clean", "k"), x, y)
    every = arms.source("activations").features(("clean", "k"), x, y)
    assert passes.count(len(x)) == 1  # the second arm reads the first arm's pass (1-image passes: probes)
    dnn = arms.source("constrained", "dnn").features(("clean", "k"), x, y)
    assert passes.count(len(x)) == 2  # raw maps after the pooled pass: a pass of their own
    mixtures = arms.ctx.features(arms.ref, ("train", "t"), x, y, constrained, keep_images=False)  # HFC's mixtures
    kd_train = arms.source("activations").features(("train", "t"), x, y, False)
    assert passes.count(len(x)) == 3 and mixtures.images is None and kd_train.layer_names == activations
    assert same.layer_names == constrained and every.layer_names == activations and dnn.layer_names == constrained
    assert set(dnn.raw) == set(constrained) and not same.raw
    for name in constrained:
        np.testing.assert_array_equal(same.layer(name), every.layer(name))
        np.testing.assert_allclose(dnn.layer(name), same.layer(name), rtol=1e-5, atol=1e-6)


def test_a_raw_map_reader_first_fills_the_shared_pass(arms):
    from engine.models import spatial_layers

    x, y = torch.rand(5, *arms.shape), torch.tensor([0, 1, 0, 1, 1])
    dnn = arms.source("activations", "dnn").features(("clean", "k"), x, y)
    kd = arms.source("constrained").features(("clean", "k"), x, y)
    assert arms.passes.count(len(x)) == 1  # KD reads the pooled part of DNN's pass
    assert set(dnn.raw) == set(spatial_layers(arms.model, arms.activations, arms.shape)) and not kd.raw
    held = arms.ctx.memo(("features", arms.ref, tuple(arms.activations), True, "clean", "k"), lambda: None)
    assert held.raw == {}  # the raw maps stay with their reader
    for name in arms.constrained:
        np.testing.assert_array_equal(kd.layer(name), dnn.layer(name))


@pytest.mark.slow
def test_an_arm_whose_fit_reads_the_same_layers_reuses_it(tmp_path, caplog):
    both = {"raw_layers": "activations"}  # DNN reads every spatial activation in either arm
    config = {
        **TINY, "seeds": [3], "attacks": ["pgd"], "output_dir": str(tmp_path / "runs"), "detectors": ["kd", "dnn"],
        "hfc": {**TINY["hfc"], "adaptive": False, "fixed_weights": []},
        "detector": {
            "bootstrap": 20, "train_limit": 100, "dnn": {"width": 0.125, "epochs": 3},
            "arms": {"same": {"layers": "constrained", **both}, "unconstrained": {"layers": "activations", **both}},
        },
    }  # fmt: skip
    path = tmp_path / "reuse.yaml"
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level("INFO", logger="engine.runs"):
        assert main(["run", str(path), "--no-progress"]) == 0
    reused = [r.getMessage() for r in caplog.records if "its fit is reused" in r.getMessage()]
    assert len(reused) == 1 and "dnn [unconstrained layers]" in reused[0] and "dnn [same layers]" in reused[0]
    frame = pd.read_csv(tmp_path / "runs" / "evidence" / "results.csv")
    det = frame[frame["detector"].isin(["kd", "dnn"])]
    assert list(dict.fromkeys(det["detector"])) == ["dnn", "kd"]  # the raw-map reader runs first in each arm
    columns = ["metric", "subset", "hfc", "variant", "value", "ci_low", "ci_high", "n_neg", "n_pos"]
    arms = {arm: part[det["detector"] == "dnn"][columns].reset_index(drop=True) for arm, part in det.groupby("arm")}
    assert len(arms["same"]) > 0
    pd.testing.assert_frame_equal(arms["same"], arms["unconstrained"])
    entries = {e.key: e for e in catalog(tmp_path / "runs" / "evidence")}
    paths = {entries[f"fundus-synth_binary/resnet18/pgd/8-256/{arm}/dnn"].path for arm in ("same", "unconstrained")}
    assert len(paths) == 2 and all((path / "config.json").is_file() for path in paths)  # each arm its own copy
