"""Synthetic generators: determinism, label balance, contract, on-disk cache (atomic, verified), preview tools."""

from __future__ import annotations

import importlib
import logging
import os

import numpy as np
import pytest
import torch

from engine.data import load_dataset, synthetic
from engine.data.preview import contact_sheet, learnability
from engine.data.synthetic import cache_path, generate
from engine.data.synthetic.common import balanced_labels

N, SIZE = 40, 32
synth_mod = importlib.import_module("engine.data.synthetic")  # the package (engine.data.synthetic is also a function)


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HFC_ENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(
    ("name", "task", "channels", "k"),
    [("fundus-synth", "grade", 3, 5), ("fundus-synth", "binary", 3, 2), ("cxr-synth", None, 1, 2),
     ("natural", "splice", 3, 2), ("natural", "source", 3, 6)],
)  # fmt: skip
def test_generator_deterministic_and_balanced(name, task, channels, k):
    images, labels, grades = generate(name, N, SIZE, seed=5, task=task, workers=1)
    again, labels2, _ = generate(name, N, SIZE, seed=5, task=task, workers=1)
    assert images.dtype == np.uint8 and images.shape == (N, channels, SIZE, SIZE)
    assert images.tobytes() == again.tobytes() and np.array_equal(labels, labels2)
    other, _, _ = generate(name, 4, SIZE, seed=6, task=task, workers=1)
    assert other.tobytes() != images[:4].tobytes()
    counts = np.bincount(labels, minlength=k)
    assert counts.max() - counts.min() <= 1 and counts.sum() == N
    assert images.std() > 10  # real image content, not a constant
    if name == "fundus-synth" and task == "binary":
        assert np.array_equal(labels, (grades > 0).astype(np.int64))
        assert list(np.bincount(grades, minlength=5)) == [20, 5, 5, 5, 5]


def test_images_independent_of_chunking():
    """Workers render chunks [start, stop); image i only depends on (seed, i), so chunks equal the serial run."""
    serial, labels, grades = generate("cxr-synth", 6, 16, seed=1, workers=1)
    chunk = synth_mod._render_chunk("cxr-synth", "pneumonia", 16, 1, 1.0, 4, grades[4:6])
    assert chunk.tobytes() == serial[4:6].tobytes()


def test_balanced_labels_largest_remainder():
    labels = balanced_labels(7, np.array([0.5, 0.25, 0.25]), seed=0)
    assert sorted(np.bincount(labels)) == [2, 2, 3] and np.bincount(labels)[0] == 3
    assert np.array_equal(labels, balanced_labels(7, np.array([0.5, 0.25, 0.25]), seed=0))


def test_dataset_contract_and_channels():
    ds = synthetic("cxr-synth", N, SIZE, seed=0)
    img, label = ds[0]
    assert img.dtype == torch.float32 and img.shape == (1, SIZE, SIZE) and 0 <= img.min() and img.max() <= 1
    assert ds.classes == ["normal", "pneumonia"] and ds.targets.dtype == np.int64 and ds.paths is None
    rgb = load_dataset("cxr-synth", n=N, image_size=SIZE, seed=0, channels=3)
    assert rgb[0][0].shape == (3, SIZE, SIZE) and torch.equal(rgb[0][0][1], img[0])
    fundus = load_dataset("fundus-synth:binary", n=N, image_size=SIZE)
    assert fundus.name == "fundus-synth-binary" and fundus.grades.shape == (N,)
    with pytest.raises(ValueError, match="task"):
        synthetic("natural", N, SIZE, task="grade")
    with pytest.raises(ValueError, match="name"):
        synthetic("mri-synth", N, SIZE)


def test_cache_round_trip(monkeypatch):
    first = synthetic("natural", N, SIZE, seed=3)
    path = cache_path("natural", "splice", N, SIZE, 3, 1.0)
    assert path.is_file() and "-v1" in path.name and not list(path.parent.glob("*.tmp*"))

    def fail(*args, **kwargs):
        raise AssertionError("generate() called although the cache is valid")

    monkeypatch.setattr(synth_mod, "generate", fail)
    second = synthetic("natural", N, SIZE, seed=3)
    assert np.array_equal(first.images, second.images) and first.fingerprint == second.fingerprint


@pytest.mark.parametrize("damage", ["truncated", "bitflip"])
def test_partial_or_corrupt_cache_is_not_used(damage, caplog):
    good = synthetic("cxr-synth", N, SIZE, seed=2)
    path = cache_path("cxr-synth", "pneumonia", N, SIZE, 2, 1.0)
    data = bytearray(path.read_bytes())
    if damage == "truncated":  # e.g. a copy interrupted half-way
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # a silently corrupted byte inside the image array
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        again = synthetic("cxr-synth", N, SIZE, seed=2)
    assert "corrupt cache" in caplog.text
    assert np.array_equal(good.images, again.images)
    assert synth_mod._read_cache(path) is not None  # regenerated file is valid again


def test_interrupted_write_leaves_no_cache(monkeypatch):
    path = cache_path("cxr-synth", "pneumonia", N, SIZE, 4, 1.0)
    (path.parent).mkdir(parents=True)
    (path.parent / f".{path.stem}.999.tmp.npz").write_bytes(b"PK\x03\x04 half a zip")  # leftover of a crash

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        synthetic("cxr-synth", N, SIZE, seed=4)
    assert not path.exists() and not list(path.parent.glob(f".{path.stem}.{os.getpid()}*"))
    monkeypatch.undo()
    monkeypatch.setenv("HFC_ENGINE_CACHE", str(path.parents[1]))
    assert len(synthetic("cxr-synth", N, SIZE, seed=4)) == N and path.is_file()


def test_contact_sheet_and_learnability(tmp_path):
    ds = synthetic("fundus-synth", N, SIZE, task="binary")
    out = contact_sheet(ds, tmp_path / "sheet.png", rows=2, cols=4)
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (4 * (2 * SIZE + 2), 2 * (2 * SIZE + 12 + 2))
    res = learnability(ds, epochs=1)
    assert set(res) == {"epoch", "train", "val", "test"} and all(0 <= res[k] <= 1 for k in ("train", "val", "test"))
