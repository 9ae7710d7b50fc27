"""UAP fooling rate vs time: the classic DeepFool-UAP, its batched variant and SGD-UAP, same model, data and eps.

* :func:`engine.attacks.deepfool_uap` -- the classic algorithm (Moosavi-Dezfooli et al. 2017): one image at a
  time, a DeepFool step for each image v does not fool yet, projection after each step (the reference; it equals
  a direct per-image loop, tests/test_uap.py).
* :func:`engine.attacks.deepfool_uap_batched` -- the batched variant (not the same algorithm): DeepFool from the
  same v for the not-yet-fooled images of a batch of 32, the converged steps summed, one projection per batch.
* :func:`engine.attacks.sgd_uap` with ``loss="margin"`` (clamped logit margin of the clean prediction, kappa 1),
  step eps/5 decaying linearly to 0, for reference: another algorithm family.

Same budget for all: L-inf eps 10/255, the fooling-rate target 1 - delta = 0.8 on the fitting set, at most
``max_passes`` passes (epochs); DeepFool with at most 50 iterations and overshoot 0.02. Data: ``fundus-synth``
5-grade task at 32x32 (600 images: 400 to fit, 200 held out); model: ResNet-18 with ``width=0.125,
small_stem=True`` trained briefly here. Reported, from the per-pass histories: the fit-set fooling rate against
seconds after every pass, the seconds each variant takes to reach the fit-set rate the classic loop ends with
(speed-up = classic seconds / variant seconds), and held-out fooling and kappa.

Run: ``python benchmarks/bench_uap.py`` or ``python -m pytest benchmarks/bench_uap.py --benchmark-only``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from harness import record  # noqa: E402

from engine.attacks import deepfool_uap, deepfool_uap_batched, sgd_uap  # noqa: E402
from engine.attacks.uap import predict  # noqa: E402
from engine.data import load_dataset  # noqa: E402
from engine.models import build_model  # noqa: E402

EPS = 10 / 255
DELTA = 0.2


def time_to_reach(history: list[dict], rate: float) -> float | None:
    """Seconds of the first pass/epoch whose fit-set fooling rate is >= ``rate`` (None if never)."""
    return next((h["seconds"] for h in history if h["fit_rate"] >= rate - 1e-9), None)


def fundus_split(task: str, n: int, n_fit: int, size: int = 32):
    """((images, labels) to fit, (images, labels) held out) from the embedded fundus-synth data."""
    ds = load_dataset("fundus-synth", task=task, n=n, image_size=size)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    return (images[:n_fit], labels[:n_fit]), (images[n_fit:], labels[n_fit:])


def trained_model(fit, num_classes: int = 5, epochs: int = 8) -> torch.nn.Module:
    """A ResNet-18 (width 0.125, small stem) trained briefly on ``fit`` = (images, labels) with Adam."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes, width=0.125, small_stem=True, input_size=fit[0].shape[-1])
    x, y = fit
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    return model


def run(max_passes: int = 5, threads: int = 1) -> list[dict]:
    torch.set_num_threads(threads)
    fit, heldout = fundus_split("grade", 600, 400)
    model = trained_model(fit)
    print(
        f"clean accuracy: fit {float((predict(model, fit[0]) == fit[1]).float().mean()):.3f}, "
        f"held-out {float((predict(model, heldout[0]) == heldout[1]).float().mean()):.3f}"
    )
    common = dict(eps=EPS, heldout=heldout, delta=DELTA)
    results = {  # op name in the CSV rows -> result
        "deepfool_uap": deepfool_uap(model, fit, max_passes=max_passes, **common),
        "deepfool_uap_batched": deepfool_uap_batched(model, fit, max_passes=max_passes, batch_size=32, **common),
        "sgd_uap_margin": sgd_uap(
            model, fit, epochs=max_passes, loss="margin", step_size=EPS / 5, schedule="linear", **common
        ),
    }
    classic = results["deepfool_uap"].history
    goal, t_classic = classic[-1]["fit_rate"], classic[-1]["seconds"]
    shape = f"resnet18w0.125 fundus-synth 5-grade 400 fit/200 held-out 32px eps=10/255 fool>={goal:.3f}"
    rows = []
    for name, result in results.items():
        t = time_to_reach(result.history, goal)
        reached = f"reaches {goal:.3f} in {t:.1f} s ({t_classic / t:.1f}x)" if t else f"never reaches {goal:.3f}"
        print(
            f"{name:20s} {reached}; held-out fooling {result.fooling_rate:.3f}, kappa {result.kappa:.3f} "
            f"(clean {result.clean_kappa:.3f})\n  per pass/epoch (fit rate, s): {curve(result.history)}"
        )
        if t and name != "deepfool_uap":
            rows.append(record(name, shape, "float32", (t, 0.0), "classic DeepFool-UAP", t_classic, 0, t))
    return rows


def curve(history: list[dict]) -> list[tuple[float, float]]:
    return [(round(h["fit_rate"], 3), round(h["seconds"], 1)) for h in history]


def test_uap_speed(benchmark):
    rows = benchmark.pedantic(lambda: run(max_passes=3), rounds=1, iterations=1)
    benchmark.extra_info.update({r["op"]: r["speedup"] for r in rows})


if __name__ == "__main__":
    run()
