"""Training: AdamW, cosine (warm-up) or one-cycle schedule, balanced sampling, augmentation, early stopping.

Deterministic on CPU: epoch e draws its shuffling, augmentation and dropout randomness from generators seeded
with (seed, e), so a run resumed from ``out_dir/last.pt`` (written atomically after every epoch, with the
optimizer, scheduler and early-stopping state) ends with exactly the weights of an uninterrupted run. The final
checkpoint ``out_dir/model.pt`` holds the best-on-validation weights plus metadata (see engine.models.checkpoint).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler
from tqdm.auto import tqdm

from engine.errors import UserError, UserTypeError
from engine.models.augment import Augment
from engine.models.checkpoint import load_checkpoint, save_checkpoint
from engine.models.classifier import ARCHITECTURES, ImageClassifier, build_model, load_torchvision_state_dict
from engine.models.evaluate import channel_stats, evaluate

SCHEDULES = ("cosine", "onecycle")
MONITORS = {"loss": -1.0, "accuracy": 1.0, "auc": 1.0, "kappa": 1.0}  # sign: +1 = higher is better


@dataclass
class TrainResult:
    """Outcome of :func:`train`: the final checkpoint path, the model with the best weights, and the history."""

    checkpoint: Path
    model: ImageClassifier
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def _targets(ds: Dataset) -> np.ndarray:
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = [int(ds[i][1]) for i in range(len(ds))]
    return np.asarray(targets, dtype=np.int64)


def _sampler(targets: np.ndarray, balanced: bool, generator: torch.Generator) -> torch.utils.data.Sampler:
    if not balanced:
        return RandomSampler(range(len(targets)), generator=generator)
    counts = np.bincount(targets)
    weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=generator)


def _scheduler(opt: torch.optim.Optimizer, schedule: str, lr: float, total: int) -> Any:
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    warmup = max(1, min(total // 10, 200))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _check(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise UserError(f"{name} must be {expected}, got {value!r}")


def train(
    model: ImageClassifier,
    train_ds: Dataset,
    val_ds: Dataset,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    balanced: bool = False,
    augment: bool | Augment = True,
    patience: int = 5,
    seed: int = 0,
    out_dir: str | os.PathLike = "runs/train",
    device: str = "cpu",
    *,
    schedule: str = "cosine",
    monitor: str = "loss",
    resume: bool = True,
    progress: bool = True,
    test_ds: Dataset | None = None,
    split_hash: str | None = None,
    max_steps_per_epoch: int | None = None,
    snapshots: bool = False,
    snapshot_every: int | None = None,
) -> TrainResult:
    """Train ``model`` (from build_model) on ``train_ds``, early-stopping on ``monitor`` over ``val_ds``.

    ``patience`` epochs without improvement stop training; the best weights are restored and saved with metadata
    to ``out_dir/model.pt`` (``TrainResult.checkpoint``). ``test_ds`` (optional) is evaluated with the best
    weights. With ``resume=True`` an existing ``out_dir/last.pt`` of the same configuration is continued.
    ``snapshots=True`` also keeps every epoch's weights as ``out_dir/epochs/<epoch>.pt`` (epochs from 1, their
    validation metrics in the metadata), e.g. to pick a checkpoint by validation accuracy. ``snapshot_every=k``
    does the same every k optimizer steps (counted from the start of training): the weights go to
    ``out_dir/steps/<step>.pt`` and their validation metrics (with ``step`` and ``epoch``) to the epoch's history
    record under ``"snapshots"``. The global random state is restored after each snapshot's evaluation, so the
    training is the same with or without snapshots.
    """
    if not isinstance(model, ImageClassifier):
        raise UserTypeError(f"model must be an ImageClassifier from build_model, got {type(model).__name__}")
    _check("epochs", epochs, isinstance(epochs, int) and epochs >= 1, "an int >= 1")
    _check("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "an int >= 1")
    _check("lr", lr, lr > 0, "> 0")
    _check("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
    _check("patience", patience, isinstance(patience, int) and patience >= 1, "an int >= 1")
    every_ok = snapshot_every is None or (isinstance(snapshot_every, int) and snapshot_every >= 1)
    _check("snapshot_every", snapshot_every, every_ok, "None or an int >= 1")
    _check("schedule", schedule, schedule in SCHEDULES, f"one of {SCHEDULES}")
    _check("monitor", monitor, monitor in MONITORS, f"one of {tuple(MONITORS)}")
    num_classes = model.config["num_classes"]
    _check("monitor", monitor, monitor != "auc" or num_classes == 2, "'auc' only for 2-class models")
    _check("monitor", monitor, monitor != "kappa" or num_classes > 2, "'kappa' only for > 2-class models")
    targets = _targets(train_ds)
    if len(targets) == 0 or len(val_ds) == 0:
        raise UserError(f"train_ds and val_ds must be non-empty, got {len(targets)} and {len(val_ds)} items")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise UserError(f"train_ds labels must be in [0, {num_classes - 1}] (the model's num_classes)")
    classes = getattr(train_ds, "classes", None)
    if classes is not None and len(classes) != num_classes:
        raise UserError(f"train_ds has {len(classes)} classes but the model has num_classes={num_classes}")
    augmenter = Augment() if augment is True else (augment or None)

    out_dir = Path(out_dir)
    last_path, final_path = out_dir / "last.pt", out_dir / "model.pt"
    run_key = {
        "config": model.config,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "balanced": balanced,
        "augment": repr(augmenter),
        "seed": seed,
        "schedule": schedule,
        "monitor": monitor,
        "n_train": len(targets),
        "n_val": len(val_ds),
        "split_hash": split_hash,
        "max_steps_per_epoch": max_steps_per_epoch,
        **({"snapshots": True} if snapshots else {}),  # absent when off: older last.pt files still resume
        **({"snapshot_every": snapshot_every} if snapshot_every else {}),
    }
    meta: dict[str, Any] = {
        "input_size": list(train_ds[0][0].shape),
        "classes": list(classes) if classes is not None else None,
        "dataset": getattr(train_ds, "name", None),
        "split_hash": split_hash,
        "train_config": run_key,
    }

    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    drop_last = len(targets) > batch_size  # avoids a final batch of one sample (BatchNorm cannot train on it)
    steps = len(targets) // batch_size if drop_last else 1
    steps = min(steps, max_steps_per_epoch) if max_steps_per_epoch else steps
    sched = _scheduler(opt, schedule, lr, epochs * steps)
    sign = MONITORS[monitor]
    state: dict[str, Any] = {
        "epoch": -1,
        "best_score": -math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "best_state": None,
        "history": [],
        "stop": False,
    }
    taken: list[dict[str, Any]] = []  # the current epoch's step snapshots

    def snapshot(step: int) -> None:
        if snapshot_every and step % snapshot_every == 0:
            with torch.random.fork_rng(devices=[]):  # keeps the epoch's dropout randomness
                val = evaluate(model, val_ds, batch_size=max(batch_size, 128))  # restores train mode
            metrics = {"step": step, "epoch": (step - 1) // steps}
            metrics.update({f"val_{k}": v for k, v in val.items() if k != "confusion"})
            save_checkpoint(out_dir / "steps" / f"{step}.pt", model, {**meta, "step_metrics": metrics})
            taken.append(metrics)

    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path, map_location=device)
        saved = ckpt.get("train_state", {})
        if saved.get("run_key") != run_key:
            raise UserError(
                f"{last_path} belongs to a different training configuration; use another out_dir or resume=False"
            )
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = {k: saved[k] for k in state}

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            for epoch in range(state["epoch"] + 1, epochs):
                if state["stop"]:
                    break
                record = _run_epoch(
                    model, train_ds, targets, opt, sched, augmenter=augmenter, balanced=balanced,
                    batch_size=batch_size, drop_last=drop_last, steps=steps, seed=seed, epoch=epoch, device=device,
                    progress=progress, epochs=epochs, on_step=snapshot,
                )  # fmt: skip
                if snapshot_every:
                    record["snapshots"] = taken[:]
                    taken.clear()
                val = evaluate(model, val_ds, batch_size=max(batch_size, 128))
                record.update({f"val_{k}": v for k, v in val.items() if k != "confusion"})
                score = sign * val[monitor]
                if state["best_state"] is None or score > state["best_score"]:  # a NaN metric keeps epoch 0
                    state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
                    state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                else:
                    state["bad_epochs"] += 1
                state["history"].append(record)
                state.update(epoch=epoch, stop=state["bad_epochs"] >= patience)
                if progress:
                    tqdm.write(
                        f"epoch {epoch + 1}/{epochs} "
                        + " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
                    )
                train_state = {
                    "run_key": run_key,
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    **state,
                }
                save_checkpoint(last_path, model, meta, train_state=train_state)
                if snapshots:
                    save_checkpoint(out_dir / "epochs" / f"{epoch + 1}.pt", model, {**meta, "epoch_metrics": record})
    finally:
        torch.use_deterministic_algorithms(deterministic)

    model.load_state_dict(state["best_state"])
    model.eval()
    best_val = evaluate(model, val_ds, batch_size=max(batch_size, 128))
    metrics: dict[str, Any] = {"val": best_val}
    if test_ds is not None:
        metrics["test"] = evaluate(model, test_ds, batch_size=max(batch_size, 128))
    meta.update(metrics=metrics, history=state["history"], best_epoch=state["best_epoch"])
    save_checkpoint(final_path, model, meta)
    return TrainResult(
        checkpoint=final_path,
        model=model,
        best_epoch=state["best_epoch"],
        epochs_run=state["epoch"] + 1,
        stopped_early=state["stop"] and state["epoch"] + 1 < epochs,
        history=state["history"],
        metrics=metrics,
    )


def _run_epoch(
    model: ImageClassifier,
    train_ds: Dataset,
    targets: np.ndarray,
    opt: torch.optim.Optimizer,
    sched: Any,
    *,
    augmenter: Augment | None,
    balanced: bool,
    batch_size: int,
    drop_last: bool,
    steps: int,
    seed: int,
    epoch: int,
    device: str,
    progress: bool,
    epochs: int,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """One epoch of ``steps`` optimizer steps; randomness seeded from (seed, epoch). ``on_step`` is called after
    every step with the number of steps taken since training began."""
    epoch_seed = seed * 1_000_003 + epoch
    torch.manual_seed(epoch_seed)  # dropout
    sample_gen = torch.Generator().manual_seed(epoch_seed)
    aug_gen = torch.Generator().manual_seed(epoch_seed + 7919)
    loader = DataLoader(
        train_ds,
        batch_size=batch_size,
        sampler=_sampler(targets, balanced, sample_gen),
        drop_last=drop_last,
        generator=sample_gen,
    )
    model.train()
    total, count, start = 0.0, 0, time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        x, y = x.float(), y.long()
        if augmenter is not None:
            x = augmenter(x, aug_gen)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update()
        if on_step is not None:
            on_step(epoch * steps + step + 1)
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch,
        "train_loss": total / max(count, 1),
        "lr": float(opt.param_groups[0]["lr"]),
        "seconds": seconds,
        "images_per_s": count / max(seconds, 1e-9),
    }


def train_model(
    splits: Any,
    arch: str = "resnet18",
    out_dir: str | os.PathLike = "runs/train",
    *,
    normalization: str = "dataset",
    pretrained: str | os.PathLike | None = None,
    **options: Any,
) -> TrainResult:
    """Build ``arch`` for ``splits`` (``.train``, ``.val``, optional ``.test`` and ``.hash``) and :func:`train` it.

    ``num_classes``, ``in_channels`` and ``input_size`` come from the data; ``normalization`` is ``"dataset"``
    (per-channel mean/std of the training images), ``"imagenet"`` or ``"none"`` (mean 0, std 1); ``pretrained``
    is a torchvision state_dict file loaded into the backbone except its classifier head. ``options`` are the
    architecture's build options (``width``, ``dropout``, ``small_stem``, ``pool_size``, ...; see build_model) and
    :func:`train`'s keyword arguments (``epochs``, ``lr``, ``seed``, ...). Returns the TrainResult; ``.checkpoint``
    is the model file. The initial weights depend only on ``seed``.
    """
    train_ds, val_ds = getattr(splits, "train", None), getattr(splits, "val", None)
    if train_ds is None or val_ds is None:
        raise UserTypeError("splits must have .train and .val datasets (e.g. engine.data.split_dataset(...))")
    _check(
        "normalization",
        normalization,
        normalization in ("dataset", "imagenet", "none"),
        "'dataset', 'imagenet' or 'none'",
    )
    if arch not in ARCHITECTURES:
        raise UserError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    build = {k: options.pop(k) for k in list(options) if k in ARCHITECTURES[arch][1]}
    image = train_ds[0][0]
    classes = getattr(train_ds, "classes", None)
    num_classes = len(classes) if classes is not None else int(_targets(train_ds).max()) + 1
    build.update(in_channels=int(image.shape[0]), input_size=int(image.shape[-1]))
    if normalization == "dataset":
        build["mean"], build["std"] = channel_stats(train_ds)
    elif normalization == "none":
        build["mean"], build["std"] = [0.0] * image.shape[0], [1.0] * image.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(options.get("seed", 0)))
        model = build_model(arch, num_classes, **build)
    if pretrained is not None:
        weights = torch.load(Path(pretrained).expanduser(), map_location="cpu", weights_only=True)
        load_torchvision_state_dict(model, weights, skip_classifier=True)
    options.setdefault("split_hash", getattr(splits, "hash", None))
    options.setdefault("test_ds", getattr(splits, "test", None))
    return train(model, train_ds, val_ds, out_dir=out_dir, **options)
