"""Loaders on small files written in each layout, image conversion, DICOM windowing, and splits."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from engine.data import (
    ArrayDataset,
    Splits,
    aptos,
    chest_xray,
    dicom,
    image_folder,
    load_dataset,
    medmnist,
    split_dataset,
)
from engine.data.image import fundus_crop, read_dicom

RNG = np.random.default_rng(0)


def write_png(path, shape=(20, 24, 3), value=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = RNG.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def write_truncated(path):
    write_png(path, (64, 64, 3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def check_contract(ds, channels, size):
    img, label = ds[0]
    assert img.dtype == torch.float32 and img.shape == (channels, *size)
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert isinstance(label, int)
    assert ds.targets.dtype == np.int64 and ds.targets.shape == (len(ds),)
    assert isinstance(ds.classes, list) and isinstance(ds.name, str)


# ---------------------------------------------------------------- ImageFolder, chest X-ray, APTOS


def test_image_folder_skips_corrupt_and_truncated(tmp_path, caplog):
    write_png(tmp_path / "cat" / "a.png")
    write_png(tmp_path / "cat" / "b.jpg", (30, 20, 3), fmt="JPEG")
    write_png(tmp_path / "dog" / "c.png", (16, 16))  # greyscale file in an RGB dataset
    write_png(tmp_path / "dog" / "d.png")
    (tmp_path / "dog" / "junk.png").write_bytes(b"not an image at all")
    write_truncated(tmp_path / "dog" / "cut.png")
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        ds = image_folder(tmp_path, image_size=(12, 10))
    assert ds.classes == ["cat", "dog"] and list(ds.targets) == [0, 0, 1, 1]
    assert sorted(p.split("/")[-1] for p in ds.skipped) == ["cut.png", "junk.png"]
    assert "junk.png" in caplog.text and "cut.png" in caplog.text and "skipped 2" in caplog.text
    check_contract(ds, 3, (12, 10))
    grey = ds[2][0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_image_folder_pixels_and_lru(tmp_path):
    arr = write_png(tmp_path / "a" / "x.png", (8, 9, 3))
    write_png(tmp_path / "b" / "y.png", (8, 9, 3))
    ds = image_folder(tmp_path, cache_mb=1e-6)  # cache smaller than one image: every access decodes again
    img, _ = ds[0]
    np.testing.assert_allclose(img.permute(1, 2, 0).numpy(), arr / 255.0, atol=1e-7)
    assert torch.equal(ds[0][0], img) and len(ds._cache) == 0
    grey = image_folder(tmp_path, channels=1)[0][0]
    ref = np.asarray(Image.fromarray(arr).convert("L"), dtype=np.float32) / 255.0
    np.testing.assert_allclose(grey[0].numpy(), ref, atol=1.01 / 255)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    xb, yb = next(iter(loader))
    assert xb.shape == (2, 3, 8, 9) and yb.tolist() == [0, 1]


def test_image_folder_empty_class_and_empty_dataset(tmp_path):
    write_png(tmp_path / "a" / "x.png")
    (tmp_path / "b").mkdir()
    ds = image_folder(tmp_path)  # an empty class folder is a class without images (warned), not an error
    assert ds.classes == ["a", "b"] and ds.class_counts().tolist() == [1, 0]
    only_bad = tmp_path / "bad"
    (only_bad / "c").mkdir(parents=True)
    (only_bad / "c" / "z.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="empty"):
        image_folder(only_bad)


def test_chest_xray_layout(tmp_path):
    counts = {"train": (3, 4), "val": (1, 1), "test": (2, 2)}
    for part, (n_norm, n_pneu) in counts.items():
        for cls, k in (("NORMAL", n_norm), ("PNEUMONIA", n_pneu)):
            for i in range(k):
                write_png(tmp_path / "chest_xray" / part / cls / f"{i}.jpeg", (20, 18), fmt="JPEG")
    everything = chest_xray(tmp_path, image_size=16)  # finds the nested chest_xray/ folder
    assert len(everything) == 13 and everything.classes == ["NORMAL", "PNEUMONIA"]
    check_contract(everything, 1, (16, 16))
    train = chest_xray(tmp_path / "chest_xray", split="train", image_size=16, channels=3)
    assert list(np.bincount(train.targets)) == [3, 4]
    check_contract(train, 3, (16, 16))
    assert len(chest_xray(tmp_path, split=["val", "test"])) == 6
    with pytest.raises(ValueError, match="split"):
        chest_xray(tmp_path, split="dev")
    with pytest.raises(ValueError, match="missing folder"):
        chest_xray(tmp_path / "chest_xray" / "train")


def fundus_photo(h=48, w=64):
    img = np.zeros((h, w, 3), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 2 - 4) ** 2
    img[disc] = (180, 90, 40)
    return img


def test_fundus_crop_exact_bbox():
    img = np.zeros((40, 60, 3), np.uint8)
    img[10:30, 20:50] = 120
    img[3, 3] = 255  # an isolated bright pixel (noise) is removed by the median blur
    out = fundus_crop(img, threshold=10, blur=3, stride=1)
    assert out.shape == (20, 30, 3) and out.min() == 120
    assert fundus_crop(np.zeros((5, 5, 3), np.uint8)).shape == (5, 5, 3)


def write_aptos(root, rows, header=("id_code", "diagnosis")):
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    for id_code, _ in rows:
        Image.fromarray(fundus_photo()).save(root / "train_images" / f"{id_code}.png")


def test_aptos_tasks_crop_and_missing(tmp_path):
    rows = [(f"id{i}", g) for i, g in enumerate([0, 1, 2, 3, 4, 0, 2])]
    write_aptos(tmp_path, rows)
    (tmp_path / "train_images" / "id6.png").unlink()  # a missing image is skipped, not fatal
    write_truncated(tmp_path / "train_images" / "id5.png")
    grade = aptos(tmp_path, image_size=32)
    assert list(grade.targets) == [0, 1, 2, 3, 4] and len(grade.skipped) == 2 and len(grade.classes) == 5
    check_contract(grade, 3, (32, 32))
    binary = aptos(tmp_path, task="binary")
    assert list(binary.targets) == [0, 1, 1, 1, 1] and binary.classes == ["no DR", "DR"]
    cropped, _ = binary[0]
    assert cropped.shape[1] < 48 and cropped.shape[2] < 64  # black border removed
    assert aptos(tmp_path, task="binary", crop=False)[0][0].shape == (3, 48, 64)


def test_aptos_bad_csv(tmp_path):
    write_aptos(tmp_path / "a", [("x", 0)], header=("id_code", "grade"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['diagnosis'\]"):
        aptos(tmp_path / "a")
    write_aptos(tmp_path / "b", [("x", 7)])
    with pytest.raises(ValueError, match="outside 0-4"):
        aptos(tmp_path / "b")
    with pytest.raises(ValueError, match="task"):
        aptos(tmp_path / "b", task="severity")


# ---------------------------------------------------------------- MedMNIST, arrays


def test_medmnist_npz(tmp_path):
    grey, rgb = tmp_path / "pneumoniamnist.npz", tmp_path / "retinamnist.npz"
    parts = {"train": 6, "val": 2, "test": 3}
    np.savez(grey, **{f"{p}_images": RNG.integers(0, 256, (k, 28, 28), dtype=np.uint8) for p, k in parts.items()},
             **{f"{p}_labels": (np.arange(k) % 2)[:, None] for p, k in parts.items()})  # fmt: skip
    np.savez(rgb, train_images=RNG.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8), train_labels=np.arange(5)[:, None])
    ds = medmnist(grey)
    assert len(ds) == 6 and ds.images.dtype == np.uint8
    check_contract(ds, 1, (28, 28))
    assert len(medmnist(grey, split="all")) == 11
    both = medmnist(rgb, image_size=32, classes=list("abcde"))
    check_contract(both, 3, (32, 32))
    assert both.classes == list("abcde")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['val_images', 'val_labels'\]"):
        medmnist(rgb, split="val")
    assert len(load_dataset(str(grey), split="test")) == 3


@pytest.mark.parametrize("layout", ["nhwc_uint8", "nchw_float", "nhw_torch", "n1_noncontig_float64"])
def test_array_dataset_layouts(layout):
    base = RNG.integers(0, 256, (1 if layout == "n1_noncontig_float64" else 5, 7, 9, 3), dtype=np.uint8)
    if layout == "nhwc_uint8":
        images = base
    elif layout == "nchw_float":
        images = base.transpose(0, 3, 1, 2).astype(np.float32) / 255
    elif layout == "nhw_torch":
        images = torch.from_numpy(base[..., 0])
    else:
        images = (base.astype(np.float64) / 255).transpose(0, 3, 1, 2)[:, :, ::-1]  # non-contiguous
    ds = ArrayDataset(images, np.zeros(len(base), np.int64), name=layout)
    channels = 1 if layout == "nhw_torch" else 3
    check_contract(ds, channels, (7, 9))
    expected = base[0].transpose(2, 0, 1)[:channels] / 255.0
    if layout == "n1_noncontig_float64":
        expected = expected[:, ::-1]
    np.testing.assert_allclose(ds[0][0].numpy(), expected, atol=1e-6)
    assert ds.classes == ["0"] and ds.paths is None


def test_array_dataset_convert_and_validate():
    u8 = RNG.integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    small = ArrayDataset(u8, [0, 1, 1], image_size=8, channels=1)
    check_contract(small, 1, (8, 8))
    ref = np.asarray(Image.fromarray(u8[0].transpose(1, 2, 0)).convert("L").resize((8, 8), Image.BILINEAR))
    np.testing.assert_allclose(small[0][0][0].numpy() * 255, ref, atol=1.01)
    f = ArrayDataset(u8.astype(np.float32) / 255, [0, 1, 1], image_size=(8, 4), channels=1)
    check_contract(f, 1, (8, 4))
    np.testing.assert_allclose(f[0][0].mean().item(), small[0][0].mean().item(), atol=0.02)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ArrayDataset(u8.astype(np.float32), [0, 1, 1])
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(u8, [0, 1])
    with pytest.raises(ValueError, match="empty"):
        ArrayDataset(u8[:0], [])
    with pytest.raises(TypeError, match="dtype"):
        ArrayDataset(u8.astype(np.int32), [0, 1, 1])
    with pytest.raises(ValueError, match="classes"):
        ArrayDataset(u8, [0, 1, 2], classes=["a", "b"])
    with pytest.raises(ValueError, match="channels"):
        ArrayDataset(u8, [0, 1, 1], channels=2)


# ---------------------------------------------------------------- DICOM


def write_dicom(path, pixels, photometric="MONOCHROME1", center=None, width=None, slope=1, intercept=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_window_and_monochrome1(tmp_path):
    pixels = RNG.integers(0, 4096, (6, 5)).astype(np.uint16)
    p1 = write_dicom(tmp_path / "a.dcm", pixels, "MONOCHROME1", center=1500, width=2001)
    ref = apply_voi_lut(pixels.astype(np.float64), pydicom.dcmread(p1))  # pydicom's own windowing
    ref01 = np.clip((pixels - 1499.5) / 2000.0 + 0.5, 0, 1)  # PS3.3 C.11.2.1.2 by hand
    np.testing.assert_allclose((ref - ref.min()) / (ref.max() - ref.min()), ref01, atol=1e-3)
    out = read_dicom(p1)
    np.testing.assert_array_equal(out, np.rint((1.0 - ref01) * 255).astype(np.uint8))  # MONOCHROME1 inverted
    assert out.flat[pixels.argmax()] == out.min()  # the largest stored value is the darkest pixel
    p2 = write_dicom(tmp_path / "b.dcm", pixels, "MONOCHROME2", slope=2, intercept=-10)
    vals = pixels * 2.0 - 10  # no window: modality LUT then min-max
    np.testing.assert_array_equal(read_dicom(p2), np.rint((vals - vals.min()) / np.ptp(vals) * 255).astype(np.uint8))


def test_dicom_folder_loader(tmp_path):
    for cls, k in (("normal", 2), ("pneumonia", 3)):
        for i in range(k):
            write_dicom(tmp_path / "study" / cls / f"{i}.dcm", RNG.integers(0, 4096, (10, 12)))
    (tmp_path / "study" / "normal" / "broken.dcm").write_bytes(b"DICM? no")
    ds = dicom(tmp_path / "study", image_size=8)
    assert ds.classes == ["normal", "pneumonia"] and list(np.bincount(ds.targets)) == [2, 3]
    assert len(ds.skipped) == 1 and ds.skipped[0].endswith("broken.dcm")
    check_contract(ds, 1, (8, 8))
    single = dicom(tmp_path / "study" / "normal" / "0.dcm")
    assert len(single) == 1 and single.classes == ["normal"]
    assert len(load_dataset(tmp_path / "study")) == 5  # a Path with .dcm files is detected as a DICOM folder


# ---------------------------------------------------------------- load_dataset


def test_load_dataset_forms(tmp_path):
    write_png(tmp_path / "imgs" / "a" / "0.png")
    write_png(tmp_path / "imgs" / "b" / "0.png")
    assert len(load_dataset(f"imagefolder:{tmp_path / 'imgs'}", image_size=8)) == 2
    assert len(load_dataset(str(tmp_path / "imgs"), channels=1)) == 2
    assert load_dataset({"kind": "image_folder", "root": str(tmp_path / "imgs"), "channels": 1})[0][0].shape[0] == 1
    arr = load_dataset({"kind": "arrays", "images": np.zeros((2, 4, 4), np.uint8), "labels": [0, 1]})
    assert len(arr) == 2
    with pytest.raises(ValueError, match="neither"):
        load_dataset("no-such-dataset")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        load_dataset({"kind": "tfrecord", "path": "x"})
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset({"kind": "aptos"})
    with pytest.raises(TypeError, match="spec"):
        load_dataset(3)


# ---------------------------------------------------------------- splits


def labelled(n=103, k=3, seed=1):
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.integers(0, 256, (n, 4, 4), dtype=np.uint8), rng.integers(0, k, n), name="toy")


def test_split_deterministic_stratified_disjoint():
    ds = labelled()
    a, b = split_dataset(ds, seed=3), split_dataset(ds, seed=3)
    assert all(np.array_equal(a.indices[p], b.indices[p]) for p in ("train", "val", "test")) and a.hash == b.hash
    c = split_dataset(ds, seed=4)
    assert c.hash != a.hash and not np.array_equal(c.indices["test"], a.indices["test"])
    allidx = np.concatenate([a.indices[p] for p in ("train", "val", "test")])
    assert np.array_equal(np.sort(allidx), np.arange(len(ds)))
    for cls in range(3):
        n_c = int((ds.targets == cls).sum())
        assert int((ds.targets[a.indices["test"]] == cls).sum()) == round(0.15 * n_c)
        assert int((ds.targets[a.indices["val"]] == cls).sum()) == round(0.15 * n_c)
    train, val, test = a
    assert len(train) + len(val) + len(test) == len(ds)
    assert np.array_equal(test.targets, ds.targets[a.indices["test"]]) and test.classes == ds.classes
    assert torch.equal(test[0][0], ds[int(a.indices["test"][0])][0])
    flat = split_dataset(ds, val=0.2, test=0.0, seed=0, stratify=False)
    assert len(flat.test) == 0 and len(flat.val) == round(0.2 * len(ds))


def test_split_save_load_and_hash(tmp_path):
    ds = labelled()
    s = split_dataset(ds, val=0.1, test=0.2, seed=7)
    path = s.save(tmp_path / "run" / "splits.json")
    again = Splits.load(path, labelled())  # an identical dataset rebuilt from scratch
    assert again.hash == s.hash and again.params == s.params
    assert all(np.array_equal(again.indices[p], s.indices[p]) for p in ("train", "val", "test"))
    other = labelled(seed=2)
    with pytest.raises(ValueError, match="fingerprint"):
        Splits.load(path, other)
    assert Splits.load(path, other, strict=False).hash != s.hash  # same indices, other data -> other hash
    with pytest.raises(ValueError, match="out of range"):
        Splits.load(path, labelled(n=50), strict=False)


def test_split_validation_and_tiny():
    ds = labelled(n=1, k=1)
    s = split_dataset(ds)
    assert len(s.train) == 1 and len(s.val) == len(s.test) == 0
    with pytest.raises(ValueError, match="val"):
        split_dataset(ds, val=1.5)
    with pytest.raises(ValueError, match="val \\+ test"):
        split_dataset(ds, val=0.5, test=0.5)
