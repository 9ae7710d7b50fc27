"""Batch scoring (engine.score.Scorer): images/s and each detector's cost as a share of the model's own time.

Setup as the default audit: ResNet-18 width 0.25 with dropout 0.3 (random weights, BatchNorm statistics from the
data; the cost does not depend on the weights) on fundus-synth binary; detectors as the audit fits them: pooled
features of every activation, DNN on every activation's raw map (width 0.25), KD/SVM on the last layer, DNR on
the last three, LID on all, MAHA on the stage outputs (magnitude 0.002, and 0: the fast mode), BU with 50 passes,
typicality on the layers the audit's HFC constrains (two-component mixtures per class, as the audit's).
Fitted on 200 clean images and their noise-perturbed copies (the cost does not depend on what the detectors learnt).

Rows, per runtime (torch; onnxruntime on the export with the detectors' outputs): the model alone (logits of every
image, one forward pass per batch), each detector alone (model + detector), and KD + LID + SVM + DNR + DNN together;
``x_model`` = seconds / the model-alone seconds of the same runtime, measured right before (the machine's load
drifts). Peak RSS: scoring the
data set once and ten times (streamed from a dataset that repeats it) to CSV, each in a fresh process: its resident
memory when scoring starts (torch, onnxruntime, the data set and the detectors loaded) and the highest while scoring.

Run: ``python benchmarks/bench_score.py [--quick] [--images N]`` (full: 3,000 images at 64 px; quick: 300 at 32
px; one JSON row per line as measured) or
``python -m pytest benchmarks/bench_score.py --benchmark-only`` (quick).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from engine.data import load_dataset
from engine.detectors import BU, DNN, DNR, KD, LID, MAHA, SVM, FeatureCache, Typicality
from engine.export import OnnxModel, export_onnx
from engine.mixture import GaussianMixture
from engine.models import (
    build_model,
    early_stages,
    load_model,
    resolve_layers,
    save_checkpoint,
    spatial_layers,
    stage_outputs,
)
from engine.score import Scorer, score_dataset

TOGETHER = ("kd", "lid", "svm", "dnr", "dnn")


def dataset(quick: bool, images: int | None) -> torch.utils.data.Dataset:
    size, n = (32, 300) if quick else (64, 3000)
    return load_dataset("fundus-synth:binary", n=images or n, image_size=size)


def setup(root: Path, quick: bool, images: int | None) -> tuple[Path, dict[str, Path], torch.utils.data.Dataset]:
    """A checkpoint, fitted detectors saved with its fingerprint and thresholds, and the data set to score."""
    data = dataset(quick, images)
    size = data[0][0].shape[-1]
    torch.manual_seed(0)
    model = build_model("resnet18", 2, width=0.25, dropout=0.3, input_size=size)
    x = torch.stack([data[i][0] for i in range(200)])
    y = np.array([int(data[i][1]) for i in range(200)])
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    checkpoint = save_checkpoint(root / "model.pt", model, {"input_size": [3, size, size]})
    shape = (3, size, size)
    layers = resolve_layers(model, "activations")
    cache = FeatureCache(model, layers=layers, raw_layers=spatial_layers(model, layers, shape))
    clean = cache.extract(x, y)
    noisy = cache.extract((x + 8 / 256 * torch.randn_like(x).sign()).clamp(0, 1), y)
    maha_layers = stage_outputs(model, layers, shape)
    detectors = {
        "kd": KD(),
        "lid": LID(),
        "svm": SVM(),
        "dnr": DNR(C=1.0, gamma="scale"),
        "dnn": DNN(width=0.25, epochs=2),
        "maha": MAHA(layers=maha_layers, magnitude=0.002),
        "maha_m0": MAHA(layers=maha_layers, magnitude=0.0),
        "bu": BU(passes=50),
        "typicality": Typicality(),
    }
    hfc_layers = early_stages(model, layers, shape)  # the layers the audit's HFC constrains, with its mixtures
    mixtures = {n: [GaussianMixture.fit(clean.layer(n)[y == c], 2, reg_covar=1e-4) for c in (0, 1)] for n in hfc_layers}
    detectors["typicality"].set_reference(mixtures, clean)
    paths = {}
    for name, det in detectors.items():
        det.fit(cache, clean, noisy)
        det.set_thresholds(det.score(clean))
        paths[name] = det.save(root / "detectors" / name, model=model)
    return checkpoint, paths, data


def batches(data: torch.utils.data.Dataset, batch_size: int) -> list[torch.Tensor]:
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    return [images.float() for images, _ in loader]


def model_alone(checkpoint: Path, shape: tuple[int, ...], root: Path) -> dict[str, Callable[[torch.Tensor], object]]:
    """The model alone, logits of one batch: in torch and in onnxruntime (a logits-only export)."""
    model = load_model(checkpoint)
    onnx = OnnxModel(export_onnx(model, root / "logits.onnx", input_shape=shape))
    return {"torch": torch.no_grad()(model), "onnxruntime": onnx.run}


def timed(step: Callable[[torch.Tensor], object], images: list[torch.Tensor]) -> float:
    """Seconds of ``step`` over every batch, after one untimed warm-up batch."""
    step(images[0])
    start = time.perf_counter()
    for x in images:
        step(x)
    return time.perf_counter() - start


def scoring_seconds(checkpoint: Path, dirs: list[Path], images: list[torch.Tensor], runtime: str) -> float:
    return timed(Scorer(checkpoint, dirs, batch_size=len(images[0]), runtime=runtime).score, images)


def run(quick: bool = False, batch_size: int = 128, images: int | None = None) -> Iterator[dict[str, object]]:
    """Rows, as they are measured: runtime, what was scored, images, seconds, images/s, seconds as a multiple of
    the model alone; then the peak RSS of scoring the data set once and ten times."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint, paths, data = setup(root, quick, images)
        batched = batches(data, batch_size)
        n = sum(len(x) for x in batched)
        alone = model_alone(checkpoint, tuple(batched[0].shape[1:]), root)
        jobs = {name: [path] for name, path in paths.items()}
        jobs["+".join(TOGETHER)] = [paths[name] for name in TOGETHER]
        for runtime in ("torch", "onnxruntime"):
            for what, dirs in jobs.items():
                if runtime == "onnxruntime" and what in ("bu", "maha"):
                    continue  # these run torch passes beside the forward: the runtime changes little
                model_s = timed(alone[runtime], batched)  # right before: the machine's load drifts
                yield _row(runtime, "model alone", n, model_s, model_s)
                yield _row(runtime, what, n, scoring_seconds(checkpoint, dirs, batched, runtime), model_s)
        yield from peak_rss(checkpoint, [paths[name] for name in TOGETHER], len(data), quick)


def _row(runtime: str, what: str, n: int, seconds: float, model_s: float) -> dict[str, object]:
    return {"runtime": runtime, "scored": what, "images": n, "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 1), "x_model": round(seconds / model_s, 3)}  # fmt: skip


class Repeated(torch.utils.data.Dataset):
    """``data`` ``times`` times over, without copying it (images are read from ``data`` as they are asked for)."""

    def __init__(self, data: torch.utils.data.Dataset, times: int) -> None:
        self.data, self.times = data, times

    def __len__(self) -> int:
        return len(self.data) * self.times

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data[i % len(self.data)]


def peak_rss(checkpoint: Path, dirs: list[Path], images: int, quick: bool) -> Iterator[dict[str, object]]:
    """Peak RSS of a fresh process scoring the data set once and ten times to CSV (``score_dataset``, the model
    in onnxruntime)."""
    for times in (1, 10):
        args = [
            sys.executable,
            __file__,
            "--rss",
            str(times),
            str(checkpoint),
            *map(str, dirs),
            "--images",
            str(images),
        ]
        out = subprocess.run(args + (["--quick"] if quick else []), check=True, capture_output=True, text=True)
        yield json.loads(out.stdout.strip().splitlines()[-1])


def _rss_child(times: int, checkpoint: str, dirs: list[str], quick: bool, images: int | None) -> None:
    data = Repeated(dataset(quick, images), times)
    peak, done = [0.0], threading.Event()

    def sample() -> None:  # the process's resident memory every 20 ms while scoring
        while not done.wait(0.02):
            peak[0] = max(peak[0], _rss_mb())

    start_mb = _rss_mb()
    sampler = threading.Thread(target=sample)
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = score_dataset(checkpoint, dirs, data, Path(tmp) / "scores.csv", progress=False, runtime="onnxruntime")
        seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    row = {"runtime": summary.runtime, "scored": f"score_dataset {times}x to CSV", "images": summary.rows}
    print(
        json.dumps(
            {**row, "seconds": round(seconds, 3), "rss_start_mb": round(start_mb), "peak_rss_mb": round(peak[0])}
        )
    )


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def test_score_throughput(benchmark) -> None:
    """Quick mode under pytest-benchmark (one round): every row has a positive time."""
    rows = benchmark.pedantic(lambda: list(run(quick=True, batch_size=64)), rounds=1, iterations=1)
    assert all(r["seconds"] > 0 for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images", type=int, help="images of the data set (default: 3,000; quick: 300)")
    parser.add_argument("--rss", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss:
        _rss_child(int(args.rss[0]), args.rss[1], args.rss[2:], args.quick, args.images)
        return
    for row in run(args.quick, args.batch_size, args.images):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
