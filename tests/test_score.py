"""Batch scoring: every detector kind through the Scorer with .pt, ONNX and TorchScript models (scores equal
Detector.score), the README's export -> score flow, the model-fingerprint refusal, resuming after kill -9."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from glob import glob
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.stats import beta, binomtest

import engine.commands
import engine.score
from engine.cli import main
from engine.data import ArrayDataset, load_dataset
from engine.detectors import (
    BU,
    DETECTORS,
    DNN,
    DNR,
    KD,
    LID,
    MAHA,
    SVM,
    Detector,
    FeatureCache,
    SafetyNet,
    Typicality,
    fitted_checkpoint,
    fpr_threshold,
)
from engine.detectors.thresholds import Reference, ThresholdError, check_fprs
from engine.errors import UserError
from engine.export import export_onnx
from engine.fileio import ResumeError
from engine.metrics import binomial_ci
from engine.mixture import GaussianMixture
from engine.models import build_model, load_model, resolve_layers, save_checkpoint
from engine.runs.catalog import locate
from engine.score import ScoreError, Scorer, score_dataset

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet18", 3, width=0.125, small_stem=True, dropout=0.3, input_size=SIZE)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.rand(16, 3, SIZE, SIZE))
    return model.eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def every_kind(with_bu: bool = True) -> list:
    kinds = [KD(), LID(k=5, batch_size=20), MAHA(magnitude=0.002), SVM(), SafetyNet(), DNN(width=0.1, epochs=1),
             DNR(C=1.0, gamma="scale"), Typicality()] + ([BU(passes=3)] if with_bu else [])  # fmt: skip
    assert {d.name for d in kinds} | ({"bu"} if not with_bu else set()) == set(DETECTORS)
    return kinds


def fit_and_save(model: torch.nn.Module, layers: list[str], root: Path, with_bu: bool = True) -> list[Path]:
    """Every detector kind fitted on ``model``'s ``layers`` (the last as a raw map), saved with its fingerprint and
    thresholds."""
    cache = FeatureCache(model, layers=layers, raw_layers=layers[-1:], batch_size=16)
    x, y = images(48, 1), np.arange(48) % 3
    clean, adversarial = cache.extract(x, y), cache.extract((x + 0.2 * images(48, 2)).clamp(0, 1), y)
    dirs = []
    for det in every_kind(with_bu):
        if isinstance(det, Typicality):  # mixtures per (layer, predicted class), the clean images as its reference
            reference = clean.subset(np.arange(len(clean)))
            reference.labels = clean.preds
            fit = lambda f, rows: GaussianMixture.fit(f[rows] if rows.sum() > 1 else f, 1, reg_covar=1e-2)  # noqa: E731
            mixtures = {n: [fit(clean.layer(n), clean.preds == c) for c in range(3)] for n in layers}
            det.set_reference(mixtures, reference)
        det.fit(cache, clean, adversarial)
        det.set_thresholds(det.score(clean))
        dirs.append(det.save(root / det.name, model=model))
    return dirs


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    model = tiny_model(0)
    checkpoint = save_checkpoint(root / "m.pt", model, {"input_size": [3, SIZE, SIZE]})
    model = load_model(checkpoint)
    dirs = fit_and_save(model, ["layer3.1.relu2", "layer4.1.relu2"], root / "detectors")
    onnx = export_onnx(checkpoint, root / "m.onnx", detectors=[Detector.load(d) for d in dirs])
    return model, checkpoint, onnx, dirs


def reference_scores(model, dirs, x):
    dets = [Detector.load(d) for d in dirs]
    layers = list(dict.fromkeys(n for d in dets for n in d.needs().pooled + d.needs().raw))
    cache = FeatureCache(model, layers=layers, raw_layers=[n for d in dets for n in d.needs().raw])
    feats = cache.extract(x)
    return {d.name: d.attach(cache).score(feats) for d in dets}


@pytest.mark.parametrize(
    "which,runtime", [("pt", "torch"), ("pt", "auto"), ("pt", "onnxruntime"), ("onnx", "auto"), ("onnx", "torch")]
)
def test_every_kind_scores_as_detector_score(fitted, which, runtime):
    model, checkpoint, onnx, dirs = fitted
    x = images(10, 3)
    want = reference_scores(model, dirs, x)
    scorer = Scorer(checkpoint if which == "pt" else onnx, dirs, runtime=runtime, batch_size=16)
    assert scorer.runtime == ("torch" if runtime == "torch" or (which, runtime) == ("pt", "auto") else "onnxruntime")
    got = scorer.score(x).scores
    assert set(got) == set(DETECTORS)
    exact = runtime == "torch" and which == "pt"  # else onnxruntime (model or DNN's nets), or a converted graph
    for name, scores in got.items():
        np.testing.assert_allclose(scores, want[name], rtol=0 if exact else 1e-3, atol=0 if exact else 1e-3)


def test_torchscript_model(fitted, tmp_path):
    model, _, _, _ = fitted
    path = tmp_path / "m.ts"
    torch.jit.trace(model, images(2, 0)).save(str(path))
    converted = load_model(path)
    layers = resolve_layers(converted, "activations")[-2:]  # the converted graph's layer names
    dirs = fit_and_save(converted, layers, tmp_path / "detectors", with_bu=False)
    x = images(10, 3)
    want = reference_scores(converted, dirs, x)
    got = Scorer(path, dirs).score(x).scores
    for name, scores in got.items():
        np.testing.assert_allclose(scores, want[name], rtol=1e-5, atol=1e-5)
    bu = BU(passes=3).fit(FeatureCache(model), images(8, 1), images(8, 2)).save(tmp_path / "bu", model=model)
    with pytest.raises(ValueError, match=r"^detector bu: needs MC-dropout passes but .* has no dropout layer"):
        Scorer(path, [bu])


def test_missing_outputs_and_other_models_are_one_line_errors(fitted, tmp_path):
    model, checkpoint, onnx, dirs = fitted
    plain = export_onnx(checkpoint, tmp_path / "plain.onnx", layers="layer4*")
    by_kind = {d.name: d for d in dirs}
    with pytest.raises(ValueError, match=r"raw map of layer 'layer4.1.relu2'.*--detectors.*--raw-features"):
        Scorer(plain, [by_kind["dnn"]])
    with pytest.raises(ValueError, match=r"MC-dropout passes.*--dropout"):
        Scorer(plain, [by_kind["bu"]])
    other = save_checkpoint(tmp_path / "other.pt", tiny_model(1), {"input_size": [3, SIZE, SIZE]})
    fitted_on = Detector.load(by_kind["kd"]).model_["fingerprint"]
    with pytest.raises(ValueError) as error:
        Scorer(other, [by_kind["kd"]])
    message = str(error.value)
    assert "\n" not in message and fitted_on in message and "--allow-model-mismatch" in message
    assert Scorer(other, [by_kind["kd"]], allow_model_mismatch=True).score(images(4, 3)).scores["kd"].shape == (4,)
    assert Scorer(onnx, [by_kind["kd"]]).model.fingerprint == fitted_on  # the export carries its source's


README_FLOW = {
    "name": "tiny",
    "datasets": [{"name": "fundus-synth", "task": "binary", "n": 300, "image_size": SIZE}],
    "model": {"width": 0.125, "epochs": 1, "batch_size": 32},
    "attacks": ["pgd"],
    "eps": ["8/256"],
    "attack": {"steps": 2, "pool": 60, "batch_size": 60},
    "hfc": {"enabled": False},
    "detector": {
        "bootstrap": 10,
        "train_limit": 60,
        "layers": "layer4*relu*",
        "raw_layers": 1,
        "lid": {"k": 5},
        "bu": {"passes": 3},
        "maha": {"select_max": 20, "magnitudes": [0.0, 0.002]},
        "dnn": {"epochs": 1},
        "dnr": {"C": 1.0, "gamma": "scale"},
    },  # fmt: skip
    "studies": [],
}


def test_a_corrupt_model_file_is_a_user_error(fitted, tmp_path):
    _, _, _, dirs = fitted
    corrupt = tmp_path / "m.onnx"
    corrupt.write_bytes(b"\x08\x09not onnx\xff\xff\xff")  # does not parse as an ONNX ModelProto
    with pytest.raises(UserError, match=rf"^{re.escape(repr(str(corrupt)))} is not a readable ONNX file"):
        score_dataset(corrupt, dirs[:1], ArrayDataset(images(2, 0), [0, 1]), tmp_path / "out.csv", progress=False)


def test_readme_export_then_score_flow(tmp_path, monkeypatch, capsys):
    """The README's commands, with its run directory replaced by a tiny audit's (every detector kind)."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**README_FLOW, "output_dir": str(tmp_path / "runs")}))
    assert main(["run", str(tmp_path / "tiny.yaml"), "--no-progress"]) == 0
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(D=.*|hfc-engine export --detectors \$D.*|hfc-engine score --model fundus.*)$", readme,
                          flags=re.M)  # fmt: skip
    assert commands[0].split()[0] == "D=runs/default/artifacts/detectors/fundus-synth_binary_*" and len(commands) == 4
    run = str(tmp_path / "runs" / "tiny")
    detectors = sorted(glob(f"{run}/artifacts/detectors/fundus-synth_binary_*"))
    assert len(detectors) == 7
    small = lambda spec, **options: ArrayDataset(images(40, 5), np.arange(40) % 2)  # noqa: E731 - a tiny data set
    monkeypatch.setattr(engine.commands, "load_dataset", small)
    monkeypatch.chdir(tmp_path)
    kinds = ["bu", "dnn", "dnr", "kd", "lid", "maha", "svm"]
    for command in commands[1:]:  # export, score by paths, then score by name (--select) into a fresh scores.csv
        (tmp_path / "scores.csv").unlink(missing_ok=True)
        argv = []
        for word in shlex.split(command.split("#")[0])[1:]:
            argv += detectors if word == "$D" else [run if word == "runs/default" else word]
        assert main([*argv, *(["--no-progress"] if argv[0] == "score" else [])]) == 0, command
        if argv[0] == "score":
            rows = pd.read_csv(tmp_path / "scores.csv")
            assert len(rows) == 40 and list(rows["index"]) == list(range(40))
            assert sorted(c.removeprefix("score_") for c in rows.columns if c.startswith("score_")) == kinds
            assert all(rows[f"flag_{k}@0.05"].dtype == bool for k in kinds)
            assert "model (onnxruntime)" in capsys.readouterr().out
    # the export of the README before: layer4's pooled features only; score says in one line what is missing
    model = str(fitted_checkpoint([entry.path for entry in locate(detectors)]))
    assert main(["export", "--model", model, "--out", "plain.onnx", "--layers", "layer4*"]) == 0
    capsys.readouterr()
    argv = ["score", "--model", "plain.onnx", "--detectors", *detectors, "--data", "fundus-synth:binary"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "hfc-engine export" in error


RESUME_JOB = """
import os, signal, sys
import numpy as np, torch
import engine.score
from engine.data import ArrayDataset

class Killing(ArrayDataset):
    def __getitem__(self, i):
        if i == 21:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(i)

engine.score.PART_ROWS = 8
x = torch.rand(40, 3, {size}, {size}, generator=torch.Generator().manual_seed(7))
engine.score.score_dataset(sys.argv[1], sys.argv[3:], Killing(x, np.arange(40) % 3), sys.argv[2], batch_size=4,
                           progress=False)
"""


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_resumed_job_after_kill_9_writes_the_same_file(fitted, tmp_path, monkeypatch, suffix):
    _, checkpoint, _, dirs = fitted
    dirs = [d for d in dirs if d.name in ("kd", "dnn", "svm")]  # resuming does not depend on the detectors
    script = tmp_path / "job.py"
    script.write_text(RESUME_JOB.format(size=SIZE))
    killed = tmp_path / f"killed{suffix}"
    job = [sys.executable, str(script), str(checkpoint), str(killed), *map(str, dirs)]
    assert (
        subprocess.run(job, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}).returncode
        == -signal.SIGKILL
    )
    parts = tmp_path / f".killed{suffix}.parts"
    assert len(list(parts.glob("part-*.parquet"))) == 2 and not killed.exists()  # rows 0-15 in two parts
    monkeypatch.setattr(engine.score, "PART_ROWS", 8)
    x = torch.rand(40, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    data = ArrayDataset(x, np.arange(40) % 3)
    summary = score_dataset(checkpoint, dirs, data, killed, batch_size=4, progress=False)  # the same job again
    assert summary.resumed == 16 and summary.rows == 40 and not parts.exists()
    whole = score_dataset(checkpoint, dirs, data, tmp_path / f"whole{suffix}", batch_size=4, progress=False)
    assert killed.read_bytes() == whole.output.read_bytes()


def test_a_different_job_on_the_same_output_is_refused(fitted, tmp_path):
    _, checkpoint, _, dirs = fitted
    parts = tmp_path / ".out.csv.parts"
    parts.mkdir()
    (parts / "job.json").write_text("{}")
    data = ArrayDataset(images(4, 0), np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="unfinished job with other settings"):
        score_dataset(checkpoint, dirs[:1], data, tmp_path / "out.csv", progress=False)


def test_detectors_without_thresholds_score_without_a_flag(fitted, tmp_path):
    _, checkpoint, _, dirs = fitted
    old = Detector.load(next(d for d in dirs if d.name == "kd"))
    old.thresholds_, old.clean_scores_ = {}, None  # saved before thresholds were recorded
    data = ArrayDataset(images(4, 0), np.zeros(4, dtype=np.int64))
    with pytest.warns(UserWarning, match=r"\['kd'\] record no thresholds"):
        score_dataset(checkpoint, [old.save(tmp_path / "kd")], data, tmp_path / "out.csv", progress=False)
    assert "score_kd" in (columns := list(pd.read_csv(tmp_path / "out.csv").columns)) and "flag_kd" not in columns


# -- output for auditors, resume state, checks before work ---------------------------------------------------------


def image_folder(root: Path, per_class: int, size: int = SIZE, seed: int = 0) -> Path:
    """``root/<class>/<i>.png`` for classes a, b, c: random RGB images of ``size`` px."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


class Failing(ArrayDataset):
    """A data set whose image ``fail_at`` raises: a job stopped part-way (its finished parts stay)."""

    fail_at = 21

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("stopped")
        return super().__getitem__(i)


def test_path_class_name_and_flag_columns_with_recorded_thresholds(fitted, tmp_path):
    _, checkpoint, _, dirs = fitted
    kd, svm = (next(d for d in dirs if d.name == k) for k in ("kd", "svm"))
    data = load_dataset(f"image_folder:{image_folder(tmp_path / 'data', 3)}")
    summary = score_dataset(checkpoint, [kd, svm], data, tmp_path / "out.csv", fpr=[0.1, 0.3], progress=False)
    rows = pd.read_csv(tmp_path / "out.csv")
    assert list(rows.columns[:6]) == ["index", "path", "label", "label_name", "prediction", "prediction_name"]
    assert list(rows["path"]) == data.paths and list(rows["label_name"]) == [data.classes[k] for k in data.targets]
    assert list(rows["prediction_name"]) == [data.classes[k] for k in rows["prediction"]]
    record = json.loads(summary.thresholds_file.read_text())
    assert summary.thresholds_file == tmp_path / "out.thresholds.json"
    assert [(t["detector"], t["fpr"]) for t in record["thresholds"]] == [
        (d, f) for d in ("kd", "svm") for f in (0.1, 0.3)
    ]
    for t in record["thresholds"]:
        clean = Detector.load(kd if t["detector"] == "kd" else svm).clean_scores_
        assert t["value"] == fpr_threshold(clean, t["fpr"]) and t["images"] == len(clean) == 48
        assert t["flagged"] == int((clean > t["value"]).sum()) and t["realised_fpr"] == t["flagged"] / 48
        assert t["calibration"] == "fit" and (t["warning"] is None) == (t["fpr"] == 0.3)  # 10% needs 100 images
        flags = rows[f"flag_{t['detector']}@{t['fpr']:g}"]
        assert (flags == (rows[f"score_{t['detector']}"] > t["value"])).all()


def test_thresholds_realised_rate_and_exact_interval():
    clean = np.random.default_rng(0).normal(size=77)
    fit = Reference("fit", "fit", None, len(clean), clean)
    for fpr in (0.013, 0.05, 0.1, 0.37):
        threshold = fit.threshold("kd", fpr)
        k = int((clean > threshold.value).sum())
        assert threshold.flagged == k and k <= fpr * 77 < k + 1  # at most fpr of the clean images flagged
        want = binomtest(k, 77).proportion_ci(0.95, method="exact")
        assert threshold.ci_low == pytest.approx(want.low, abs=1e-12) and threshold.ci_high == pytest.approx(want.high)
        assert threshold.ci_high == pytest.approx(beta.ppf(0.975, k + 1, 77 - k))
    assert binomial_ci(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10)))  # the exact form at k = 0
    assert (
        "fewer than 10" in fit.threshold("kd", 0.05).warning and "200 clean images" in fit.threshold("kd", 0.05).warning
    )
    assert fit.threshold("kd", 0.2).warning is None  # 77 * 0.2 = 15.4 expected flags
    with pytest.raises(ThresholdError, match=r"fpr must be one or more rates in \(0, 1\)"):
        check_fprs([0.05, 1.0])


def test_a_rerun_on_other_data_or_another_model_file_is_refused(fitted, tmp_path, monkeypatch):
    _, checkpoint, _, dirs = fitted
    kd = next(d for d in dirs if d.name == "kd")
    monkeypatch.setattr(engine.score, "PART_ROWS", 8)
    out = tmp_path / "out.csv"
    data_a = Failing(images(40, 7), np.arange(40) % 3)
    with pytest.raises(RuntimeError, match="stopped"):
        score_dataset(checkpoint, [kd], data_a, out, batch_size=4, progress=False)
    assert len(list((tmp_path / ".out.csv.parts").glob("part-*.parquet"))) == 2  # rows 0-15 kept
    data_b = ArrayDataset(images(40, 8), np.arange(40) % 3)  # same length, other images
    with pytest.raises(ResumeError) as refused:
        score_dataset(checkpoint, [kd], data_b, out, batch_size=4, progress=False)
    message = str(refused.value)
    assert "\n" not in message and "data_fingerprint" in message and "model" not in message.split("(")[1]
    assert "delete '" in message and ".out.csv.parts' to start over" in message
    relabelled = ArrayDataset(images(40, 7), np.arange(40) % 2)  # same images, other labels
    with pytest.raises(ResumeError, match="data_fingerprint"):
        score_dataset(checkpoint, [kd], relabelled, out, batch_size=4, progress=False)
    resaved = save_checkpoint(tmp_path / "m.pt", load_model(checkpoint), {"input_size": [3, SIZE, SIZE], "note": 1})
    with pytest.raises(ResumeError, match=r"\(model_sha256 .*\): rerun that job"):
        score_dataset(resaved, [kd], data_a, out, batch_size=4, progress=False)
    Failing.fail_at = -1
    summary = score_dataset(checkpoint, [kd], data_a, out, batch_size=4, progress=False)  # the same job resumes
    assert summary.resumed == 16 and summary.rows == 40


def test_images_of_another_size_than_the_fit_are_refused_before_work(fitted, tmp_path, monkeypatch, capsys):
    _, checkpoint, _, dirs = fitted
    kd = next(d for d in dirs if d.name == "kd")
    assert Detector.load(kd).input_size_ == (3, SIZE, SIZE)
    big = ArrayDataset(torch.rand(6, 3, 2 * SIZE, 2 * SIZE), np.zeros(6, dtype=np.int64))
    with pytest.raises(ScoreError, match=rf"fitted on \(3, {SIZE}, {SIZE}\): score --image-size {SIZE}, or pass"):
        score_dataset(checkpoint, [kd], big, tmp_path / "out.csv", progress=False)
    assert not any(tmp_path.iterdir())  # nothing written
    allowed = score_dataset(checkpoint, [kd], big, tmp_path / "out.csv", progress=False, allow_size_mismatch=True)
    assert allowed.rows == 6
    folder = image_folder(tmp_path / "data", 2)
    argv = ["score", "--model", str(checkpoint), "--detectors", str(kd), "--data", f"image_folder:{folder}",
            "--out", str(tmp_path / "cli.csv"), "--no-progress"]  # fmt: skip
    assert main([*argv, "--image-size", str(2 * SIZE)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--allow-size-mismatch" in line and not (tmp_path / ".cli.csv.parts").exists()
    assert main([*argv, "--image-size", str(SIZE)]) == 0 and len(pd.read_csv(tmp_path / "cli.csv")) == 6


@pytest.mark.parametrize("where", ["directory", "under a file", "suffix"])
def test_an_output_that_cannot_be_written_is_refused_before_the_data_is_read(
    fitted, tmp_path, monkeypatch, capsys, where
):
    _, checkpoint, _, dirs = fitted
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "file").write_text("")
    out = {"directory": tmp_path / "dir.csv", "under a file": tmp_path / "file" / "out.csv",
           "suffix": tmp_path / "out.txt"}[where]  # fmt: skip

    def unread(spec, **options):
        raise AssertionError("the data was read")

    monkeypatch.setattr(engine.commands, "load_dataset", unread)
    argv = ["score", "--model", str(checkpoint), "--detectors", str(dirs[0]), "--data", "x", "--out", str(out)]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"hfc-engine: error: out: {str(out)!r}")
    with pytest.raises(ScoreError, match="^out: "):
        score_dataset(checkpoint, dirs[:1], ArrayDataset(images(2, 0), [0, 1]), out, progress=False)
