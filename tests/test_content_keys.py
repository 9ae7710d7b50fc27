"""Cells keyed by content: a replaced model file or changed data reruns exactly the cells it feeds."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from engine.data import content_fingerprint, load_dataset
from engine.models import build_model
from engine.models.checkpoint import save_checkpoint
from engine.runs.config import load_config
from engine.runs.plan import build_cells
from engine.runs.run import execute
from engine.runs.store import ResultStore


def _folder(root, seed=0, n=30, size=16):
    rng = np.random.default_rng(seed)
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 80, (size, size, 3)) + 120 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / cls / f"{i}.png")
    return root


def _swap_classes(root):
    (root / "a").rename(root / "tmp")
    (root / "b").rename(root / "a")
    (root / "tmp").rename(root / "b")


def _checkpoint(path, seed):
    import torch

    torch.manual_seed(seed)
    return save_checkpoint(path, build_model("resnet18", num_classes=2, width=0.125))


def test_content_fingerprint_follows_files_and_labels(tmp_path):
    data = _folder(tmp_path / "data")
    spec = {"name": "image_folder", "path": str(data)}
    first = content_fingerprint(spec)
    assert first == content_fingerprint(spec) and len(first) == 16
    _swap_classes(data)  # the same files under the other labels
    swapped = content_fingerprint(spec)
    assert swapped != first
    _swap_classes(data)
    assert content_fingerprint(spec) == first
    image = data / "a" / "0.png"  # same size and times, other bytes (cp -p / rsync -a over it)
    stat = image.stat()
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_fingerprint(spec) != first
    assert content_fingerprint({"name": "fundus-synth", "n": 10}) is None  # the spec determines it


def test_csv_labels_are_content(tmp_path):
    data = _folder(tmp_path / "data", n=2)
    table = data / "labels.csv"
    table.write_text("path,label\na/0.png,x\nb/0.png,y\n")
    spec = {"name": "image_csv", "path": str(table)}
    first = content_fingerprint(spec)
    table.write_text("path,label\na/0.png,y\nb/0.png,x\n")
    assert content_fingerprint(spec) != first


def test_a_file_datasets_fingerprint_covers_bytes(tmp_path):
    """What trained models are cached by (the split hash): a file replaced under its name changes it."""
    data = _folder(tmp_path / "data", n=3)
    before = load_dataset({"name": "image_folder", "path": str(data)}).fingerprint
    _folder(tmp_path / "data", seed=1, n=3)
    assert load_dataset({"name": "image_folder", "path": str(data)}).fingerprint != before


def _config(tmp_path, data, checkpoint):
    return load_config(None, [
        "name=ck", f"output_dir={tmp_path / 'runs'}", f"datasets=[{{name: image_folder, path: {data}}}]",
        f"model.checkpoint={checkpoint}", "attacks=[pgd]", "eps=[128/256]", "attack.pool=9", "attack.batch_size=9",
        "attack.steps=5",
        "hfc.enabled=false", "detectors=[kd]", "detector.bootstrap=20", "studies=[]", "split.test=0.3",
    ])  # fmt: skip


def _keys(config):
    return {cell.stage: cell.key for cell in build_cells(config)}


def test_cell_keys_follow_the_model_file_and_the_data(tmp_path):
    data = _folder(tmp_path / "data")
    model = _checkpoint(tmp_path / "m.pt", 0)
    first = _keys(_config(tmp_path, data, model))
    assert set(first) == {"data", "model", "attack", "detect"}
    _checkpoint(model, 1)  # another model at the same path
    replaced = _keys(_config(tmp_path, data, model))
    assert replaced["data"] == first["data"]
    assert all(replaced[stage] != first[stage] for stage in ("model", "attack", "detect"))
    _swap_classes(data)
    swapped = _keys(_config(tmp_path, data, model))
    assert all(swapped[stage] != replaced[stage] for stage in first)


@pytest.mark.slow
def test_a_replaced_model_or_swapped_data_reruns_what_it_feeds(tmp_path):
    data = _folder(tmp_path / "data")
    model = _checkpoint(tmp_path / "m.pt", 0)
    run_dir = tmp_path / "runs" / "ck"

    def run():
        result = execute(_config(tmp_path, data, model), progress=False)
        with ResultStore(run_dir, readonly=True) as store:
            finished = [stage for _, stage, _ in store.cells()]
        return result, finished

    first, finished = run()
    assert sorted(finished) == ["attack", "data", "detect", "model"]
    again, finished = run()  # nothing changed: nothing reruns
    assert len(finished) == 4 and again.rows == first.rows
    shutil.copy(_checkpoint(tmp_path / "other.pt", 1), model)
    replaced, finished = run()
    assert sorted(finished[4:]) == ["attack", "detect", "model"]  # the data cell is not rerun
    accuracy = {r["metric"]: r["value"] for r in replaced.rows if r["metric"].startswith("clean_")}
    assert accuracy != {r["metric"]: r["value"] for r in first.rows if r["metric"].startswith("clean_")}
    assert replaced.card["inputs"]["models"]["m"]["sha256"] != first.card["inputs"]["models"]["m"]["sha256"]
    _swap_classes(data)
    swapped, finished = run()
    assert sorted(finished[7:]) == ["attack", "data", "detect", "model"]  # everything reruns on the new data
    content = swapped.card["inputs"]["datasets"]["image_folder"]["content"]
    assert content == content_fingerprint({"name": "image_folder", "path": str(data)})
    assert content != replaced.card["inputs"]["datasets"]["image_folder"]["content"]
