"""Clinical resolution on the CPU: VGG-16 at 224 px, PGD-10 with and without HFC, and the ONNX import of the model.

Each variant runs in its own process so that its peak resident memory (``ru_maxrss``) is its own:

- ``pgd``: engine PGD, 10 steps, on ``--images`` random 224 px images (random weights: the cost does not depend on
  them), batch size from :func:`engine.models.memory.auto_batch_size` as in a run;
- ``hfc``: the same attack, targeted, with the HFC term (nearest mode, weight 1) on every activation of VGG-16,
  one Gaussian per class fitted on features of 32 random images (the fit is part of the peak, as in an audit);
- ``onnx``: VGG-16 exported with ``torch.onnx`` and imported with ``engine.models.load_model`` (conversion time and
  the largest logit difference to onnxruntime on the same inputs).

Run: ``python benchmarks/bench_clinical.py [--images 4] [--threads 2]``.
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

import torch

from engine.attacks import HFC, PGD, fit_hfc_gmms
from engine.models import build_model, load_model
from engine.models.memory import auto_batch_size

SHAPE = (3, 224, 224)
EPS = 8 / 256
VARIANTS = ("pgd", "hfc", "onnx")


def vgg16() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vgg16", 2).eval()


def attack(variant: str, images: int) -> dict[str, float]:
    """Images/s of PGD-10 (plain or with HFC) on VGG-16 at 224 px."""
    model = vgg16()
    x = torch.rand(images, *SHAPE, generator=torch.Generator().manual_seed(1))
    y = torch.arange(images) % 2
    batch = auto_batch_size(model, SHAPE, backward=True)
    constraint = None
    if variant == "hfc":
        train = (torch.rand(32, *SHAPE, generator=torch.Generator().manual_seed(2)), torch.arange(32) % 2)
        gmms = fit_hfc_gmms(model, train, "activations", n_components=1, reg_covar=1e-2)
        constraint = HFC(gmms, lam=1.0, mode="nearest")
    pgd = PGD(model, eps=EPS, steps=10, targeted=variant == "hfc", constraint=constraint)
    start = time.perf_counter()
    for lo in range(0, images, batch):
        pgd(x[lo : lo + batch], (1 - y if variant == "hfc" else y)[lo : lo + batch])
    seconds = time.perf_counter() - start
    return {"batch_size": batch, "seconds": seconds, "images_per_second": images / seconds}


def onnx_import() -> dict[str, float]:
    """Export VGG-16 to ONNX, then time the import and report its parity with onnxruntime."""
    model = vgg16()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vgg16.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.rand(1, *SHAPE),), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "n"}})  # fmt: skip
        start = time.perf_counter()
        imported = load_model(path)
        seconds = time.perf_counter() - start
        x = torch.rand(2, *SHAPE)
        with torch.no_grad():
            gap = float((imported(x) - model(x)).abs().max())
    conversion = imported.meta["conversion"]
    return {
        "import_seconds": seconds,
        "onnxruntime_max_abs_diff": conversion["max_abs_diff"],
        "torch_max_abs_diff": gap,
    }


def measure(variant: str, images: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    out = onnx_import() if variant == "onnx" else attack(variant, images)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.images, args.threads)))
        return
    print(f"VGG-16, {SHAPE[1]} px, eps {EPS:.4f}, {args.images} images, {args.threads} threads")
    for variant in VARIANTS:
        options = [f"--variant={variant}", f"--images={args.images}", f"--threads={args.threads}"]
        command = [sys.executable, __file__, *options]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(variant, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))


if __name__ == "__main__":
    main()
