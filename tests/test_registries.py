"""Every registry entry runs through ``hfc-engine run``: each attack, detector, architecture, study and dataset kind
that needs no user files, as a tiny cell. Registering a new entry adds its case here with no edit.

Attack and detector cases share one run directory, so the model, its mixtures and the PGD sets are computed
once and found again by the later runs (the store skips finished cells).
"""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from engine.attacks import ATTACKS
from engine.cli import main
from engine.data import SYNTHETIC
from engine.detectors import DETECTORS
from engine.models.classifier import ARCHITECTURES
from engine.runs import STUDIES

TINY = {
    "datasets": [{"name": "fundus-synth", "task": "binary", "n": 400, "image_size": 32}],
    "model": {"width": 0.125, "epochs": 2, "batch_size": 32, "options": {}},
    "eps": ["8/256"],
    "attack": {"steps": 3, "pool": 60, "batch_size": 60, "cw_l2": {"steps": 20, "c": 1.0}},
    "hfc": {"n_components": 1, "lam": 0.1, "steps": 3},
    "detector": {
        "bootstrap": 10,
        "train_limit": 120,
        "raw_layers": 2,
        "dnn": {"width": 0.125, "epochs": 2, "patience": 0},
        "bu": {"passes": 4},
    },
    "studies": [],
}

HEAVY_ARCHITECTURES = ("vgg16", "vgg16_bn", "resnet50")  # about 10 s each idle: the slow lane


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("registries")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(root / "runs")}))
    return path


def run(config, name: str, *overrides: str) -> pd.DataFrame:
    assert main(["run", str(config), f"name={name}", *overrides, "--no-progress"]) == 0
    return pd.read_csv(config.parent / "runs" / name / "results.csv")


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_every_attack_runs(config, attack):
    rows = run(config, "shared", f"attacks=[{attack}]", "detectors=[lid]")
    success = rows[(rows["metric"] == "attack_success_rate") & (rows["attack"] == attack)]
    assert len(success) == 4 and success["value"].between(0, 1).all()  # plain, HFC, HFC weight 0, adaptive HFC
    detection = rows[(rows["detector"] == "lid") & (rows["metric"] == "auroc") & (rows["subset"] == "successful")]
    assert len(detection) and detection["value"].between(0, 1).all()


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_every_detector_runs(config, detector):
    rows = run(config, "shared", "attacks=[pgd]", f"detectors=[{detector}]")
    auroc = rows[(rows["detector"] == detector) & (rows["metric"] == "auroc") & (rows["subset"] == "successful")]
    assert set(auroc["hfc"]) == {True, False} and auroc["value"].between(0, 1).all()


@pytest.mark.parametrize(
    "arch",
    [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY_ARCHITECTURES else a for a in ARCHITECTURES],
)
def test_every_architecture_runs(config, arch):
    # A VGG without batch norm trains from scratch only slowly: a wider net, a 1x1 pool, a small learning rate.
    vgg = ["model.width=0.25", "model.options={pool_size: 1, hidden: 128}", "model.lr=0.0001", "model.epochs=8"]
    rows = run(config, arch, f"model.arch={arch}", *(vgg if arch.startswith("vgg") else []),
               "attacks=[pgd]", "detectors=[maha]")  # fmt: skip
    assert set(rows["model"].dropna()) == {arch}
    assert {"clean_accuracy", "attack_success_rate", "auroc"} <= set(rows["metric"])


@pytest.mark.parametrize("kind", list(SYNTHETIC))
def test_every_embedded_dataset_runs(config, kind):
    spec = {"name": kind, "n": 400, "image_size": 32}
    rows = run(config, kind, f"datasets=[{yaml.safe_dump(spec, default_flow_style=True).strip()}]",
               "attacks=[fgsm]", "detectors=[kd]", "hfc.enabled=false")  # fmt: skip
    assert rows["dataset"].str.startswith(kind).all() and (rows["metric"] == "auroc").any()


@pytest.mark.parametrize("study", list(STUDIES))
def test_every_study_runs(config, study, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in STUDIES[study].tiny.items()]
    assert main(["study", study, *settings, "--no-progress"]) == 0
    rows = pd.read_csv(tmp_path / "runs" / f"study-{study}" / "results.csv")
    assert len(rows) and STUDIES[study].title in (tmp_path / "runs" / f"study-{study}" / "report.html").read_text()
