"""Iterative gradient attacks: FGSM, BIM, PGD, MI-FGSM and CW-Linf share one loop.

Each step: gradient of the (minimised) objective w.r.t. the input, a direction (sign for L-inf, unit L2 vector
for L2; MI-FGSM first accumulates momentum), a step of ``step_size`` against it, then projection to the eps-ball
and clamping to [0,1] (for L-inf one clamp to the precomputed box, see :func:`engine.attacks.base.box_bounds`).

Default step size: ``step_factor * eps / steps`` with ``step_factor = 2.5`` (Madry et al.) for BIM, PGD and CW-Linf,
and 1.0 for MI-FGSM (Dong et al.: alpha = eps / T) and FGSM (one step of size eps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from engine.attacks.base import Attack, box_bounds, flat_norm, normalize_l2, parse_eps, project_l2
from engine.errors import UserError


class IterativeAttack(Attack):
    """The shared projected-gradient loop; subclasses set ``random_start``, ``step_factor`` and ``_direction``."""

    random_start = False
    step_factor = 2.5

    def __init__(
        self,
        model: nn.Module,
        eps: float | str = "8/255",
        steps: int = 10,
        step_size: float | str | None = None,
        norm: str = "linf",
        targeted: bool | str = False,
        loss: str | None = None,
        kappa: float = 0.0,
        constraint: object = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps, norm, targeted, loss, kappa, constraint, seed)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UserError(f"steps must be an int >= 1, got {steps!r}")
        if self.eps is None:
            raise UserError(f"eps is required for {type(self).__name__}")
        self.steps = steps
        self.step_size = None if step_size is None else parse_eps(step_size, "step_size")

    def alpha(self, eps: float) -> float:
        """The step size used at budget ``eps``."""
        return self.step_size if self.step_size is not None else self.step_factor * eps / self.steps

    def _direction(self, grad: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (grad.sign() if self.norm == "linf" else normalize_l2(grad)), None

    def _start(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        if not self.random_start:
            return x.clone()
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        if self.norm == "linf":
            noise = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * eps
        else:  # uniform in the L2 ball: Gaussian direction, radius eps * u^(1/d)
            direction = normalize_l2(torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype))
            u = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype)
            noise = direction * (eps * u ** (1.0 / x[0].numel())).view(-1, *([1] * (x.ndim - 1)))
        return x + noise

    def _perturb(self, x, labels, target, eps):
        if eps is None:
            raise UserError(f"eps is required for {type(self).__name__}")
        alpha = self.alpha(eps)
        if self.norm == "linf":
            lo, hi = box_bounds(x, eps)

            def project(adv: torch.Tensor) -> torch.Tensor:
                return torch.clamp(adv, lo, hi)
        else:

            def project(adv: torch.Tensor) -> torch.Tensor:
                return (x + project_l2(adv - x, eps)).clamp(0.0, 1.0)

        adv = project(self._start(x, eps))
        state = None
        history = []
        for _ in range(self.steps):
            grad, loss = self.input_grad(adv, labels, target)
            history.append(loss)
            direction, state = self._direction(grad, state)
            adv = project(adv - alpha * direction)
        return adv, torch.stack(history)


class FGSM(IterativeAttack):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps (L2: along the unit gradient)."""

    step_factor = 1.0

    def __init__(
        self,
        model: nn.Module,
        eps: float | str = "8/255",
        norm: str = "linf",
        targeted: bool | str = False,
        loss: str | None = None,
        kappa: float = 0.0,
        constraint: object = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps, 1, None, norm, targeted, loss, kappa, constraint, seed)

    @classmethod
    def passes(cls, steps: int, options: Mapping[str, Any]) -> int:
        """One step whatever ``steps`` says."""
        return super().passes(1, options)


class BIM(IterativeAttack):
    """Basic iterative method (Kurakin et al. 2017): iterated FGSM from x, no random start."""


class PGD(IterativeAttack):
    """Projected gradient descent (Madry et al. 2018): BIM from a uniform random start in the eps-ball."""

    random_start = True


class MIFGSM(IterativeAttack):
    """Momentum iterative FGSM (Dong et al. 2018): g <- mu g + grad / ||grad||_1, step along sign(g)."""

    step_factor = 1.0

    def __init__(
        self, model: nn.Module, eps: float | str = "8/255", steps: int = 10, momentum: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(model, eps, steps, **kwargs)
        if not (isinstance(momentum, (int, float)) and math.isfinite(momentum) and momentum >= 0):
            raise UserError(f"momentum must be a finite float >= 0, got {momentum!r}")
        self.momentum = float(momentum)

    def _direction(self, grad, state):
        l1 = flat_norm(grad, 1).clamp_min(1e-12).view(-1, *([1] * (grad.ndim - 1)))
        state = grad / l1 if state is None else self.momentum * state + grad / l1
        return (state.sign() if self.norm == "linf" else normalize_l2(state)), state


class CWLinf(IterativeAttack):
    """CW-Linf as in the HFC code: BIM on the Carlini-Wagner margin loss with confidence ``kappa``."""

    default_loss = "cw"


__all__ = ["IterativeAttack", "FGSM", "BIM", "PGD", "MIFGSM", "CWLinf"]
