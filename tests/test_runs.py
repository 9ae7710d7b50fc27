"""Run machinery: config loading/overrides/errors, the SQLite store, cell execution, the ETA and crash-resume."""

import contextlib
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from engine.detectors.evaluate import SUBSETS
from engine.metrics.roc import METRICS
from engine.runs import Cell, CellOutput, ConfigError, LocalExecutor, ResultStore, Stage, load_config, topological
from engine.runs.progress import CostModel
from engine.runs.schema import Metric, Subset, row
from engine.runs.store import StoreError


def test_defaults_and_dotted_override(tmp_path):
    cfg = load_config(overrides=["attack.steps=40", "eps=['1/256']", "datasets.0.n=50"])
    assert cfg["attack"]["steps"] == 40
    assert cfg["eps"] == ["1/256"]
    assert cfg["datasets"][0]["n"] == 50
    path = tmp_path / "c.yaml"
    path.write_text("attacks: [pgd]\nhfc: {mode: loglik}\n")
    cfg = load_config(path, overrides=["hfc.lam=0.5"])
    assert cfg["attacks"] == ["pgd"] and cfg["hfc"]["mode"] == "loglik" and cfg["hfc"]["lam"] == 0.5
    assert cfg["detectors"] == ["kd", "bu", "lid", "maha", "svm", "dnn", "dnr", "typicality"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["attack.stepz=3"], "unknown config key 'attack.stepz'; allowed: ['batch_size', 'bim'"),
        (["attacks=[pgd, deepfool]"], "'attacks.1' must be one of ['fgsm'"),
        (["detectors=[kd, odin]"], "'detectors.1' must be one of ['kd'"),
        (["attack.pgd.stepz=3"], "unknown config key 'attack.pgd.stepz'; allowed: ["),
        (["detector.dnn.widht=3"], "unknown config key 'detector.dnn.widht'; allowed: ["),
        (["split.test=1.5"], "'split.test' must be a finite number >= 0 and < 1, got 1.5"),
        (["hfc.mode=exact"], "'hfc.mode' must be one of ['nearest', 'loglik'"),
        (["attack.steps=0"], "'attack.steps' must be an integer >= 1, got 0"),
        (["steps"], "must look like key.sub=value"),
        (["datasets.5.n=3"], "config key 'datasets.5': '5' is not an index of the list"),
        # executor settings (docs/clusters.md): checked at load, Ray or not
        (["resources.model.threads=2"], "unknown config key 'resources.model.threads'; allowed: ['cpus', 'gpus'"),
        (["resources.attack.gpus=-1"], "'resources.attack.gpus' must be a finite number >= 0"),
        (["resources.attack.cpus=0"], "'resources.attack.cpus' must be a finite number > 0"),
        (["ray.retries=-1"], "'ray.retries' must be an integer >= 0"),
        (["ray.cpus=1.5"], "'ray.cpus' must be an integer >= 1 or null"),
        (["artifacts=3"], "'artifacts' must be a string or null"),
        (["resources.trainig.cpus=1"], "unknown config key 'resources.trainig'; allowed: ['attack', 'calibrate'"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(overrides=overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {arch: alexnet}\n")
    with pytest.raises(ConfigError, match="'model.arch' must be one of"):
        load_config(bad)


CALLS = []


def _square(context, inputs, deps):
    CALLS.append(inputs["x"])
    base = sum(p["value"] for p in deps.values())
    value = inputs["x"] ** 2 + base
    return CellOutput({"value": value}, [{"metric": "square", "value": value, "eps": inputs["x"], "hfc": True}])


STAGES = {"sq": Stage("sq", _square, lambda cell, machine: ("sq", 1.0))}


def _run(cells, store):
    costs = CostModel({c.key: STAGES[c.stage].cost(c, None) for c in cells})
    return LocalExecutor(progress=False).run(cells, store, None, STAGES, costs)


def test_store_commit_resume_and_rows(tmp_path):
    a = Cell("sq", {"x": 2})
    b = Cell("sq", {"x": 3}, deps=(a.key,))
    with ResultStore(tmp_path) as store:
        _run([b, a], store)
        assert store.payload(b.key) == {"value": 13}
        rows = store.rows()
        assert store.rows([b.key]) == rows[1:]
    assert [r["value"] for r in rows] == [4.0, 13.0]
    assert rows[0]["hfc"] is True and rows[0]["eps"] == "2"
    assert sorted(CALLS) == [2, 3]
    CALLS.clear()
    with ResultStore(tmp_path) as store:  # re-run: nothing recomputed
        _run([a, b], store)
        store.commit(a.key, "sq", {"value": 4}, [{"metric": "square", "value": 4}])  # replace, not duplicate
        assert len(store.rows()) == 2
    assert CALLS == []


def test_topological_errors():
    a = Cell("sq", {"x": 1}, deps=("nope",))
    with pytest.raises(ValueError, match="unknown cell nope"):
        topological([a])


def test_cost_model_refines_from_finished_cells():
    estimates = {"a": ("model", 10.0), "b": ("model", 10.0), "c": ("attack", 2.0), "d": ("attack", 2.0)}
    costs = CostModel({**estimates, "x": ("data", 5.0)})
    assert costs.remaining(["a", "b", "c", "d"]) == pytest.approx(24.0)
    costs.finished("x", 0.5)  # a cached dataset loads fast: says nothing about the compute classes
    assert costs.remaining(["a", "b", "c", "d"]) == pytest.approx(24.0)
    costs.finished("a", 30.0)  # the model class runs 3x slower than estimated; unseen classes follow the median
    assert costs.remaining(["b", "c", "d"]) == pytest.approx(30.0 + 3 * 4.0)
    costs.finished("c", 1.0)  # the attack class has its own factor now
    assert costs.remaining(["b", "d"]) == pytest.approx(30.0 + 1.0)
    assert costs.remaining(["b", "d"], running="b", running_for=25.0) == pytest.approx(5.0 + 1.0)


def test_row_columns_are_checked(tmp_path):
    with ResultStore(tmp_path) as store, pytest.raises(ValueError, match="unknown columns"):
        store.commit("k", "s", {}, [{"metric": "m", "colour": 1}])


def test_row_takes_a_metric_of_the_vocabulary_and_fills_the_tidy_columns():
    found = row(Metric.AUROC, 0.9, subset=Subset.PAIRED, eps="8/256", ci_low=0.8, ci_high=0.95, n_neg=40, n_pos=12)
    assert (found["metric"], found["subset"], found["eps_value"]) == ("auroc", "paired", 0.03125)
    assert found["ci_level"] == 0.95
    assert type(found["metric"]) is str and type(found["subset"]) is str  # plain text, as read back from the store
    assert (found["n_neg"], found["n_pos"]) == (40, 12)
    assert math.isnan(row("hfc_lam", 0.1)["ci_level"])  # no interval, no level
    assert math.isnan(row("hfc_lam", 0.1, ci_low=float("nan"), ci_high=float("nan"))["ci_level"])
    with pytest.raises(ValueError, match="unknown metric 'auroc@paired'; allowed: \\['clean_loss'"):
        row("auroc@paired", 0.9)


def test_rows_of_the_constructor_get_their_cells_seed(tmp_path):
    def rate(context, inputs, deps):
        return CellOutput({}, [row(Metric.ATTACK_SUCCESS_RATE, 0.5), row(Metric.HFC_LAM, 0.1, seed=9)])

    stages = {"rate": Stage("rate", rate, lambda cell, machine: ("rate", 1.0))}
    cell = Cell("rate", {"seed": 3})
    with ResultStore(tmp_path) as store:
        LocalExecutor(progress=False).run([cell], store, None, stages, CostModel({cell.key: ("rate", 1.0)}))
        assert [r["seed"] for r in store.rows()] == [3, 9]  # a row's own seed wins


def test_the_vocabulary_names_every_metric_and_subset_of_the_detection_protocol():
    assert {*METRICS, "auroc_reversed"} <= set(Metric)
    assert {*SUBSETS, "paired", "change"} == set(Subset)


def test_an_old_store_is_migrated_to_the_tidy_columns(tmp_path):
    db = sqlite3.connect(tmp_path / "store.sqlite")  # the rows table before seed, variant, arm and the tidy columns
    db.executescript(
        """
        CREATE TABLE cells (key TEXT PRIMARY KEY, stage TEXT NOT NULL, payload TEXT NOT NULL, seconds REAL NOT NULL,
                            finished REAL NOT NULL);
        CREATE TABLE rows (cell TEXT NOT NULL, dataset TEXT, model TEXT, attack TEXT, eps TEXT, hfc INTEGER,
                           detector TEXT, metric TEXT NOT NULL, value REAL, ci_low REAL, ci_high REAL);
        INSERT INTO cells VALUES ('k', 'detect', '{}', 1.0, 0.0);
        INSERT INTO rows VALUES ('k', 'd', 'm', 'pgd', '8/256', 1, 'kd', 'auroc@paired', 0.7, 0.6, 0.8);
        INSERT INTO rows VALUES ('k', 'd', 'm', 'pgd', '8/256', 1, 'kd', 'auroc_change', -0.2, -0.3, -0.1);
        INSERT INTO rows VALUES ('k', 'd', 'm', 'pgd', '8/256', 0, 'kd', 'auroc', 0.9, 0.8, 1.0);
        INSERT INTO rows VALUES ('k', 'd', 'm', '', NULL, 0, '', 'feature_loglik@layer1.0.relu@0', -3.0, NULL, NULL);
        INSERT INTO rows VALUES ('k', 'd', 'm', 'pgd', '8/256', 0, '', 'diag_loglik@noise', -4.0, NULL, NULL);
        INSERT INTO rows VALUES ('k', 'd', 'r18', 'pgd', '2/256', 0, '', 'feature_deviation_all@relu', 0.1, 0.0, 0.2);
        INSERT INTO rows VALUES ('k', 'd', 'all', '', NULL, 0, '', 'kappa_gain_mean_unseen_norm', 0.1, 0.0, 0.2);
        INSERT INTO rows VALUES ('k', 'd', 'ft', '', NULL, 0, '', 'tost_p_clean_kappa_seeds', 0.01, NULL, NULL);
        INSERT INTO rows VALUES ('k', 'd', 'ft', '', NULL, 0, '', 'tost_p_clean_kappa', 0.02, NULL, NULL);
        """
    )
    db.close()
    with ResultStore(tmp_path, readonly=True) as store:  # read as it is (`runs show`), upgraded row by row
        unmigrated = store.rows()
    assert "subset" not in {r[1] for r in sqlite3.connect(tmp_path / "store.sqlite").execute("PRAGMA table_info(rows)")}
    with ResultStore(tmp_path) as store:
        rows = store.rows()
    assert unmigrated == rows
    assert [(r["metric"], r["subset"], r["layer"]) for r in rows] == [
        ("auroc", "paired", None),
        ("auroc", "change", None),
        ("auroc", "successful", None),
        ("feature_loglik", None, "layer1.0.relu@0"),
        ("diag_loglik", "noise", None),
        ("feature_deviation", "all", "relu"),
        ("kappa_gain_mean", "unseen_norm", None),
        ("tost_p_clean_kappa", "seeds", None),
        ("tost_p_clean_kappa", "folds", None),
    ]
    assert rows[0]["eps_value"] == 1 / 32 and rows[0]["ci_level"] == 0.95 and math.isnan(rows[3]["ci_level"])
    assert rows[0]["seed"] is None and rows[0]["n_pos"] is None  # counts the old rows never had
    with ResultStore(tmp_path) as store:  # opening a migrated store again changes nothing
        assert store.rows() == rows


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from engine.runs import Cell, CellOutput, LocalExecutor, ResultStore, Stage
    from engine.runs.progress import CostModel

    def slow(context, inputs, deps):
        time.sleep(0.05)
        return CellOutput({"i": inputs["i"]}, [{"metric": "m", "value": inputs["i"]}])

    cells = [Cell("slow", {"i": i}) for i in range(40)]
    stages = {"slow": Stage("slow", slow, lambda cell, machine: ("slow", 0.05))}
    with ResultStore(sys.argv[1]) as store:
        costs = CostModel({c.key: ("slow", 0.05) for c in cells})
        LocalExecutor(progress=False).run(cells, store, None, stages, costs)
    """
)


@pytest.mark.slow  # a killed subprocess run and its resume
def test_kill_9_loses_at_most_the_cell_in_flight(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until some, not all, cells are committed
        with contextlib.suppress(StoreError), ResultStore(run_dir, readonly=True) as store:  # absent, or being created
            if 5 <= len(store.cells()) < 40:
                break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with ResultStore(run_dir) as store:
        done_before = len(store.cells())
        assert 0 < done_before < 40
        assert len(store.rows()) == done_before  # every committed cell has exactly its rows
    subprocess.run([sys.executable, str(script), str(run_dir)], env=env, check=True)
    with ResultStore(run_dir) as store:
        rows = store.rows()
        assert sorted(r["value"] for r in rows) == list(range(40))  # no duplicates, nothing missing


def test_each_cell_returns_its_freed_memory_to_the_os(monkeypatch):
    import engine.runs.executor as executor

    trims = []
    monkeypatch.setattr(executor, "release_free_memory", lambda: trims.append(1))
    out, _ = executor.run_cell(STAGES["sq"].run, None, {"x": 3, "seed": 0}, {})
    assert out.payload["value"] == 9 and trims == [1]

    def fails(context, inputs, deps):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        executor.run_cell(fails, None, {"x": 3}, {})
    assert trims == [1, 1]  # a cell that raises is trimmed after too (a resumed run goes on in this process)
