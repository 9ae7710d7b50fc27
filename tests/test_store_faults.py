"""The results store under faults: corrupt or missing store, read-only readers, two writers, lost artifacts, fsync."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from engine import fileio
from engine.runs import Cell, CellOutput, LocalExecutor, Stage
from engine.runs.progress import CostModel
from engine.runs.run import recompute
from engine.runs.store import LOCK_FILE, STORE_FILE, ResultStore, StoreError


def _write(context, inputs, deps):
    """A stage writing one artifact file per cell, named in its payload as a directory ref."""
    directory = context / "detectors" / f"cell-{inputs['i']}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "scores.npz").write_bytes(b"x" * (inputs["i"] + 1))
    (directory / "fitted").mkdir(exist_ok=True)
    (directory / "fitted" / "config.json").write_text("{}")
    return CellOutput({"directory": f"detectors/cell-{inputs['i']}"}, [{"metric": "m", "value": inputs["i"]}])


class _Context:
    """The part of a RunContext the executor touches, with an artifact root the stage writes under."""

    def __init__(self, root):
        self.root = root
        self.artifacts = self

    def publish(self):
        pass

    def release(self):
        pass

    def __truediv__(self, part):
        return self.root / part


def _run(run_dir, root, n=3):
    cells = [Cell("write", {"i": i}) for i in range(n)]
    stages = {"write": Stage("write", _write, lambda cell, machine: ("write", 0.0))}
    with ResultStore(run_dir, artifact_root=root) as store:
        recompute(store, cells)
        timings = LocalExecutor(progress=False).run(
            cells, store, _Context(root), stages, CostModel({c.key: ("write", 0.0) for c in cells})
        )
        return cells, timings, [s for _, s, _ in store.cells()]


def test_a_missing_artifact_makes_its_cell_recompute(tmp_path):
    run_dir, root = tmp_path / "run", tmp_path / "run" / "artifacts"
    cells, _, _ = _run(run_dir, root)
    with ResultStore(run_dir, artifact_root=root) as store:
        assert store.missing(cells[1].key) == []
    (root / "detectors" / "cell-1" / "scores.npz").unlink()  # a file inside a directory the payload names
    with ResultStore(run_dir, artifact_root=root) as store:
        assert store.missing(cells[1].key) == ["detectors/cell-1/scores.npz"]
    before = {c.key: os.stat(root / "detectors" / f"cell-{c.inputs['i']}" / "fitted" / "config.json").st_mtime_ns
              for c in cells}  # fmt: skip
    _, timings, stages = _run(run_dir, root)
    assert (root / "detectors" / "cell-1" / "scores.npz").read_bytes() == b"xx"  # rebuilt
    assert len(stages) == 3
    after = {c.key: os.stat(root / "detectors" / f"cell-{c.inputs['i']}" / "fitted" / "config.json").st_mtime_ns
             for c in cells}  # fmt: skip
    assert after[cells[0].key] == before[cells[0].key] and after[cells[2].key] == before[cells[2].key]
    assert "write" in timings  # one cell ran again, the others were skipped
    with ResultStore(run_dir, artifact_root=root) as store:
        assert all(store.missing(c.key) == [] for c in cells)
        assert sorted(r["value"] for r in store.rows()) == [0, 1, 2]  # no duplicated rows


def test_a_corrupt_store_is_moved_aside_never_deleted(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    garbage = b"this is not an SQLite database" * 100
    (run_dir / STORE_FILE).write_bytes(garbage)
    with pytest.raises(StoreError, match="moved it aside to .*store.sqlite.corrupt-") as info:
        ResultStore(run_dir)
    assert "\n" not in str(info.value)
    aside = [p for p in run_dir.iterdir() if p.name.startswith(f"{STORE_FILE}.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    with ResultStore(run_dir) as store:  # the rerun starts over with a new store
        assert store.cells() == []


def test_a_truncated_store_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    with ResultStore(run_dir) as store:
        for i in range(200):
            store.commit(f"k{i}", "s", {"i": i}, [{"metric": "m", "value": i}])
    size = (run_dir / STORE_FILE).stat().st_size
    with open(run_dir / STORE_FILE, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(StoreError, match="unreadable"):
        with ResultStore(run_dir, readonly=True) as store:
            store.rows()
    with pytest.raises(StoreError, match="moved it aside"):
        ResultStore(run_dir)


def test_a_missing_store_is_one_line_for_readers(tmp_path):
    with pytest.raises(StoreError, match="no results store"):
        ResultStore(tmp_path, readonly=True)


def test_two_writers_cannot_share_a_run_directory(tmp_path):
    with ResultStore(tmp_path) as first:
        assert (tmp_path / LOCK_FILE).read_text() == str(os.getpid())
        with pytest.raises(StoreError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            ResultStore(tmp_path)
        with ResultStore(tmp_path, readonly=True) as reader:  # a reader (runs show) is not a writer
            assert reader.cells() == []
        first.commit("k", "s", {}, [])
    with ResultStore(tmp_path) as again:  # closed: the lock is released
        assert again.done("k")


def test_a_killed_writer_releases_the_lock(tmp_path):
    script = "import sys, time\nfrom engine.runs.store import ResultStore\nstore = ResultStore(sys.argv[1])\n"
    script += "print('locked', flush=True)\ntime.sleep(60)\n"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=rf"pid {proc.pid}"):
            ResultStore(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    with ResultStore(tmp_path) as store:
        assert store.cells() == []


READ_ONLY = os.geteuid() != 0 or shutil.which("unshare") is not None


@pytest.mark.skipif(not READ_ONLY, reason="root needs unshare to mount a directory read-only")
def test_a_finished_run_reads_from_a_read_only_directory(tmp_path):
    run_dir = tmp_path / "run"
    with ResultStore(run_dir) as store:
        store.commit("k", "detect", {"a": 1}, [{"metric": "auroc", "value": 0.5}])
    (run_dir / LOCK_FILE).unlink()
    script = "import sys\nfrom engine.runs.store import ResultStore\n"
    script += "with ResultStore(sys.argv[1], readonly=True) as s: print(s.cells('detect')[0][0], s.rows()[0]['value'])"
    command = [sys.executable, "-c", script, str(run_dir)]
    if os.geteuid() == 0:  # root ignores permissions: read inside a read-only bind mount of the directory
        mount = f"mount --bind {run_dir} {run_dir} && mount -o remount,ro,bind {run_dir} {run_dir} && exec \"$@\""
        command = ["unshare", "-m", "sh", "-c", mount, "sh", *command]
    else:
        os.chmod(run_dir, 0o555)
    try:
        out = subprocess.run(command, env={**os.environ, "PYTHONPATH": os.getcwd()}, capture_output=True, text=True)
    finally:
        os.chmod(run_dir, 0o755)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["k", "0.5"]
    assert sorted(p.name for p in run_dir.iterdir()) == [STORE_FILE]  # nothing written beside it


def test_atomic_write_fsyncs_the_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    fileio.atomic_write(tmp_path / "a.txt", lambda p: p.write_text("a"))
    assert synced == [False, True]  # the file, then its directory after the rename
    assert (tmp_path / "a.txt").read_text() == "a"
