"""A clinical bring-your-own-model audit on the CPU: an imported 240 px VGG-16 on a 27-image attack pool.

The setup of a vendor's audit: VGG-16 (random weights: the cost does not depend on them; a constant classifier is
the attack's worst case, since HFC's weight calibration then tries its whole grid) exported to ONNX at 240 px, an
image folder of ``--images`` PNGs in two classes drawn from the embedded fundus generator, and the audit settings of
``--preset`` under the benchmark's own config: ``clinical`` (the default: the core audit for large models on a
CPU, PGD plain and with HFC, eight detectors in two layer arms) or ``default`` (``hfc-engine run``'s defaults: PGD
and CW-Linf, HFC, the weight-0 and adaptive sets), both without the studies (they train their own models). With
the default split (15% test) 180 images give a 28-image pool.

The audit runs as ``hfc-engine run`` in a child process; printed: wall seconds, the child's peak resident memory
(``ru_maxrss``), and the per-stage seconds of its run card.

Run: ``python benchmarks/bench_imported_audit.py [--preset clinical|default] [--images 180] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from engine.data import load_dataset
from engine.models import build_model

SIZE = 240


def write_images(root: Path, images: int) -> None:
    """``images`` fundus-synth images (binary task) at ``SIZE`` px as PNGs in ``root/<class>/``."""
    data = load_dataset({"name": "fundus-synth", "task": "binary", "n": images, "image_size": SIZE})
    for i in range(len(data)):
        x, y = data[i]
        folder = root / data.classes[int(y)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.rint(x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def export_vgg16(path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("vgg16", 2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, SIZE, SIZE),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=180, help="images in the folder (15%% of them are attacked)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", choices=["clinical", "default"], default="clinical", help="(default: clinical)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        write_images(tmp_path / "images", args.images)
        export_vgg16(tmp_path / "vgg16.onnx")
        config = {
            "name": "imported-vgg16",
            "output_dir": str(tmp_path / "runs"),
            "threads": args.threads,
            "datasets": [{"name": "image_folder", "path": str(tmp_path / "images"), "label": "fundus-240"}],
            "model": {"checkpoint": str(tmp_path / "vgg16.onnx"), "name": "vgg16-onnx"},
            "studies": [],
        }
        (tmp_path / "audit.yaml").write_text(yaml.safe_dump(config))
        presets = [] if args.preset == "default" else [args.preset]
        command = [sys.executable, "-m", "engine.cli", "run", *presets, str(tmp_path / "audit.yaml"), "--no-progress"]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
        card = json.loads((tmp_path / "runs" / "imported-vgg16" / "run_card.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(json.dumps({"preset": args.preset, "wall_seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2),
                      "seconds_per_stage": card["seconds_per_stage"]}))  # fmt: skip


if __name__ == "__main__":
    main()
