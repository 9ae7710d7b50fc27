"""UAP adversarial fine-tuning (paper B) and the pieces the UAP study shares with it.

:func:`craft_uap` runs one UAP method of engine.attacks.uap with the study's options; :func:`uap_finetune`
fine-tunes a copy of a model on a mix of clean images and images carrying UAPs of the *training* methods,
regenerating those UAPs against the current weights every ``regenerate_every`` epochs; :class:`Ensemble` averages
the members' softmax.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from engine.attacks.uap import UAP_METHODS
from engine.errors import UserError

UAP_KINDS = tuple(UAP_METHODS)  # the UAP algorithms a study evaluates and fine-tunes on (engine.attacks.uap)


def craft_uap(
    model: nn.Module,
    method: str,
    fit: tuple[torch.Tensor, torch.Tensor],
    eps: str | float,
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    norm: str = "linf",
) -> Any:
    """One universal perturbation of kind ``method`` (see UAP_KINDS) and ``norm`` fitted on ``fit`` against
    ``model``; its metrics (engine.attacks.uap.evaluate_uap) are measured on ``heldout`` (default ``fit``).
    ``options`` go to the method (``targeted`` needs ``target``). Returns the UAPResult."""
    if method not in UAP_KINDS:
        raise UserError(f"method must be one of {UAP_KINDS}, got {method!r}")
    opts = dict(options or {})
    common = {"eps": eps, "norm": norm, "heldout": fit if heldout is None else heldout, "seed": seed, **opts}
    if method == "targeted" and "target" not in opts:
        raise UserError("the targeted UAP needs options['target'] (a class index)")
    data = tuple(fit[0].shape[1:]) if UAP_METHODS[method].data_free else fit  # the data-free UAP: only the shape
    return UAP_METHODS[method].craft(model, data, **common)


def uap_finetune(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    methods: Sequence[str],
    eps: str | float,
    *,
    epochs: int = 4,
    regenerate_every: int = 2,
    mix: float = 0.5,
    lr: float = 3e-4,
    batch_size: int = 64,
    fit: int = 300,
    uap_options: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Fine-tune a deep copy of ``model`` on ``data`` (images, labels); returns (model in eval mode, history).

    Every ``regenerate_every`` epochs one UAP per method in ``methods`` is crafted against the current weights
    on the first ``fit`` images; in each minibatch a random share ``mix`` of the images gets one of those UAPs
    (chosen at random), the rest stay clean; cross-entropy, AdamW with learning rate ``lr``.
    """
    if not methods or any(m not in UAP_KINDS for m in methods):
        raise UserError(f"methods must be a non-empty list from {UAP_KINDS}, got {list(methods)!r}")
    for name, value in (
        ("epochs", epochs),
        ("regenerate_every", regenerate_every),
        ("batch_size", batch_size),
        ("fit", fit),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be an int >= 1, got {value!r}")
    if not 0.0 <= mix <= 1.0:
        raise UserError(f"mix must be in [0, 1], got {mix!r}")
    x, y = data
    if len(x) != len(y) or len(x) < 2:
        raise UserError(f"data must hold >= 2 images with as many labels, got {len(x)} and {len(y)}")
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global generator: seed it, then restore it
        torch.manual_seed(seed)
        return _finetune(
            model, x, y, methods, eps, epochs, regenerate_every, mix, lr, batch_size, fit, uap_options, seed, progress
        )


def _finetune(
    model, x, y, methods, eps, epochs, regenerate_every, mix, lr, batch_size, fit, uap_options, seed, progress
) -> tuple[nn.Module, list[dict[str, Any]]]:
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    fit_data = (x[:fit], y[:fit])
    history: list[dict[str, Any]] = []
    perturbations = torch.empty(0)
    for epoch in tqdm(range(epochs), desc="UAP fine-tuning", disable=not progress):
        entry: dict[str, Any] = {"epoch": epoch + 1}
        if epoch % regenerate_every == 0:
            results = [
                craft_uap(model, m, fit_data, eps, options=(uap_options or {}).get(m), seed=seed + epoch)
                for m in methods
            ]
            perturbations = torch.stack([r.perturbation.to(x.dtype) for r in results])
            entry["fooling_rate"] = {m: r.fooling_rate for m, r in zip(methods, results, strict=True)}
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            if len(idx) < 2:  # BatchNorm cannot train on one image
                continue
            xb, yb = x[idx], y[idx]
            perturbed = torch.rand(len(idx), generator=gen) < mix
            which = torch.randint(len(perturbations), (len(idx),), generator=gen)
            xb = torch.where(perturbed[:, None, None, None], (xb + perturbations[which]).clamp(0, 1), xb)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        entry["loss"] = total / max(count, 1)
        history.append(entry)
    return model.eval(), history


class Ensemble(nn.Module):
    """Mean of the members' softmax; ``forward`` returns its log, so argmax and softmax match the mean."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise UserError("members must hold at least one model")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-30))
