"""Contact sheets (PNG grids of labelled samples) and a learnability probe (a tiny CNN's held-out accuracy).

``python -m engine.data.preview fundus-synth --task binary --sheet docs/img/fundus.png --epochs 8`` writes a sheet
and prints the tiny CNN's accuracy on a held-out split.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from engine.data.base import ImageDataset
from engine.data.splits import split_dataset
from engine.data.synthetic import synthetic


def contact_sheet(
    ds: ImageDataset, path: str | Path, rows: int = 8, cols: int = 8, scale: int = 2, seed: int = 0
) -> Path:
    """Save a rows x cols grid of samples (equal share per class, sorted by class) captioned with class names."""
    rng = np.random.default_rng(seed)
    per_class = int(np.ceil(rows * cols / ds.num_classes))
    picks = [rng.permutation(np.flatnonzero(ds.targets == c))[:per_class] for c in range(ds.num_classes)]
    order = np.concatenate(picks)[: rows * cols]
    first = ds[int(order[0])][0]
    h, w = first.shape[1] * scale, first.shape[2] * scale
    cap = 12
    sheet = Image.new("RGB", (cols * (w + 2), rows * (h + cap + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(order):
        img, label = ds[int(i)]
        arr = (img.expand(3, -1, -1) if img.shape[0] == 1 else img).permute(1, 2, 0).numpy()
        tile = Image.fromarray(np.rint(arr * 255).astype(np.uint8)).resize((w, h), Image.NEAREST)
        x, y = (k % cols) * (w + 2), (k // cols) * (h + cap + 2)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + h), ds.classes[label][: max(4, w // 6)], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def tiny_cnn(in_channels: int, num_classes: int, width: int = 16) -> nn.Module:
    """Three conv-BN-ReLU-pool stages, global average pooling and a linear head (~25k parameters at width 16)."""
    layers, c = [], in_channels
    for k in (1, 2, 4):
        layers += [nn.Conv2d(c, width * k, 3, padding=1), nn.BatchNorm2d(width * k), nn.ReLU(), nn.MaxPool2d(2)]
        c = width * k
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def _tensors(ds: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def learnability(ds: ImageDataset, epochs: int = 8, seed: int = 0, batch_size: int = 64, lr: float = 3e-3) -> dict:
    """Train ``tiny_cnn`` on a 70/15/15 stratified split; return train/val/test accuracy of the best-val epoch."""
    torch.manual_seed(seed)
    splits = split_dataset(ds, 0.15, 0.15, seed)
    (xtr, ytr), (xva, yva), (xte, yte) = (_tensors(p) for p in splits)
    model = tiny_cnn(xtr.shape[1], ds.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(xtr) // batch_size))
    gen = torch.Generator().manual_seed(seed)

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
        return float((pred == y).float().mean())

    best = {"val": -1.0}
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), batch_size):
            idx = perm[i : i + batch_size]
            xb = xtr[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # the only augmentation: horizontal flips
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = accuracy(xva, yva)
        if val > best["val"]:
            best = {"epoch": epoch + 1, "train": accuracy(xtr, ytr), "val": val, "test": accuracy(xte, yte)}
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("name")
    p.add_argument("--task")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contrast", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--sheet", help="write a contact sheet PNG here")
    p.add_argument("--no-cache", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    ds = synthetic(
        args.name, args.n, args.image_size, args.seed, args.task, contrast=args.contrast, cache=not args.no_cache
    )
    print(f"{ds!r}: ready in {time.perf_counter() - t0:.1f}s")
    if args.sheet:
        print("sheet:", contact_sheet(ds, args.sheet))
    if args.epochs:
        t0 = time.perf_counter()
        res = learnability(ds, args.epochs, args.seed)
        print(
            f"tiny CNN ({args.epochs} epochs, {time.perf_counter() - t0:.0f}s): "
            + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())
        )


if __name__ == "__main__":
    main()
