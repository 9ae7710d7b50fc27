"""The catalog of a run's fitted detectors: keys, AUROC from the run's records, selection, the CLI."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import yaml

import engine.commands
import engine.score
from engine.cli import main
from engine.runs import ResultStore
from engine.runs.catalog import CatalogError, Located, catalog, locate, select
from engine.runs.schema import Metric, Subset, row

TINY = {
    "name": "tiny",
    "datasets": [{"name": "fundus-synth", "task": "binary", "n": 300, "image_size": 32}],
    "model": {"width": 0.125, "epochs": 1, "batch_size": 32},
    "models": [{"name": "small"}, {"name": "wide", "width": 0.25}],
    "attacks": ["pgd"],
    "eps": ["8/256"],
    "attack": {"steps": 2, "pool": 45, "batch_size": 45},
    "hfc": {"n_components": 1, "lam": 0.1, "steps": 2, "fixed_weights": []},
    "detectors": ["kd", "lid"],
    "detector": {"bootstrap": 200, "train_limit": 60, "lid": {"k": 5}, "arms": None},
    "studies": [],
}
KEY = "fundus-synth_binary/{model}/pgd/8-256/{detector}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(root / "runs")}))
    assert main(["run", str(config), "--no-progress"]) == 0
    return root / "runs" / "tiny"


def test_runs_show_lists_every_fitted_detector_with_the_reports_auroc(run_dir, capsys):
    capsys.readouterr()
    assert main(["runs", "show", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = pd.read_csv(run_dir / "results.csv")
    auroc = rows[(rows["metric"] == "auroc") & (rows["subset"] == "successful")]
    entries = catalog(run_dir)
    assert sorted(e.key for e in entries) == sorted(
        KEY.format(model=m, detector=d) for m in ("small", "wide") for d in ("kd", "lid")
    )
    for entry in entries:
        assert (entry.path / "config.json").is_file()
        for hfc, shown in ((False, entry.auroc), (True, entry.auroc_hfc)):
            (value,) = auroc[(auroc["model"] == entry.model) & (auroc["detector"] == entry.detector)
                             & (auroc["hfc"] == hfc) & auroc["variant"].isna()]["value"]  # fmt: skip
            assert shown.value == pytest.approx(value) and shown.ci_low <= shown.value <= shown.ci_high
        (line,) = [line for line in lines if line.startswith(entry.key + " ")]
        assert f"{entry.auroc.value:.3f}" in line and str(entry.path) in line


def test_select_by_pattern(run_dir):
    assert [e.key for e in select(run_dir, "fundus*/*/pgd/8-256/kd")] == [
        KEY.format(model="small", detector="kd"),
        KEY.format(model="wide", detector="kd"),
    ]
    assert {e.model for e in select(run_dir, "fundus*/pgd/8-256/*")} == {"small", "wide"}  # '*' spans parts
    assert [e.detector for e in select(run_dir, "*/wide/*")] == ["kd", "lid"]


class Scored(Exception):
    """Raised by the stand-in for score_dataset with the detector directories it was given."""


def test_score_resolves_a_run_through_the_catalog(run_dir, monkeypatch):
    def scorer(model, detectors, names, **options):
        raise Scored(detectors, names)

    monkeypatch.setattr(engine.commands, "load_dataset", lambda spec, **options: spec)
    monkeypatch.setattr(engine.score, "Scorer", scorer)
    argv = ["score", "--model", "m.pt", "--data", "fundus-synth", "--detectors", str(run_dir), "--select", "*/lid"]
    argv.append("--debug")  # let the probe exception through
    with pytest.raises(Scored) as scored:
        main(argv)
    entries = select(run_dir, "*/lid")
    assert scored.value.args[0] == [e.path for e in entries]
    assert scored.value.args[1] == [e.key.replace("/", "_") for e in entries]  # two lid: named by their keys


def test_detector_directories_inside_a_run_get_their_keys(run_dir, tmp_path):
    entries = catalog(run_dir)
    found = locate([e.path for e in entries])
    assert [(f.path, f.key) for f in found] == [(e.path, e.key) for e in entries]
    assert locate([run_dir / "artifacts" / "detectors"]) == sorted(found, key=lambda f: f.path)  # searched
    loose = tmp_path / "copy"
    shutil.copytree(entries[0].path, loose)
    assert locate([loose]) == [Located(loose, None)]  # outside a run: no key
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="no fitted detector"):
        locate([tmp_path / "empty"])
    with pytest.raises(CatalogError, match="--select 'x' picks detectors of a run directory"):
        locate([loose], "x")


@pytest.mark.parametrize("command", ["show", "score"])
def test_a_pattern_matching_nothing_is_one_line(run_dir, capsys, command):
    argv = {
        "show": ["runs", "show", str(run_dir)],
        "score": ["score", "--model", "m.pt", "--data", "fundus-synth", "--detectors", str(run_dir)],
    }[command]
    assert main([*argv, "--select", "*/fgsm/*"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "matches '*/fgsm/*'" in line and KEY.format(model="small", detector="kd") in line


def test_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["runs", "show", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "is not a run directory" in line
    assert not (tmp_path / "store.sqlite").exists()


def test_a_rerun_with_another_config_lists_only_its_detectors(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "runs" / "tiny")  # a moved run directory keeps working
    config = tmp_path / "kd.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs"), "detectors": ["kd"]}))
    assert len(catalog(tmp_path / "runs" / "tiny")) == 4
    assert main(["run", str(config), "--no-progress"]) == 0
    assert {e.detector for e in catalog(tmp_path / "runs" / "tiny")} == {"kd"}


def _detect_cell(store, key: str, eps: str | None, model: str = "resnet18") -> None:
    identity = {"dataset": "cxr-synth", "model": model, "attack": "cw_l2", "eps": eps, "detector": "kd"}
    rows = [row(Metric.AUROC, 0.9, subset=Subset.SUCCESSFUL, hfc=False, ci_low=0.8, ci_high=1.0, **identity)]
    store.commit(key, "detect", {"fitted": f"detectors/{key[-1]}/fitted"}, rows)


def test_a_store_without_a_plan_lists_every_detect_cell_and_refuses_shared_keys(tmp_path):
    with ResultStore(tmp_path) as store:
        _detect_cell(store, "detect:a", None)
        _detect_cell(store, "detect:b", "8/256")
    (none, budget) = catalog(tmp_path)
    assert none.key == "cxr-synth/resnet18/cw_l2/none/kd" and str(none.auroc) == "0.900 [0.800, 1.000]"
    assert budget.key == "cxr-synth/resnet18/cw_l2/8-256/kd" and budget.auroc_hfc is None
    assert budget.path == tmp_path / "artifacts" / "detectors" / "b" / "fitted"
    with ResultStore(tmp_path) as store:
        _detect_cell(store, "detect:c", "8/256")  # e.g. two models of one run with the same name
    with pytest.raises(ValueError, match="both 'cxr-synth/resnet18/cw_l2/8-256/kd'"):
        catalog(tmp_path)
