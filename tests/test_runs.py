"""Run machinery: config loading/overrides/errors, the SQLite store, cell execution, the ETA and crash-resume."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from engine.runs import Cell, CellOutput, ConfigError, LocalExecutor, ResultStore, Stage, load_config, topological
from engine.runs.progress import CostModel
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
        (["attacks=[pgd, deepfool]"], "'attacks' has value 'deepfool'; allowed: ['fgsm'"),
        (["detectors=[kd, odin]"], "'detectors' has value 'odin'; allowed: ['kd'"),
        (["attack.pgd.stepz=3"], "'attack.pgd' has unknown options ['stepz']"),
        (["detector.dnn.widht=3"], "'detector.dnn' has unknown options ['widht']"),
        (["split.test=1.5"], "'split.test' must be a fraction"),
        (["hfc.mode=exact"], "'hfc.mode' has value 'exact'; allowed: ['nearest', 'loglik'"),
        (["attack.steps=0"], "'attack.steps' must be a positive integer"),
        (["steps"], "must look like key.sub=value"),
        (["datasets.5.n=3"], "unknown config key 'datasets.5'"),
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
    with pytest.raises(ConfigError, match="'model.arch' has value 'alexnet'"):
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


def test_every_config_key_is_documented():
    """docs/runs.md has a row for every key of the defaults (per-method option mappings as `<attack>` etc.)."""
    from pathlib import Path

    from engine.attacks import ATTACKS
    from engine.detectors import DETECTORS
    from engine.runs import DEFAULTS

    doc = (Path(__file__).resolve().parent.parent / "docs" / "runs.md").read_text()
    methods = {name: "<attack>" for name in ATTACKS} | {name: "<detector>" for name in DETECTORS}

    def keys(node, prefix=""):
        for key, value in node.items():
            dotted = prefix + key
            if isinstance(value, dict) and value and key not in ("study", "options", "arms"):
                yield from keys(value, dotted + ".")
            else:
                yield dotted

    missing = []
    for key in keys(DEFAULTS):
        head, _, rest = key.partition(".")
        generic = f"{head}.{methods[rest]}" if head in ("attack", "detector") and rest in methods else key
        if f"`{key}`" not in doc and f"`{generic}`" not in doc:
            missing.append(key)
    assert not missing, f"undocumented config keys in docs/runs.md: {missing}"
