"""End-to-end audits: the CLI on a tiny config, resume after a simulated crash, and engine.audit() in memory."""

import sqlite3

import numpy as np
import pandas as pd
import pytest
import torch

from engine import audit
from engine.cli import main
from engine.data import ArrayDataset
from engine.models import build_model
from engine.runs import ROW_COLUMNS, STAGES

TINY = """
name: tiny
output_dir: {out}
datasets: [{{name: fundus-synth, task: binary, n: 800, image_size: 32}}]
model: {{epochs: 4, width: 0.125, batch_size: 32}}
attacks: [pgd]
eps: ["8/256"]
attack: {{steps: 3, pool: 160, batch_size: 80}}
hfc: {{layers: "layer4*relu*", n_components: 1, lam: 0.1, steps: 3}}
detectors: [kd, lid]
detector: {{bootstrap: 20}}
studies: []
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY.format(out=root / "runs"))
    assert main(["run", str(cfg), "--no-progress"]) == 0
    return cfg, root / "runs" / "tiny"


@pytest.mark.slow
def test_cli_run_writes_results_card_and_report(tiny_run):
    _, run_dir = tiny_run
    frame = pd.read_csv(run_dir / "results.csv")
    assert list(frame.columns) == list(ROW_COLUMNS)
    assert pd.read_parquet(run_dir / "results.parquet").shape == frame.shape
    det = frame[frame["detector"].isin(["kd", "lid"]) & (frame["metric"] == "auroc")]
    det = det[det["subset"] == "successful"]
    assert set(det["hfc"]) == {True, False} and det["value"].between(0, 1).all()
    assert (det["ci_low"] <= det["value"] + 1e-12).all() and (det["value"] <= det["ci_high"] + 1e-12).all()
    asr = frame[frame["metric"] == "attack_success_rate"]
    assert len(asr) == 4 and asr["value"].between(0, 1).all()  # plain, HFC, HFC weight 0, adaptive HFC
    assert ((asr["ci_low"] <= asr["value"]) & (asr["value"] <= asr["ci_high"])).all()
    assert (asr["value"] == asr["n_pos"] / (asr["n_pos"] + asr["n_neg"])).all()
    assert det["n_pos"].gt(0).all() and det["n_neg"].gt(0).all() and (det["ci_level"] == 0.95).all()
    html = (run_dir / "report.html").read_text()
    for needle in (
        "Detection on fundus-synth:binary",
        "HFC change",
        "HFC w0",
        "Defence table",
        "Diagnostics on fundus-synth:binary",
        "AUROC plain",
        "ROC curves",
        "data:image/png;base64",
        "Where adversarial features lie",
        "Verdicts",
        "Plain AEs are easy to detect",
        "Run card",
    ):
        assert needle in html
    card = (run_dir / "run_card.json").read_text()
    assert '"seconds_per_stage"' in card and '"git_commit"' in card


@pytest.mark.slow
def test_resume_after_crash_recomputes_only_missing_cells(tiny_run):
    cfg, run_dir = tiny_run
    before = pd.read_csv(run_dir / "results.csv")
    lost = "detect"
    assert lost in STAGES
    db = sqlite3.connect(run_dir / "store.sqlite")
    finished = dict(db.execute("SELECT key, finished FROM cells"))
    deleted = {key for (key,) in db.execute("SELECT key FROM cells WHERE stage = ?", (lost,))}
    assert deleted and len(deleted) < len(finished)
    with db:  # simulate a crash before the detect cells committed
        db.execute("DELETE FROM rows WHERE cell IN (SELECT key FROM cells WHERE stage = ?)", (lost,))
        db.execute("DELETE FROM cells WHERE stage = ?", (lost,))
    db.close()
    assert main(["run", str(cfg), "--no-progress"]) == 0
    db = sqlite3.connect(run_dir / "store.sqlite")
    after_cells = dict(db.execute("SELECT key, finished FROM cells"))
    db.close()
    assert after_cells.keys() == finished.keys()
    recomputed = {key for key, t in after_cells.items() if finished.get(key) != t}
    assert recomputed == deleted
    after = pd.read_csv(run_dir / "results.csv")
    key = ["dataset", "seed", "attack", "eps", "hfc", "variant", "arm", "detector", "metric", "subset", "layer"]
    pd.testing.assert_frame_equal(
        before.sort_values(key).reset_index(drop=True), after.sort_values(key).reset_index(drop=True)
    )
    assert not after.duplicated(key).any()


def test_config_error_is_one_line_and_exit_2(capsys):
    assert main(["run", "hfc.mode=exact", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'hfc.mode' must be one of ['nearest', 'loglik', 'typical'], got 'exact'" in err
    with pytest.raises(ValueError, match=r"'hfc.mode' must be one of \[.*\], got 'exact'"):
        main(["run", "hfc.mode=exact", "--no-progress", "--debug"])


@pytest.mark.slow
def test_study_command_runs_a_study_with_overrides(tmp_path, monkeypatch):
    import yaml

    from engine.runs.studies import STRESS_TINY

    monkeypatch.chdir(tmp_path)
    overrides = [f"{key}={yaml.safe_dump(val, default_flow_style=True).strip()}" for key, val in STRESS_TINY.items()]
    assert main(["study", "stress", *overrides, "--no-progress"]) == 0
    frame = pd.read_csv(tmp_path / "runs" / "study-stress" / "results.csv")
    assert frame.loc[frame["metric"] == "feature_deviation", "layer"].notna().all()
    assert "Stress test" in (tmp_path / "runs" / "study-stress" / "report.html").read_text()


@pytest.mark.slow
def test_audit_api_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    images = rng.uniform(0.3, 0.5, size=(400, 3, 16, 16)).astype(np.float32)
    images[labels == 1, :, 4:12, 4:12] += 0.4  # class 1: a bright square
    dataset = ArrayDataset(images, labels, ["normal", "lesion"], "squares")
    torch.manual_seed(0)
    model = build_model("resnet18", 2, width=0.125, small_stem=True, input_size=16)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(15):  # a briefly trained model: both classes predicted, attacks can flip them
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    report = audit(
        model,
        dataset,
        attacks=["pgd"],
        detectors=["maha"],
        hfc={"enabled": False, "layers": "layer4*relu*"},
        eps=["32/256"],
        attack={"steps": 10, "pool": 60},
        run_dir=tmp_path / "api",
    )
    assert (tmp_path / "api" / "report.html").exists()
    table = report.table()
    assert "AUROC plain" in table.columns
    out = report.to_csv(tmp_path / "rows.csv")
    assert len(pd.read_csv(out)) == len(report.rows) > 0
