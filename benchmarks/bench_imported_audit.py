"""A clinical bring-your-own-model audit on the CPU: an imported 240 px VGG-16 on a 27-image attack pool.

The setup of a vendor's audit: VGG-16 (random weights: the cost does not depend on them; a constant classifier is
the attack's worst case, since HFC's weight calibration then tries its whole grid) exported to ONNX at 240 px, an
image folder of ``--images`` PNGs in two classes drawn from the embedded fundus generator, and the audit settings of
``--preset`` under the benchmark's own config: ``clinical`` (the default: the core audit for large models on a
CPU, PGD plain and with HFC, eight detectors in two layer arms) or ``default`` (``hfc-engine run``'s defaults: PGD
and CW-Linf, HFC, the weight-0 and adaptive sets), both without the studies (they train their own models). With
the default split (15% test) 180 images give a 28-image pool.

The audit runs as ``hfc-engine run`` in a child process; printed: wall seconds, the child's peak resident memory
(``ru_maxrss``), the per-stage seconds of its run card, and per cell (from the run's store) its stage, what it ran,
its seconds and the child's peak resident memory while it ran (sampled every ``SAMPLE_SECONDS``).

Run: ``python benchmarks/bench_imported_audit.py [--preset clinical|default] [--images 180] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
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
SAMPLE_SECONDS = 0.5


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


def sample_rss(pid: int, samples: list[tuple[float, float]], done: threading.Event) -> None:
    """Append (time, resident GiB) of process ``pid`` every SAMPLE_SECONDS until ``done``."""
    while not done.wait(SAMPLE_SECONDS):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        samples.append((time.time(), kib / 2**20))


def cell_table(store: Path, samples: list[tuple[float, float]]) -> list[dict[str, object]]:
    """Each finished cell in order: stage, what it ran (its rows' attack, detector and arm), seconds, peak GiB."""
    db = sqlite3.connect(store)
    cells = db.execute("SELECT key, stage, seconds, finished FROM cells ORDER BY finished").fetchall()
    table = []
    for key, stage, seconds, finished in cells:
        what = db.execute("SELECT DISTINCT attack, detector, arm, hfc FROM rows WHERE cell = ?", (key,)).fetchall()
        ran = sorted({"/".join(str(v) for v in (a, d, arm) if v) for a, d, arm, _ in what} - {""})
        peak = max((rss for t, rss in samples if finished - seconds <= t <= finished), default=None)
        table.append({"stage": stage, "ran": ran[:2], "seconds": round(seconds, 1),
                      "peak_rss_gib": None if peak is None else round(peak, 2)})  # fmt: skip
    db.close()
    return table


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
        samples: list[tuple[float, float]] = []
        done = threading.Event()
        start = time.perf_counter()
        child = subprocess.Popen(command)
        sampler = threading.Thread(target=sample_rss, args=(child.pid, samples, done))
        sampler.start()
        code = child.wait()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
        if code:
            raise SystemExit(f"the audit failed with exit code {code}")
        run_dir = tmp_path / "runs" / "imported-vgg16"
        card = json.loads((run_dir / "run_card.json").read_text())
        for cell in cell_table(run_dir / "store.sqlite", samples):
            print(json.dumps(cell))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(json.dumps({"preset": args.preset, "wall_seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2),
                      "seconds_per_stage": card["seconds_per_stage"]}))  # fmt: skip


if __name__ == "__main__":
    main()
