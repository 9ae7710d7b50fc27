"""Clinical resolution on the CPU: VGG-16 and ResNet-50 at 224 px, PGD-10 with and without HFC, and the ONNX import.

Each variant runs in its own process so that its peak resident memory (``ru_maxrss``) is its own:

- ``pgd`` (VGG-16) and ``pgd-resnet50``: engine PGD, 10 steps, on ``--images`` random 224 px images (random
  weights: the cost does not depend on them), batch size from :func:`engine.models.memory.auto_batch_size` as in a
  run. ``floor_ratio`` is this machine's floor over the measured time: the attack's model FLOPs (10 forward passes
  with an input-gradient backward each, counted by ``torch.utils.flop_counter``, plus the final forward pass) at
  the sgemm rate measured in the same process (1 would be a model running every FLOP at the sgemm rate);
- ``hfc``: the VGG-16 attack, targeted, with the HFC term (nearest mode, weight 1) on every activation of VGG-16,
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
from torch.utils.flop_counter import FlopCounterMode

from engine.attacks import HFC, PGD, fit_hfc_gmms
from engine.bench.harness import sgemm_seconds
from engine.models import build_model, load_model
from engine.models.memory import auto_batch_size

SHAPE = (3, 224, 224)
EPS = 8 / 256
STEPS = 10
VARIANTS = {"pgd": "vgg16", "pgd-resnet50": "resnet50", "hfc": "vgg16", "onnx": "vgg16"}  # variant -> architecture
SGEMM_SIZE = 2048


def network(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(arch, 2).eval()


def attack_flops(model: torch.nn.Module, images: int) -> float:
    """Model FLOPs of PGD-``STEPS`` on ``images`` images: per step a forward pass and the input-gradient backward
    (weights frozen, as an attack needs no weight gradient), then one forward pass for the final prediction."""
    x = torch.rand(1, *SHAPE, requires_grad=True)
    weights = [p for p in model.parameters() if p.requires_grad]
    for p in weights:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as step:
            model(x).sum().backward()
        with FlopCounterMode(display=False) as forward, torch.no_grad():
            model(x)
    finally:
        for p in weights:
            p.requires_grad_(True)
    return images * (STEPS * step.get_total_flops() + forward.get_total_flops())


def sgemm_rate() -> float:
    """FLOP/s of one square float32 matmul of side ``SGEMM_SIZE`` (median of 5): this machine's floor."""
    return 2 * SGEMM_SIZE**3 / sgemm_seconds(SGEMM_SIZE, SGEMM_SIZE, SGEMM_SIZE)


def attack(variant: str, images: int) -> dict[str, float]:
    """Images/s of PGD-10 (plain or with HFC) at 224 px, and its floor ratio."""
    model = network(VARIANTS[variant])
    x = torch.rand(images, *SHAPE, generator=torch.Generator().manual_seed(1))
    y = torch.arange(images) % 2
    batch = auto_batch_size(model, SHAPE, backward=True)
    constraint = None
    if variant == "hfc":
        train = (torch.rand(32, *SHAPE, generator=torch.Generator().manual_seed(2)), torch.arange(32) % 2)
        gmms = fit_hfc_gmms(model, train, "activations", n_components=1, reg_covar=1e-2)
        constraint = HFC(gmms, lam=1.0, mode="nearest")
    pgd = PGD(model, eps=EPS, steps=STEPS, targeted=variant == "hfc", constraint=constraint)
    rate = sgemm_rate()
    start = time.perf_counter()
    for lo in range(0, images, batch):
        pgd(x[lo : lo + batch], (1 - y if variant == "hfc" else y)[lo : lo + batch])
    seconds = time.perf_counter() - start
    rate = max(rate, sgemm_rate())  # the better of the rates before and after: a conservative ratio
    floor = attack_flops(model, images) / rate
    return {
        "batch_size": batch,
        "seconds": seconds,
        "images_per_second": images / seconds,
        "sgemm_gflops": rate / 1e9,
        "floor_ratio": floor / seconds,
    }


def onnx_import() -> dict[str, float]:
    """Export VGG-16 to ONNX, then time the import and report its parity with onnxruntime."""
    model = network("vgg16")
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
    print(f"{SHAPE[1]} px, eps {EPS:.4f}, {args.images} images, {args.threads} threads")
    for variant in VARIANTS:
        options = [f"--variant={variant}", f"--images={args.images}", f"--threads={args.threads}"]
        command = [sys.executable, __file__, *options]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(variant, VARIANTS[variant], ", ".join(f"{k} {v:.4g}" for k, v in result.items()))


if __name__ == "__main__":
    main()
