"""Carlini-Wagner L2 (2017): tanh box, Adam, and a real per-sample binary search over the constant c.

Minimises ||x' - x||_2^2 + c * f(x') over w with x' = (tanh(w) + 1) / 2 (always inside [0,1]), where f is the
margin objective of :class:`engine.attacks.base.Attack` (plus a constraint term, e.g. HFC, when given). After each
search round, per sample: success -> upper = min(upper, c); failure -> lower = max(lower, c); the next c is the
midpoint, or 10 c while no upper bound is known. The result is the smallest-L2 successful x' seen over all rounds
(or the last iterate for samples never fooled).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from engine.attacks.base import Attack, flat_norm
from engine.errors import UserError

SEARCH_STEPS = 5  # binary-search rounds over c by default


class CWL2(Attack):
    """CW-L2 minimal-perturbation attack; ``eps`` is not used (report ``norms_l2`` instead)."""

    default_loss = "cw"

    def __init__(
        self,
        model: nn.Module,
        c: float = 1e-2,
        kappa: float = 0.0,
        steps: int = 100,
        lr: float = 0.01,
        search_steps: int = SEARCH_STEPS,
        targeted: bool | str = False,
        constraint: object = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, None, "l2", targeted, "cw", kappa, constraint, seed)
        for name, value in (("steps", steps), ("search_steps", search_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be an int >= 1, got {value!r}")
        for name, value in (("c", c), ("lr", lr)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be a finite float > 0, got {value!r}")
        self.c, self.steps, self.lr, self.search_steps = float(c), steps, float(lr), search_steps

    @classmethod
    def passes(cls, steps: int, options: Mapping[str, Any]) -> int:
        """``steps`` Adam steps and one evaluation per search round, plus the clean and the final prediction."""
        return options.get("search_steps", SEARCH_STEPS) * (steps + 1) + 2

    def _succeeded(self, logits: torch.Tensor, labels, target) -> torch.Tensor:
        pred = logits.argmax(1)
        return pred == target if target is not None else pred != labels

    def _perturb(self, x, labels, target, eps):
        n = x.shape[0]
        w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        c = torch.full((n,), self.c, device=x.device, dtype=x.dtype)
        lower = torch.zeros_like(c)
        upper = torch.full_like(c, math.inf)
        best_l2 = torch.full_like(c, math.inf)
        best_adv = x.clone()
        history = []
        view = (-1,) + (1,) * (x.ndim - 1)
        for _ in range(self.search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
            for step in range(self.steps + 1):  # the last pass only evaluates the final iterate
                adv = (torch.tanh(w) + 1) / 2
                l2sq = flat_norm(adv - x, 2) ** 2
                loss, logits = self.objective(adv, labels, target)
                with torch.no_grad():
                    ok = self._succeeded(logits, labels, target)
                    better = ok & (l2sq < best_l2)
                    best_l2 = torch.where(better, l2sq, best_l2)
                    best_adv = torch.where(better.view(view), adv, best_adv)
                    fooled |= ok
                total = (l2sq + c * loss).sum()
                history.append(total.detach() / n)
                if step == self.steps:
                    break
                (w.grad,) = torch.autograd.grad(total, w)
                opt.step()
            last = adv.detach()
            upper = torch.where(fooled, torch.minimum(upper, c), upper)
            lower = torch.where(fooled, lower, torch.maximum(lower, c))
            c = torch.where(torch.isinf(upper), c * 10, (lower + upper) / 2)
        adv = torch.where(torch.isinf(best_l2).view(view), last, best_adv)
        return adv, torch.stack(history)


__all__ = ["CWL2"]
