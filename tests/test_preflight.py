"""The pre-flight check: user models and data files opened before any work, each problem one UserError."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from engine.cli import main
from engine.errors import UserError
from engine.runs.config import load_config
from engine.runs.context import RunContext
from engine.runs.preflight import check_output, dataset_shape, preflight
from engine.runs.staging import open_artifacts


class Tiny(nn.Module):
    """A 2-class model of 3x8x8 images; ``softmax`` ends it in a softmax (probabilities)."""

    def __init__(self, softmax: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 2)
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1)) * 5
        return out.softmax(1) if self.softmax else out


def _script(tmp_path, softmax: bool = False):
    path = tmp_path / ("prob.pt" if softmax else "logits.pt")
    torch.jit.script(Tiny(softmax).eval()).save(str(path))
    return path


def _folder(root, sizes, per_class=3):
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = sizes[(c * per_class + i) % len(sizes)]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _config(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'runs'}", "name=pf", "studies=[]", *overrides])


def _context(tmp_path):
    return RunContext(open_artifacts(str(tmp_path / "runs" / "pf" / "artifacts")), progress=False)


def test_logits_declared_as_probabilities_are_refused_with_the_evidence(tmp_path):
    data = _folder(tmp_path / "data", [(8, 8)])
    config = _config(tmp_path, f"datasets=[{{name: image_folder, path: {data}}}]",
                     f"model.checkpoint={_script(tmp_path)}", "model.output=probabilities")  # fmt: skip
    with pytest.raises(UserError, match=r"model.output is 'probabilities'.*sum to \[.*not 1: it returns logits"):
        preflight(config, _context(tmp_path))
    assert not (tmp_path / "runs").exists()  # nothing written


def test_probabilities_declared_as_probabilities_pass(tmp_path):
    data = _folder(tmp_path / "data", [(8, 8)])
    config = _config(tmp_path, f"datasets=[{{name: image_folder, path: {data}}}]",
                     f"model.checkpoint={_script(tmp_path, softmax=True)}", "model.output=probabilities")  # fmt: skip
    ctx = _context(tmp_path)
    preflight(config, ctx)
    assert len(ctx._memo) == 1  # the loaded model, kept for the model cell


def test_probabilities_declared_as_logits_warn(caplog):
    out = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    with caplog.at_level(logging.WARNING, logger="engine.runs"):
        check_output(out, "logits", "logits", "m.pt")
    assert "like probabilities, but model.output is 'logits'" in caplog.text
    check_output(torch.tensor([[2.0, -1.0]]), "logits", "logits", "m.pt")  # logits: no complaint
    with pytest.raises(UserError, match="non-finite"):
        check_output(torch.tensor([[float("nan"), 0.0]]), "logits", "logits", "m.pt")


def test_input_shape_against_the_data(tmp_path):
    data = _folder(tmp_path / "data", [(16, 16)])  # the model takes 8x8
    config = _config(tmp_path, f"datasets=[{{name: image_folder, path: {data}}}]",
                     f"model.checkpoint={_script(tmp_path)}")  # fmt: skip
    shape = r"does not (take the data's images \(C, H, W\) = |run on inputs of shape )\(3, 16, 16\)"
    with pytest.raises(UserError, match=shape):
        preflight(config, _context(tmp_path))


def test_mixed_image_sizes_need_image_size(tmp_path):
    data = _folder(tmp_path / "data", [(8, 8), (12, 10)])
    with pytest.raises(UserError, match=r"images come in 2 sizes .*set image_size .*datasets.0.image_size=224"):
        dataset_shape(0, {"name": "image_folder", "path": str(data)})
    assert dataset_shape(0, {"name": "image_folder", "path": str(data), "image_size": 8}) == (3, 8, 8)
    assert dataset_shape(0, {"name": "image_folder", "path": str(data), "image_size": 8, "channels": 1}) == (1, 8, 8)
    assert dataset_shape(0, {"name": "fundus-synth", "image_size": 32}) == (3, 32, 32)
    assert dataset_shape(0, {"name": "cxr-synth"}) == (1, 64, 64)


def _csv(tmp_path, text: str, encoding: str = "utf-8"):
    data = _folder(tmp_path / "data", [(8, 8)])
    table = data / "labels.csv"
    table.write_bytes(text.encode(encoding))
    return table


def test_csv_empty_label_is_not_a_class(tmp_path):
    table = _csv(tmp_path, "path,label\na/0.png,x\na/1.png,\nb/0.png,y\n")
    with pytest.raises(UserError, match=r"1 row\(s\) have an empty 'label'.*lines \[3\]"):
        dataset_shape(0, {"name": "image_csv", "path": str(table)})


def test_csv_encoding_and_columns(tmp_path):
    table = _csv(tmp_path, "path,label\na/0.png,café\nb/0.png,thé\n", encoding="latin-1")
    with pytest.raises(UserError, match="is not UTF-8 text .*save it as UTF-8"):
        dataset_shape(0, {"name": "image_csv", "path": str(table)})
    table.write_bytes("\ufeffpath,label\na/0.png,café\nb/0.png,thé\n".encode())  # a BOM is fine
    assert dataset_shape(0, {"name": "image_csv", "path": str(table)}) == (3, 8, 8)
    with pytest.raises(UserError, match="has no column 'file'"):
        dataset_shape(0, {"name": "image_csv", "path": str(table), "path_column": "file"})


def test_run_refuses_before_any_work_in_one_line(tmp_path, capsys):
    data = _folder(tmp_path / "data", [(8, 8), (9, 9)])
    code = main(["run", "--no-progress", f"output_dir={tmp_path / 'runs'}", "name=pf", "studies=[]",
                 f"datasets=[{{name: image_folder, path: {data}}}]"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "set image_size" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_more_mixture_components_than_training_images_per_class_are_refused(tmp_path, capsys):
    data = _folder(tmp_path / "data", [(8, 8)], per_class=20)  # 40 images, 2 classes: 14 training images a class
    datasets = f"datasets=[{{name: image_folder, path: {data}}}]"
    with pytest.raises(UserError, match=r"hfc.n_components=15 is more than the about 14 training images per class"):
        preflight(_config(tmp_path, datasets, "hfc.n_components=15"), _context(tmp_path))
    preflight(_config(tmp_path, datasets, "hfc.n_components=14"), _context(tmp_path))
    preflight(_config(tmp_path, datasets, "hfc.n_components=15", "hfc.enabled=false"), _context(tmp_path))
    code = main(["run", "--no-progress", f"output_dir={tmp_path / 'runs'}", "name=pf", "studies=[]",
                 "hfc.n_components=1000", "datasets=[{name: fundus-synth, task: binary, n: 300}]"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "hfc.n_components=1000 is more than the about 105" in err
    assert not (tmp_path / "runs").exists()
