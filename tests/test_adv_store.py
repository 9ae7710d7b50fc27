"""Adversarial-set storage: round trips (npz/pt, float32/uint8), resume, interrupted writes, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.attacks import PGD, AdvWriter, load_adversarial
from engine.attacks import store as store_module
from engine.errors import UserError

CLASSES = ["normal", "disease"]


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 5, 4, generator=gen), torch.randint(0, 2, (n,), generator=gen)


@pytest.mark.parametrize("fmt", ["npz", "pt"])
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_round_trip(tmp_path: Path, fmt: str, dtype: str) -> None:
    writer = AdvWriter(tmp_path / "adv", CLASSES, dtype=dtype, fmt=fmt, name="fundus-pgd")
    parts = [batch(n, seed) for seed, n in enumerate([3, 1, 5])]
    start = 0
    for x, y in parts:
        index = np.arange(start, start + len(y))
        writer.append(x, y, index=index, success=(y == 1), target=1 - y)
        start += len(y)
    assert writer.num_samples == 9 and writer.num_shards == 3
    ds = load_adversarial(tmp_path / "adv")
    x_all = torch.cat([p[0] for p in parts])
    y_all = torch.cat([p[1] for p in parts])
    assert len(ds) == 9 and ds.classes == CLASSES and ds.name == "fundus-pgd"
    np.testing.assert_array_equal(ds.targets, y_all.numpy())
    np.testing.assert_array_equal(ds.meta["index"], np.arange(9))
    np.testing.assert_array_equal(ds.meta["target"], (1 - y_all).numpy())
    np.testing.assert_array_equal(ds.meta["success"], (y_all == 1).numpy())
    image, label = ds[4]
    assert image.dtype == torch.float32 and image.shape == (3, 5, 4) and label == int(y_all[4])
    if dtype == "float32":
        assert torch.equal(ds.images, x_all)
    else:  # quantised: within half a grey level, exactly on the 1/255 grid
        assert float((ds.images - x_all).abs().max()) <= 0.5 / 255 + 1e-7
        torch.testing.assert_close(ds.images * 255, (ds.images * 255).round())
    shards = sorted(p.name for p in (tmp_path / "adv").iterdir() if p.name.startswith("shard_"))
    assert shards == [f"shard_{i:06d}.{fmt}" for i in range(3)]  # one file per batch, none rewritten


def test_attack_result_and_resume(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(60, 2))
    x, y = batch(6, 0)
    writer = AdvWriter(tmp_path, CLASSES)
    result = PGD(model, eps="8/255", steps=2, targeted="random")(x[:4], y[:4])
    writer.append_result(result, index=np.arange(4))
    resumed = AdvWriter(tmp_path, CLASSES)  # a new process picks up where the first stopped
    assert resumed.num_samples == 4
    np.testing.assert_array_equal(resumed.stored_indices(), np.arange(4))
    resumed.append_result(PGD(model, eps="8/255", steps=2, targeted="random")(x[4:], y[4:]), index=[4, 5])
    ds = load_adversarial(tmp_path)
    assert len(ds) == 6 and sorted(ds.meta) == ["index", "success", "target"]
    torch.testing.assert_close(ds.images[:4], result.adv)
    np.testing.assert_array_equal(ds.meta["target"][:4], result.target.numpy())
    with pytest.raises(ValueError, match="other settings"):
        AdvWriter(tmp_path, CLASSES, dtype="uint8")
    with pytest.raises(ValueError, match="labels are required"):
        resumed.append_result(PGD(model, eps=0.1, steps=1, targeted=True)(x[:2], y[:2]), index=[0, 1])


def test_interrupted_manifest_write_keeps_finished_shards(tmp_path: Path, monkeypatch) -> None:
    writer = AdvWriter(tmp_path, CLASSES)
    for seed in range(2):
        writer.append(*batch(3, seed), index=np.arange(3) + 3 * seed)
    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith("manifest.json"):
            raise KeyboardInterrupt  # killed between the shard's rename and the manifest's
        real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        writer.append(*batch(3, 2), index=np.arange(6, 9))
    monkeypatch.setattr(store_module.os, "replace", real_replace)
    assert (tmp_path / "shard_000002.npz").exists()  # orphan shard on disk ...
    ds = load_adversarial(tmp_path)
    assert len(ds) == 6  # ... but the manifest lists only the finished ones
    json.loads((tmp_path / "manifest.json").read_text())  # and is valid JSON
    resumed = AdvWriter(tmp_path, CLASSES)
    resumed.append(*batch(2, 9), index=[6, 7])  # overwrites the orphan
    ds = load_adversarial(tmp_path)
    np.testing.assert_array_equal(ds.meta["index"], np.arange(8))


KILL_SCRIPT = """
import sys, numpy as np, torch
from engine.attacks import AdvWriter
writer = AdvWriter(sys.argv[1], ["a", "b"])
i = 0
while True:
    x = torch.full((50, 1, 16, 16), (i % 10) / 10.0)
    writer.append(x, torch.zeros(50, dtype=torch.long), index=np.arange(50) + 50 * i)
    i += 1
"""


def test_kill_9_leaves_a_loadable_store(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)])
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            manifest = tmp_path / "manifest.json"
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 5:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ds = load_adversarial(tmp_path)
    assert len(ds) >= 250 and len(ds) % 50 == 0
    np.testing.assert_array_equal(ds.meta["index"], np.arange(len(ds)))
    for shard in range(len(ds) // 50):
        assert torch.all(ds.images[50 * shard : 50 * shard + 50] == (shard % 10) / 10.0)


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        AdvWriter(tmp_path, CLASSES, dtype="float16")
    with pytest.raises(ValueError, match="fmt"):
        AdvWriter(tmp_path, CLASSES, fmt="h5")
    with pytest.raises(ValueError, match="classes"):
        AdvWriter(tmp_path, "ab")
    writer = AdvWriter(tmp_path, CLASSES)
    x, y = batch(3, 0)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        writer.append(x * 2, y)
    with pytest.raises(ValueError, match="labels"):
        writer.append(x, y[:2])
    with pytest.raises(ValueError, match="metadata 'index'"):
        writer.append(x, y, index=[1])
    writer.append(x, y, index=[0, 1, 2])
    with pytest.raises(ValueError, match="metadata keys"):
        writer.append(x, y, target=[0, 1, 2])
    with pytest.raises(UserError, match="AdvWriter"):
        load_adversarial(tmp_path / "nothing")
