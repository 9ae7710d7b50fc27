"""Bayesian uncertainty (Feinman et al. 2017): the spread of MC-dropout predictions.

Score = variance over T dropout-sampling passes of the softmax, averaged over classes (higher = more uncertain =
more adversarial). ``reference_compat`` reproduces the HFC code's quirk: the std over passes of logit 0.

The T passes share everything before the model's first dropout layer: a forward hook repeats that layer's input T
times, so the backbone runs once per image and only the head (after the dropout) runs T times. This is exact in
eval mode, where every layer after the dropout acts per sample.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.detectors.base import Cost, Detector, Needs, Requirements
from engine.detectors.features import Features
from engine.errors import UserError
from engine.models import dropout_modules, mc_dropout


def mc_dropout_logits(model: nn.Module, x: torch.Tensor, passes: int, seed: int) -> torch.Tensor:
    """(T, N, K) logits of ``passes`` MC-dropout forward passes of ``model`` on ``x`` (eval mode, dropout on)."""
    dropouts = dropout_modules(model)
    if not dropouts:
        raise UserError("BU needs a model with dropout layers (build it with dropout > 0, e.g. 0.3)")
    order: list[nn.Module] = []
    handles = [d.register_forward_pre_hook(lambda mod, args: order.append(mod)) for d in dropouts]
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in handles:
            h.remove()
    first = order[0]
    handle = first.register_forward_pre_hook(lambda mod, args: (args[0].repeat(passes, *[1] * (args[0].dim() - 1)),))
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), mc_dropout(model):
            torch.manual_seed(seed)
            logits = model(x)
    finally:
        handle.remove()
    if logits.shape[0] != passes * len(x):
        raise UserError(f"the model's layers after its first dropout are not per-sample (got {logits.shape[0]} rows)")
    return logits.reshape(passes, len(x), -1)


class BU(Detector):
    """MC-dropout uncertainty: one score column (``"mc_dropout"``), turned into the detector score by LR."""

    name = "bu"
    requires = Requirements(dropout=True)
    cost = Cost(seconds_per_image=1e-3, model_passes=2.5)

    def __init__(self, passes: int = 50, batch_size: int = 64, reference_compat: bool = False, seed: int = 0) -> None:
        super().__init__(None, reference_compat, seed)
        if passes < 2:
            raise UserError(f"passes must be >= 2, got {passes}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.passes, self.batch_size = int(passes), int(batch_size)

    def _resolve_layers(self, feats: Features) -> list[str]:
        return ["mc_dropout"]  # a score column, not a model layer

    def needs(self) -> Needs:
        return Needs(dropout=True)

    def _fit(self, clean, adversarial, noise, train):
        return self._fit_scores(clean, adversarial, noise)

    def _layer_scores(self, x: Features) -> np.ndarray:
        source = self._model_source()
        images = x.require_images("BU")
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size].to(source.device, torch.float32)
            logits = mc_dropout_logits(source.model, batch, self.passes, self.seed + start).double()
            if self.reference_compat:
                out.append(logits[:, :, 0].std(0, unbiased=False))
            else:
                out.append(torch.softmax(logits, -1).var(0, unbiased=False).mean(1))
        return torch.cat(out).cpu().numpy()[:, None]

    def _state(self):
        return {}

    def _set_state(self, arrays):
        pass
