"""The Ray executor on a local Ray instance (2 CPUs) that this module starts and stops: a tiny audit through Ray
equals the local run row for row (also with a staged fsspec artifact location), a worker killed mid-cell is
retried, a driver killed between cells is resumed without duplicate rows, and the errors users meet (Ray missing,
claims no node can hold) are one-line config errors (bad executor settings: tests/test_runs.py, at load). Local
runs never import Ray."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import ray

from engine.cli import main
from engine.runs import Cell, ConfigError, ResultStore, execute, load_config
from engine.runs.cluster import RayExecutor
from engine.runs.progress import CostModel
from engine.runs.staging import StagedArtifacts
from engine.runs.store import StoreError

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a local Ray instance: seconds to start, minutes in all

TINY = [
    "datasets=[{name: fundus-synth, task: binary, n: 400, image_size: 32}]",
    "model.width=0.125",
    "model.epochs=2",
    "model.batch_size=32",
    "attacks=[pgd]",
    "eps=['8/256']",
    "attack.steps=3",
    "attack.pool=60",
    "attack.batch_size=30",
    "hfc.n_components=1",
    "hfc.lam=0.1",
    "hfc.steps=3",
    "detectors=[kd, lid, bu]",
    "detector.bootstrap=10",
    "detector.train_limit=120",
    "detector.bu={passes: 4}",
    "studies=[]",
    "threads=1",  # as many threads as a Ray cell's one claimed CPU: rows bitwise equal
]
ROOT = str(Path(__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs; yields its address for drivers in other processes."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return execute(load_config(overrides=[*TINY, f"output_dir={out}"]), progress=False).frame()


def _ray_run(out: Path, *overrides: str):
    return execute(load_config(overrides=[*TINY, f"output_dir={out}", "executor=ray", *overrides]), progress=False)


def test_ray_run_equals_local_run_row_for_row(cluster, local_rows, tmp_path):
    result = _ray_run(tmp_path)
    pd.testing.assert_frame_equal(result.frame(), local_rows, check_exact=True)  # same threads per cell: bitwise
    assert set(result.card["seconds_this_invocation"]) == set(result.payloads)  # every stage ran through Ray


def test_staged_artifact_location(cluster, local_rows, tmp_path):
    """Workers and driver each work in a cache of their own and exchange every artifact through the URL."""
    remote = tmp_path / "bucket"
    result = _ray_run(tmp_path / "runs", f"artifacts=file://{remote}")
    pd.testing.assert_frame_equal(result.frame(), local_rows, check_exact=True)
    assert not (tmp_path / "runs" / "default" / "artifacts").exists()
    assert {p.name for p in remote.iterdir()} >= {"models", "gmms", "adversarial", "detectors", "splits"}
    assert not list(remote.rglob("*.partial"))
    _, payload = result.payloads["detect"][0]
    assert any(result.artifacts.path(payload["directory"]).iterdir())  # the driver downloads what the report reads


def test_staging_uploads_oldest_first_and_downloads_on_first_use(tmp_path):
    url = f"file://{tmp_path / 'bucket'}"
    writer = StagedArtifacts(url, cache=tmp_path / "writer")
    directory = writer.directory("adversarial", "pgd", "k1")
    (directory / "shard_000000.npz").write_bytes(b"data")
    (directory / ".manifest.json.123.tmp").write_text("half-written")
    time.sleep(0.01)
    (directory / "manifest.json").write_text("{}")
    uploaded = []
    put = writer.fs.put_file
    writer.fs.put_file = lambda local, remote: (uploaded.append(Path(local).name), put(local, remote))
    writer.publish()
    assert uploaded == ["shard_000000.npz", "manifest.json"]  # never the temporary file; the index last
    writer.publish()
    assert len(uploaded) == 2  # nothing changed, nothing sent
    reader = StagedArtifacts(url, cache=tmp_path / "reader")
    assert not (reader.root / "adversarial").exists()
    assert reader.path(writer.ref(directory / "manifest.json")).read_text() == "{}"
    assert [p.name for p in (reader.root / "adversarial" / "pgd-k1").iterdir()] == ["manifest.json"]  # that file
    assert reader.path(writer.ref(directory)) == reader.root / "adversarial" / "pgd-k1"
    assert sorted(p.name for p in (reader.root / "adversarial" / "pgd-k1").iterdir()) == [
        "manifest.json",
        "shard_000000.npz",
    ]  # then the whole directory it names


DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from engine.runs import Cell, CellOutput, ResultStore, Stage, load_config
    from engine.runs.cluster import RayExecutor
    from engine.runs.progress import CostModel

    run_dir, address, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

    def work(context, inputs, deps):
        marks = run_dir / "marks"
        marks.mkdir(exist_ok=True)
        (marks / f"{inputs['i']}-{os.getpid()}-{time.time_ns()}").touch()  # which cell ran, in which process
        if inputs["i"] == 0 and inputs["hang_once"] and not (run_dir / "retried").exists():
            (run_dir / "retried").touch()
            (run_dir / "victim").write_text(str(os.getpid()))
            time.sleep(120)  # killed by the test
        time.sleep(inputs["sleep"])
        total = inputs["i"] + sum(p["total"] for p in deps.values())
        return CellOutput({"total": total}, [{"metric": "total", "value": total, "eps": str(inputs["i"])}])

    hang_once = n < 10
    cells = [Cell("work", {"i": i, "sleep": 0.5, "hang_once": hang_once}) for i in range(n)]
    cells.append(Cell("work", {"i": n, "sleep": 0.0, "hang_once": False}, deps=tuple(c.key for c in cells)))
    config = load_config(overrides=["executor=ray", f"ray.address={address}"])
    with ResultStore(run_dir) as store:
        costs = CostModel({c.key: ("work", 0.2) for c in cells})
        stages = {"work": Stage("work", work, lambda cell, machine: ("work", 0.2))}
        RayExecutor(config, str(run_dir / "artifacts"), progress=False).run(cells, store, None, stages, costs)
    """
)


def _driver(tmp_path: Path, address: str, n: int) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": ROOT}  # now: ray.init set the cluster's auth mode in os.environ
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), address, str(n)], env=env)


def _wait_for(condition, driver: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert driver.poll() is None, f"the driver exited with {driver.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _totals(run_dir: Path) -> list[float]:
    with ResultStore(run_dir) as store:
        return sorted(r["value"] for r in store.rows())


def test_worker_killed_mid_cell_is_retried(cluster, tmp_path):
    driver = _driver(tmp_path, cluster, 4)
    victim = tmp_path / "run" / "victim"
    _wait_for(lambda: victim.exists() and victim.read_text(), driver)
    os.kill(int(victim.read_text()), signal.SIGKILL)
    assert driver.wait(timeout=600) == 0
    assert _totals(tmp_path / "run") == [0, 1, 2, 3, 4 + 6]  # every cell once, the dependant after the retry
    assert len(list((tmp_path / "run" / "marks").glob("0-*"))) == 2  # cell 0 ran twice: killed, then retried


def test_driver_killed_between_cells_then_rerun(cluster, tmp_path):
    n, run_dir = 12, tmp_path / "run"

    def committed() -> int:
        with contextlib.suppress(StoreError), ResultStore(run_dir, readonly=True) as store:  # read beside the writer
            return len(store.cells())
        return 0  # no store yet, or one still being created

    driver = _driver(tmp_path, cluster, n)
    _wait_for(lambda: committed() >= 3, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = committed()
    assert 3 <= before < n + 1
    with ResultStore(run_dir) as store:
        done = {int(r["eps"]) for r in store.rows()}
    marks_before = {p.name for p in (run_dir / "marks").iterdir()}
    assert _driver(tmp_path, cluster, n).wait(timeout=600) == 0
    assert _totals(run_dir) == [*range(n), n + sum(range(n))]  # nothing missing, no duplicate rows
    reran = {int(p.name.split("-")[0]) for p in (run_dir / "marks").iterdir() if p.name not in marks_before}
    assert not reran & done  # committed cells are not run again


def test_local_runs_never_import_ray():
    code = textwrap.dedent(
        """
        import sys
        from engine.cli import main
        from engine.runs import load_config
        from engine.runs.run import make_executor
        make_executor(load_config(quick=True))
        assert "ray" not in sys.modules, "a local run imported ray"
        """
    )
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT}, check=True)


def test_missing_ray_is_a_one_line_config_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["run", "executor=ray", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs Ray" in err and "pip install '.[ray]'" in err
    assert load_config(overrides=["executor=local"])["executor"] == "local"  # a local run needs no Ray


def test_claims_no_node_can_hold_are_config_errors(cluster, tmp_path):
    cells = [Cell("data", {"i": 0})]
    stages = {"data": None}
    costs = CostModel({cells[0].key: ("data", 1.0)})
    config = load_config(overrides=["executor=ray", "resources.data.gpus=1"])
    message = "'resources.data' asks for .* no node of the Ray cluster has that much"
    with ResultStore(tmp_path) as store, pytest.raises(ConfigError, match=message):
        RayExecutor(config, str(tmp_path), progress=False).run(cells, store, None, stages, costs)
