"""Corrupt user files through the command line: each one is refused before any work, in one line, exit 2.

Generated from valid files (an ONNX export, a TorchScript module, an hfc-engine checkpoint, PNG and JPEG images, an
image CSV): truncated at several lengths, replaced by garbage, text or nothing, and CSVs in other encodings. Each
goes through ``hfc-engine run`` (the pre-flight check).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from engine.cli import main

SYNTHETIC = "datasets=[{name: fundus-synth, task: binary, image_size: 8}]"
CUTS = (0.01, 0.1, 0.5, 0.9)  # truncated to these fractions of the file


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)))


def _valid_models() -> dict[str, bytes]:
    from engine.models import build_model
    from engine.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    module = Tiny().eval()
    onnx, script = io.BytesIO(), io.BytesIO()
    torch.onnx.export(module, torch.rand(1, 3, 8, 8), onnx, dynamo=False, input_names=["x"])
    torch.jit.save(torch.jit.trace(module, torch.rand(1, 3, 8, 8)), script)
    with tempfile.TemporaryDirectory() as directory:
        path = save_checkpoint(Path(directory) / "m.pt", build_model("resnet18", num_classes=2, width=0.0625))
        checkpoint = path.read_bytes()
    return {".onnx": onnx.getvalue(), ".ts": script.getvalue(), ".pt": checkpoint}


def _valid_images() -> dict[str, bytes]:
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    out = {}
    for suffix, kind in ((".png", "PNG"), (".jpg", "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, kind)
        out[suffix] = buffer.getvalue()
    return out


def _corruptions(valid: bytes) -> dict[str, bytes]:
    garbage = np.random.default_rng(len(valid)).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    out = {f"cut{cut}": valid[: int(len(valid) * cut)] for cut in CUTS}
    out.update(garbage=garbage, text=b"this is a model file, honestly\n", empty=b"")
    return out


MODELS = _valid_models()
IMAGES = _valid_images()
MODEL_CASES = [(suffix, name, data) for suffix, valid in MODELS.items() for name, data in _corruptions(valid).items()]
IMAGE_CASES = [
    (suffix, name, data)
    for suffix, valid in IMAGES.items()
    for name, data in _corruptions(valid).items()
    if name not in ("cut0.01",)  # a few bytes: the same as garbage
]
CSV_CASES = {
    "latin-1": "path,label\na/0.png,café\nb/0.png,thé\n".encode("latin-1"),
    "utf-16": "path,label\na/0.png,x\nb/0.png,y\n".encode("utf-16"),
    "binary": bytes(range(256)) * 4,
    "empty": b"",
    "header only": b"path,label\n",
    "empty label": b"path,label\na/0.png,x\nb/0.png,\n",
    "no path column": b"file,label\na/0.png,x\n",
}


def _refused(capsys, tmp_path, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("hfc-engine: error: ") and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()  # no half-written run directory
    return err


def _run(tmp_path, *overrides) -> list[str]:
    return ["run", "--no-progress", f"output_dir={tmp_path / 'runs'}", "name=fuzz", "studies=[]", *overrides]


@pytest.mark.parametrize(("suffix", "name", "data"), MODEL_CASES, ids=[f"{s}-{n}" for s, n, _ in MODEL_CASES])
def test_a_corrupt_model_file(tmp_path, capsys, suffix, name, data):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(data)
    err = _refused(capsys, tmp_path, _run(tmp_path, SYNTHETIC, f"model.checkpoint={path}"))
    assert str(path) in err


@pytest.mark.parametrize(("suffix", "name", "data"), IMAGE_CASES, ids=[f"{s}-{n}" for s, n, _ in IMAGE_CASES])
def test_a_folder_of_corrupt_images(tmp_path, capsys, suffix, name, data):
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        (tmp_path / "data" / cls / f"0{suffix}").write_bytes(data)
    err = _refused(capsys, tmp_path, _run(tmp_path, f"datasets=[{{name: image_folder, path: {tmp_path / 'data'}}}]"))
    assert "can be read" in err


@pytest.mark.parametrize("name", list(CSV_CASES))
def test_a_bad_csv(tmp_path, capsys, name):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "0.png").write_bytes(IMAGES[".png"])
    table = tmp_path / "labels.csv"
    table.write_bytes(CSV_CASES[name])
    err = _refused(capsys, tmp_path, _run(tmp_path, f"datasets=[{{name: image_csv, path: {table}}}]"))
    assert str(table) in err


def test_enough_corrupt_files():
    assert len(MODEL_CASES) + len(IMAGE_CASES) + len(CSV_CASES) >= 30
