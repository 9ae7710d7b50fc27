"""`hfc-engine calibrate`: a site's clean images become a new calibration beside each detector (source, date, data
fingerprint, scores), never replacing one; `score` then reads its thresholds from the newest, or the fit's."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.data import load_dataset
from engine.detectors import KD, LID, Detector, FeatureCache, fpr_threshold
from engine.models import build_model, load_model, save_checkpoint
from engine.score import data_fingerprint

SIZE = 32


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny model's checkpoint and KD, LID fitted on it with thresholds from 40 clean images."""
    root = tmp_path_factory.mktemp("calibrate")
    torch.manual_seed(0)
    model = build_model("resnet18", 3, width=0.125, small_stem=True, input_size=SIZE).eval()
    checkpoint = save_checkpoint(root / "m.pt", model, {"input_size": [3, SIZE, SIZE]})
    model = load_model(checkpoint)
    cache = FeatureCache(model, layers=["layer4.1.relu2"], batch_size=20)
    x = torch.rand(40, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    clean, adversarial = cache.extract(x, np.arange(40) % 3), cache.extract((x + 0.3 * torch.rand_like(x)).clamp(0, 1))
    dirs = []
    for det in (KD(), LID(k=5, batch_size=20)):
        det.fit(cache, clean, adversarial).set_thresholds(det.score(clean))
        dirs.append(det.save(root / det.name, model=model, checkpoint=checkpoint))
    return checkpoint, dirs


def site(root, n: int, seed: int):
    """An image folder of ``n`` random 32 px RGB images in classes a, b, c (a site's clean images)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / "abc"[i % 3]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "abc"[i % 3] / f"{i}.png")
    return f"image_folder:{root}"


def test_calibrate_saves_a_new_calibration_and_score_reads_the_newest(fitted, tmp_path, capsys):
    checkpoint, dirs = fitted
    spec = site(tmp_path / "site", 30, 0)
    argv = ["calibrate", "--detectors", *map(str, dirs), "--data", spec, "--fpr", "0.1", "0.25", "--no-progress"]
    with pytest.warns(UserWarning, match="rests on 30 clean images"):  # 30 images are too few for 10% (100 needed)
        assert main(argv) == 0  # the model: the one the detectors were fitted on
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"calibrated on 30 clean images of {spec}") and len(out) == 1 + 2 * 2
    for directory in dirs:
        (saved,) = (directory / "calibrations").glob("*.json")
        record = json.loads(saved.read_text())
        assert record["source"] == spec and record["images"] == 30 and record["date"].startswith("20")
        assert record["data"] == data_fingerprint(load_dataset(spec))
        assert record["model"] == Detector.load(directory).model_["fingerprint"]
        scores = np.array(record["scores"])
        line = next(line for line in out if line.strip().startswith(f"{Detector.load(directory).name} at fpr 0.25"))
        assert f"{fpr_threshold(scores, 0.25):.6g} ({saved.stem};" in line
    # a second calibration is added beside the first; score reads the newest, or the fit's with --calibration fit
    with pytest.warns(UserWarning):
        assert (
            main(["calibrate", "--detectors", *map(str, dirs), "--data", site(tmp_path / "b", 12, 1), "--no-progress"])
            == 0
        )
    for directory in dirs:
        assert len(list((directory / "calibrations").glob("*.json"))) == 2
    newest = sorted((dirs[0] / "calibrations").glob("*.json"))[-1]
    score = ["score", "--model", str(checkpoint), "--detectors", str(dirs[0]), "--data", spec, "--no-progress",
             "--fpr", "0.2"]  # fmt: skip
    for which, scores in [(None, json.loads(newest.read_text())["scores"]),
                          ("fit", Detector.load(dirs[0]).clean_scores_)]:  # fmt: skip
        out = tmp_path / f"{which}.csv"
        with pytest.warns(UserWarning):
            assert main([*score, "--out", str(out), *(["--calibration", which] if which else [])]) == 0
        (threshold,) = json.loads(out.with_suffix(".thresholds.json").read_text())["thresholds"]
        assert threshold["calibration"] == (which or newest.stem)
        assert threshold["value"] == fpr_threshold(np.array(scores), 0.2)
        rows = pd.read_csv(out)
        assert (rows["flag_kd@0.2"] == (rows["score_kd"] > threshold["value"])).all()


def test_calibrate_refusals_are_one_line(fitted, tmp_path, capsys):
    checkpoint, dirs = fitted
    spec = site(tmp_path / "site", 6, 0)
    assert main(["calibrate", "--detectors", str(dirs[0]), "--data", spec, "--fpr", "1.5"]) == 2
    assert "fpr must be one or more rates in (0, 1)" in capsys.readouterr().err
    before = sorted(dirs[0].rglob("*"))
    assert main(["calibrate", "--detectors", str(dirs[0]), "--data", spec, "--image-size", "48"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--image-size 32" in line and sorted(dirs[0].rglob("*")) == before
    assert main(["score", "--model", str(checkpoint), "--detectors", str(dirs[0]), "--data", spec,
                 "--calibration", "nope", "--out", str(tmp_path / "s.csv")]) == 2  # fmt: skip
    assert "calibration 'nope' is not one of kd's: ['fit'" in capsys.readouterr().err
