"""The configs shipped in configs/ stay valid, and the paper preset runs end to end at a tiny scale on data laid
out as APTOS 2019 and the Kaggle chest X-ray set (a handful of generated images, a few steps, tiny widths)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from engine.cli import main
from engine.runs import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cpu_only = [] if torch.cuda.is_available() else ["device=cpu"]  # a local run refuses a device the machine lacks
    load_config(path, cpu_only)


def _image(rng: np.random.Generator, bright: bool) -> Image.Image:
    pixels = rng.integers(0, 120, (48, 48, 3)).astype(np.uint8)
    if bright:  # the positive class: a bright blob the tiny models can learn in one epoch
        pixels[12:36, 12:36] = 230
    return Image.fromarray(pixels)


def _aptos(root: Path, rng: np.random.Generator, n: int = 80) -> None:
    (root / "train_images").mkdir(parents=True)
    grades = np.where(np.arange(n) % 2 == 0, 0, 1 + np.arange(n) // 2 % 4)  # half grade 0: DR vs no DR balanced
    for i, grade in enumerate(grades):
        _image(rng, grade > 0).save(root / "train_images" / f"img{i}.png")
    table = pd.DataFrame({"id_code": [f"img{i}" for i in range(n)], "diagnosis": grades})
    table.to_csv(root / "train.csv", index=False)


def _chest_xray(root: Path, rng: np.random.Generator, n: int = 24) -> None:
    for part in ("train", "val", "test"):
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            folder = root / part / cls
            folder.mkdir(parents=True)
            for i in range(n // 2 if part == "val" else n):
                _image(rng, bool(label)).convert("L").save(folder / f"{i}.jpeg")


@pytest.mark.slow  # the paper preset end to end: about 20 s idle
def test_paper_preset_runs_at_tiny_scale(tmp_path):
    rng = np.random.default_rng(0)
    _aptos(tmp_path / "aptos", rng)
    _chest_xray(tmp_path / "cxr", rng)
    datasets = [
        {"name": "aptos", "path": str(tmp_path / "aptos"), "task": "binary", "image_size": 32, "label": "APTOS"},
        {"name": "chest_xray", "path": str(tmp_path / "cxr"), "image_size": 32, "channels": 3, "label": "CXR"},
    ]
    models = [
        {"arch": "resnet50", "width": 0.0625, "options": {}},
        {"arch": "vgg16", "width": 0.25, "lr": 0.0001, "epochs": 15, "options": {"pool_size": 1, "hidden": 128}},
    ]
    overrides = {
        "output_dir": str(tmp_path / "runs"),
        "device": "cpu",
        "datasets": datasets,
        "models": models,
        "model.epochs": 15,
        "model.lr": 0.003,
        "attacks": ["pgd"],
        "eps": ["64/256"],
        "headline": {"attack": "pgd", "eps": "64/256"},
        "attack.steps": 5,
        "hfc.step_size": "32/256",  # 2 x 64/256 / step: 4 steps
        "hfc.calibration.images": 8,
        "hfc.n_components": 1,
        "detectors": ["kd"],
        "detector.bootstrap": 20,
    }
    args = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in overrides.items()]
    assert main(["run", str(CONFIGS / "paper.yaml"), *args, "--no-progress"]) == 0
    rows = pd.read_csv(tmp_path / "runs" / "paper" / "results.csv")
    assert set(rows["dataset"]) == {"APTOS", "CXR"} and set(rows["model"]) == {"resnet50", "vgg16"}
    sets = ["plain", "HFC", "weight 0", "weight 1", "adaptive HFC"]
    assert (rows["metric"] == "attack_success_rate").sum() == 2 * 2 * len(sets)  # datasets x models x sets
