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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """What :func:`train` does, given the model and the data (checked when built; a bad value raises UserError).

    AdamW with ``lr`` and ``weight_decay`` on ``batch_size`` images a step (``balanced``: class-balanced sampling
    with replacement; ``augment``: True for the default :class:`Augment`, False or an Augment), ``schedule``
    "cosine" (with warm-up) or "onecycle", at most ``max_steps_per_epoch`` steps an epoch, for ``epochs`` epochs
    or until ``patience`` epochs bring no improvement of the validation ``monitor``. ``seed`` fixes the
    shuffling, augmentation and dropout of every epoch. ``snapshots`` keeps every epoch's weights,
    ``snapshot_every`` every k-th step's (see :func:`train`).
    """

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.05
    balanced: bool = False
    augment: bool | Augment = True
    patience: int = 5
    seed: int = 0
    schedule: str = "cosine"
    monitor: str = "loss"
    max_steps_per_epoch: int | None = None
    snapshots: bool = False
    snapshot_every: int | None = None

    def __post_init__(self) -> None:
        _check("epochs", self.epochs, _is_int(self.epochs) and self.epochs >= 1, "an int >= 1")
        _check("lr", self.lr, isinstance(self.lr, (int, float)) and self.lr > 0, "a number > 0")
        _check("batch_size", self.batch_size, _is_int(self.batch_size) and self.batch_size >= 1, "an int >= 1")
        decay_ok = isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0
        _check("weight_decay", self.weight_decay, decay_ok, "a number >= 0")
        _check("balanced", self.balanced, isinstance(self.balanced, bool), "true or false")
        _check("augment", self.augment, isinstance(self.augment, (bool, Augment)), "true, false or an Augment")
        _check("patience", self.patience, _is_int(self.patience) and self.patience >= 1, "an int >= 1")
        _check("seed", self.seed, _is_int(self.seed), "an int")
        _check("schedule", self.schedule, self.schedule in SCHEDULES, f"one of {SCHEDULES}")
        _check("monitor", self.monitor, self.monitor in MONITORS, f"one of {tuple(MONITORS)}")
        steps = self.max_steps_per_epoch
        _check("max_steps_per_epoch", steps, steps is None or (_is_int(steps) and steps >= 1), "None or an int >= 1")
        _check("snapshots", self.snapshots, isinstance(self.snapshots, bool), "true or false")
        every = self.snapshot_every
        _check("snapshot_every", every, every is None or (_is_int(every) and every >= 1), "None or an int >= 1")

    @classmethod
    def split(cls, settings: Mapping[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
        """The TrainConfig of the training keys of ``settings`` and the other keys (e.g. build options)."""
        names = {f.name for f in fields(cls)}
        rest = {k: v for k, v in settings.items() if k not in names}
        return cls(**{k: v for k, v in settings.items() if k in names}), rest

    def augmenter(self) -> Augment | None:
        return Augment() if self.augment is True else (self.augment or None)


def _check_model_and_data(model: ImageClassifier, data: Any, monitor: str) -> np.ndarray:
    """The training labels, after checking that the model and ``data`` (.train, .val) fit each other."""
    if not isinstance(model, ImageClassifier):
        raise UserTypeError(f"model must be an ImageClassifier from build_model, got {type(model).__name__}")
    train_ds, val_ds = getattr(data, "train", None), getattr(data, "val", None)
    if train_ds is None or val_ds is None:
        raise UserTypeError("data must have .train and .val datasets (e.g. engine.data.split_dataset(...))")
    num_classes = model.config["num_classes"]
    _check("monitor", monitor, monitor != "auc" or num_classes == 2, "'auc' only for 2-class models")
    _check("monitor", monitor, monitor != "kappa" or num_classes > 2, "'kappa' only for > 2-class models")
    targets = _targets(train_ds)
    if len(targets) == 0 or len(val_ds) == 0:
        raise UserError(f"data.train and data.val must be non-empty, got {len(targets)} and {len(val_ds)} items")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise UserError(f"data.train labels must be in [0, {num_classes - 1}] (the model's num_classes)")
    classes = getattr(train_ds, "classes", None)
    if classes is not None and len(classes) != num_classes:
        raise UserError(f"data.train has {len(classes)} classes but the model has num_classes={num_classes}")
    return targets


def _run_key(model: ImageClassifier, config: TrainConfig, data: Any) -> dict[str, Any]:
    """What determines the trained weights: the model's build config, ``config`` and the data (split hash and
    sizes). ``out_dir/last.pt`` resumes only under the same key; the checkpoint records it as ``train_config``."""
    return {
        "config": model.config,
        "epochs": config.epochs,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "weight_decay": config.weight_decay,
        "balanced": config.balanced,
        "augment": repr(config.augmenter()),
        "seed": config.seed,
        "schedule": config.schedule,
        "monitor": config.monitor,
        "n_train": len(data.train),
        "n_val": len(data.val),
        "split_hash": getattr(data, "hash", None),
        "max_steps_per_epoch": config.max_steps_per_epoch,
        **({"snapshots": True} if config.snapshots else {}),  # absent when off: older last.pt files still resume
        **({"snapshot_every": config.snapshot_every} if config.snapshot_every else {}),
    }


def train(
    model: ImageClassifier,
    data: Any,
    config: TrainConfig = TrainConfig(),
    out_dir: str | os.PathLike = "runs/train",
    *,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` (from build_model) on ``data.train`` as ``config`` says, early-stopping on ``config.monitor``
    over ``data.val`` (``data``: engine.data.Splits or anything with ``.train``, ``.val``, optional ``.test``
    and ``.hash``).

    The best weights are restored and saved with metadata to ``out_dir/model.pt`` (``TrainResult.checkpoint``);
    ``data.test`` (optional) is evaluated with them. With ``resume=True`` an existing ``out_dir/last.pt`` of the
    same model build, config and data is continued. ``config.snapshots`` also keeps every epoch's weights as
    ``out_dir/epochs/<epoch>.pt`` (epochs from 1, their validation metrics in the metadata), e.g. to pick a
    checkpoint by validation accuracy. ``config.snapshot_every=k`` does the same every k optimizer steps (counted
    from the start of training): the weights go to ``out_dir/steps/<step>.pt`` and their validation metrics (with
    ``step`` and ``epoch``) to the epoch's history record under ``"snapshots"``. The global random state is
    restored after each snapshot's evaluation, so the training is the same with or without snapshots.
    """
    _check("config", config, isinstance(config, TrainConfig), "a TrainConfig")
    targets = _check_model_and_data(model, data, config.monitor)
    train_ds, val_ds = data.train, data.val
    batch_size, epochs = config.batch_size, config.epochs
    classes = getattr(train_ds, "classes", None)
    out_dir = Path(out_dir)
    last_path, final_path = out_dir / "last.pt", out_dir / "model.pt"
    run_key = _run_key(model, config, data)
    meta: dict[str, Any] = {
        "input_size": list(train_ds[0][0].shape),
        "classes": list(classes) if classes is not None else None,
        "dataset": getattr(train_ds, "name", None),
        "split_hash": run_key["split_hash"],
        "train_config": run_key,
    }

    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    drop_last = len(targets) > batch_size  # avoids a final batch of one sample (BatchNorm cannot train on it)
    steps = len(targets) // batch_size if drop_last else 1
    steps = min(steps, config.max_steps_per_epoch) if config.max_steps_per_epoch else steps
    sched = _scheduler(opt, config.schedule, config.lr, epochs * steps)
    sign = MONITORS[config.monitor]
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
        if config.snapshot_every and step % config.snapshot_every == 0:
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

    augmenter = config.augmenter()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            for epoch in range(state["epoch"] + 1, epochs):
                if state["stop"]:
                    break
                record = _run_epoch(
                    model, train_ds, targets, opt, sched, augmenter=augmenter, balanced=config.balanced,
                    batch_size=batch_size, drop_last=drop_last, steps=steps, seed=config.seed, epoch=epoch,
                    device=device, progress=progress, epochs=epochs, on_step=snapshot,
                )  # fmt: skip
                if config.snapshot_every:
                    record["snapshots"] = taken[:]
                    taken.clear()
                val = evaluate(model, val_ds, batch_size=max(batch_size, 128))
                record.update({f"val_{k}": v for k, v in val.items() if k != "confusion"})
                score = sign * val[config.monitor]
                if state["best_state"] is None or score > state["best_score"]:  # a NaN metric keeps epoch 0
                    state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
                    state["best_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                else:
                    state["bad_epochs"] += 1
                state["history"].append(record)
                state.update(epoch=epoch, stop=state["bad_epochs"] >= config.patience)
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
                if config.snapshots:
                    save_checkpoint(out_dir / "epochs" / f"{epoch + 1}.pt", model, {**meta, "epoch_metrics": record})
    finally:
        torch.use_deterministic_algorithms(deterministic)

    model.load_state_dict(state["best_state"])
    model.eval()
    best_val = evaluate(model, val_ds, batch_size=max(batch_size, 128))
    metrics: dict[str, Any] = {"val": best_val}
    test_ds = getattr(data, "test", None)
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
    data: Any,
    arch: str = "resnet18",
    config: TrainConfig = TrainConfig(),
    out_dir: str | os.PathLike = "runs/train",
    *,
    normalization: str = "dataset",
    pretrained: str | os.PathLike | None = None,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    **build: Any,
) -> TrainResult:
    """Build ``arch`` for ``data`` (``.train``, ``.val``, optional ``.test`` and ``.hash``) and :func:`train` it.

    ``num_classes``, ``in_channels`` and ``input_size`` come from the data; ``normalization`` is ``"dataset"``
    (per-channel mean/std of the training images), ``"imagenet"`` or ``"none"`` (mean 0, std 1); ``pretrained``
    is a torchvision state_dict file loaded into the backbone except its classifier head. ``build`` are the
    architecture's build options (``width``, ``dropout``, ``small_stem``, ``pool_size``, ...; see build_model).
    Returns the TrainResult; ``.checkpoint`` is the model file. The initial weights depend only on
    ``config.seed``.
    """
    train_ds = getattr(data, "train", None)
    if train_ds is None or getattr(data, "val", None) is None:
        raise UserTypeError("data must have .train and .val datasets (e.g. engine.data.split_dataset(...))")
    _check(
        "normalization",
        normalization,
        normalization in ("dataset", "imagenet", "none"),
        "'dataset', 'imagenet' or 'none'",
    )
    if arch not in ARCHITECTURES:
        raise UserError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    image = train_ds[0][0]
    classes = getattr(train_ds, "classes", None)
    num_classes = len(classes) if classes is not None else int(_targets(train_ds).max()) + 1
    build.update(in_channels=int(image.shape[0]), input_size=int(image.shape[-1]))
    if normalization == "dataset":
        build["mean"], build["std"] = channel_stats(train_ds)
    elif normalization == "none":
        build["mean"], build["std"] = [0.0] * image.shape[0], [1.0] * image.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(arch, num_classes, **build)
    if pretrained is not None:
        weights = torch.load(Path(pretrained).expanduser(), map_location="cpu", weights_only=True)
        load_torchvision_state_dict(model, weights, skip_classifier=True)
    return train(model, data, config, out_dir, device=device, resume=resume, progress=progress)
