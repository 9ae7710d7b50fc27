"""What both studies share: the result type, config merging, cached model training, tensors from splits, rows."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.sweep.store import ROW_COLUMNS


@dataclass
class StudyResult:
    """A finished study: long-format ``rows`` (keys from ROW_COLUMNS), a JSON-able ``payload`` and the report.

    ``sections()`` builds the HTML report sections from the payload, so a payload loaded back from a results
    store renders the same report (``StudyResult(name, rows, payload).sections()``).
    """

    name: str
    rows: list[dict[str, Any]]
    payload: dict[str, Any]
    seconds: float = 0.0

    def sections(self) -> list[Any]:
        if self.name == "stress":
            from engine.studies.stress import stress_sections

            return stress_sections(self.payload)
        if self.name == "uap":
            from engine.studies.uap_report import uap_sections

            return uap_sections(self.payload)
        raise ValueError(f"unknown study name {self.name!r}; expected 'stress' or 'uap'")


def merge_config(defaults: Mapping[str, Any], config: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """``defaults`` updated recursively by ``config``; unknown keys raise ValueError naming them."""
    out = copy.deepcopy(dict(defaults))
    for key, value in (config or {}).items():
        if key not in out:
            raise ValueError(f"{name} config: unknown key {key!r}; allowed: {sorted(out)}")
        if isinstance(out[key], dict) and isinstance(value, Mapping):
            out[key] = merge_config(out[key], value, f"{name}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (names cached artifacts)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dataset_label(spec: Mapping[str, Any]) -> str:
    """'fundus-synth:binary' style label of a dataset spec (the ``dataset`` column of rows)."""
    name = str(spec["name"])
    return f"{name}:{spec['task']}" if spec.get("task") else name


def load_splits(spec: Mapping[str, Any], seed: int) -> Any:
    """The dataset of ``spec`` (a load_dataset dict) split 70/15/15, stratified and seeded."""
    from engine.data import load_dataset, split_dataset

    return split_dataset(load_dataset(dict(spec)), val=0.15, test=0.15, seed=seed)


def trained_model(splits: Any, model_cfg: Mapping[str, Any], workdir: Path, seed: int, progress: bool) -> nn.Module:
    """Train ``model_cfg`` on ``splits`` once; later calls (a resumed run) load ``workdir/models/<hash>/model.pt``.

    Training writes ``last.pt`` after every epoch and ``model.pt`` at the end, both atomically (write, fsync,
    rename), so an interrupted run resumes from the last finished epoch.
    """
    from engine.models import build_model, channel_stats, load_model, train

    key = {"model": dict(model_cfg), "split": splits.hash, "seed": seed}
    out_dir = Path(workdir) / "models" / fingerprint(key)
    final = out_dir / "model.pt"
    if final.is_file():
        return load_model(final).eval()
    cfg = dict(model_cfg)
    arch = cfg.pop("arch")
    fit = {k: cfg.pop(k) for k in ("epochs", "lr", "batch_size") if k in cfg}
    image = splits.train[0][0]
    mean, std = channel_stats(splits.train)
    with torch.random.fork_rng(devices=[]):  # weight init from the seed, not from whatever ran before
        torch.manual_seed(seed)
        model = build_model(
            arch,
            len(splits.train.classes),
            in_channels=int(image.shape[0]),
            input_size=int(image.shape[-1]),
            mean=mean,
            std=std,
            **cfg,
        )
    result = train(
        model, splits.train, splits.val, out_dir=out_dir, seed=seed, progress=progress, split_hash=splits.hash, **fit
    )
    return result.model.eval()


def cached_finetune(
    workdir: Path, key: Any, model: nn.Module, run: Callable[[], tuple[nn.Module, list[dict[str, Any]]]]
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """(model, history) of a fine-tuning: loaded into ``model`` from ``workdir/finetuned/<hash(key)>.pt`` when a
    previous run saved it, else ``run()``, saved atomically (write, fsync, rename)."""
    from engine.models.checkpoint import atomic_save

    path = Path(workdir) / "finetuned" / f"{fingerprint(key)}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), json.loads(saved["history"])
    tuned, history = run()
    atomic_save({"state_dict": tuned.state_dict(), "history": json.dumps(history)}, path)
    return tuned.eval(), history


def stack(dataset: Any, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` items of a dataset as (images float32 (N,C,H,W), labels int64 (N,))."""
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n < 1:
        raise ValueError("dataset: expected at least one item")
    items = [dataset[i] for i in range(n)]
    return torch.stack([im.float() for im, _ in items]), torch.tensor([int(lb) for _, lb in items])


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """(N,K) softmax probabilities of ``model`` in eval mode."""
    model.eval()
    out = [torch.softmax(model(x[i : i + batch_size]).double(), 1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def row(dataset: str, model: str, metric: str, value: float, **extra: Any) -> dict[str, Any]:
    """One long-format result row; missing columns default to '' / None (detector='' for study rows)."""
    out = {
        "dataset": dataset,
        "model": model,
        "attack": "",
        "eps": None,
        "hfc": False,
        "detector": "",
        "metric": metric,
        "value": float(value),
        "ci_low": None,
        "ci_high": None,
    }
    unknown = set(extra) - set(ROW_COLUMNS)
    if unknown:
        raise ValueError(f"row: unknown columns {sorted(unknown)}; allowed: {ROW_COLUMNS}")
    out.update(extra)
    return out
