"""The gradient certificate's cost at load: VGG-16 (the engine's own, random weights) at 224 px exported to ONNX and
loaded with ``engine.models.load_model``; prints the conversion's seconds, the certificate's seconds and error, and
the certificate's cost as a multiple of one forward pass of the converted model on the same probe (2 images).

Run: ``python benchmarks/bench_certificate.py [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from engine.models import build_model, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vgg = build_model("vgg16", 2).eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "vgg16.onnx"
        torch.onnx.export(vgg, (torch.rand(1, 3, 224, 224),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})  # fmt: skip
        started = time.perf_counter()
        model = load_model(path)
        load = time.perf_counter() - started
    probe = torch.rand(2, 3, 224, 224)
    forward = []
    with torch.no_grad():
        for _ in range(3):
            started = time.perf_counter()
            model(probe)
            forward.append(time.perf_counter() - started)
    conversion = model.meta["conversion"]
    ratio = conversion["gradient_seconds"] / min(forward)
    row = {"load_seconds": load, "conversion": conversion, "forward_seconds": min(forward), "certificate_ratio": ratio}
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
