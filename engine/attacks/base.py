"""The shared attack machinery: eps parsing, input checks, targets, projection and the result type.

Every per-image attack is an :class:`Attack`. The base ``__call__`` checks the inputs (a float batch in [0,1]),
moves them to the model's device, picks targets, runs the attack's ``_perturb`` and computes success, final
logits and perturbation norms; subclasses differ only in their perturbation loop (foolbox-3 shape).

Conventions:

* the objective is *minimised*: targeted CE(z, t) or untargeted -CE(z, y); the CW margin variant is
  max(max_{j != t} z_j - z_t + kappa, 0) (targeted) or max(z_y - max_{j != y} z_j + kappa, 0) (untargeted);
  a constraint (e.g. :class:`engine.attacks.HFC`) adds its per-sample term to it;
* gradients are taken w.r.t. the input only (``torch.autograd.grad``); no parameter gradient is accumulated;
* the model runs in eval mode during the attack (its previous mode is restored afterwards);
* a model emitting a single logit z is treated as the 2-class model [0, z] (softmax = sigmoid(z)).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError, UserTypeError
from engine.models import auto_batch_size, eval_mode, fast_input, model_device, model_dtype

NORMS = ("linf", "l2")
TARGET_MODES = ("random", "least_likely")


def parse_eps(eps: float | int | str, name: str = "eps") -> float:
    """A budget as a float >= 0 from a number or a string like ``"8/255"``, ``"1/256"`` or ``"0.03"``."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, str)):
        raise UserTypeError(f"{name} must be a float or a string like '8/255', got {type(eps).__name__}")
    if isinstance(eps, str):
        try:
            value = float(Fraction(eps.strip()))
        except (ValueError, ZeroDivisionError):
            raise UserError(f"{name} must be a number or a fraction like '8/255', got {eps!r}") from None
    else:
        value = float(eps)
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{name} must be finite and >= 0, got {eps!r}")
    return value


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise UserError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


@dataclass
class AttackResult:
    """Output of one attack call (all tensors on the model's device, batch-first).

    ``target`` holds the target classes of a targeted attack (None when untargeted); ``labels`` the true labels
    given to an untargeted (or ``"random"``/``"least_likely"``) attack. ``success`` is pred == target
    (targeted) or pred != labels (untargeted). ``loss_history`` is the batch-mean objective per step.
    """

    adv: torch.Tensor
    success: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor | None
    labels: torch.Tensor | None
    norms_linf: torch.Tensor
    norms_l2: torch.Tensor
    eps: float | None = None
    loss_history: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if self.success.numel() else float("nan")


def as_two_logits(logits: torch.Tensor) -> torch.Tensor:
    """(N,1) logits z become [0, z]; (N,K>=2) pass through."""
    if logits.ndim != 2:
        raise UserError(f"model output must be (N, num_classes) logits, got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits


def check_images(x: Any, name: str = "x") -> torch.Tensor:
    """A float (N, ...) tensor with values in [0,1]; numpy arrays are converted."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise UserTypeError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}") from None
    if not x.is_floating_point():
        raise UserTypeError(f"{name} must be a float tensor of images in [0,1], got dtype {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise UserError(f"{name} must be a non-empty batch (N, C, H, W), got shape {tuple(x.shape)}")
    lo, hi = float(x.min()), float(x.max())
    if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
        raise UserError(f"{name} must hold images in [0,1] (normalisation lives inside the model), got [{lo}, {hi}]")
    return x


def check_labels(y: Any, n: int, num_classes: int | None, name: str) -> torch.Tensor:
    """An int64 (n,) tensor of class indices in [0, num_classes)."""
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.dtype == torch.bool:
        raise UserTypeError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.shape != (n,):
        raise UserError(f"{name} must have shape ({n},) to match x, got {tuple(y.shape)}")
    y = y.long()
    if num_classes is not None and n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(f"{name} must be class indices in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return y


def box_bounds(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The L-inf eps-ball intersected with [0,1], as per-pixel (lo, hi) in x's dtype.

    Rounded inwards, so every value v in [lo, hi] satisfies |v - x| <= eps in exact arithmetic, not only up to float
    rounding: x -/+ eps is carried exactly as a float64 pair (s + err, Knuth's TwoSum), and a bound that rounded
    outwards is moved one ulp in. Clamping to [lo, hi] is "project to the eps-ball, then clamp to [0,1]" in one op.
    """
    x64 = x.double()
    bounds = []
    for sign in (-1.0, 1.0):
        b = sign * eps
        s = x64 + b
        bb = s - x64
        err = (x64 - (s - bb)) + (b - bb)  # x + b == s + err exactly
        cand = s.to(x.dtype)
        gap = cand.double() - s  # exact (Sterbenz): cand and s are within one ulp of x.dtype
        outward = gap < err if sign < 0 else gap > err
        inward = torch.nextafter(cand, torch.full_like(cand, -sign * math.inf))
        bounds.append(torch.where(outward, inward, cand).clamp(0.0, 1.0))
    return bounds[0], bounds[1]


def flat_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    return t.flatten(1).norm(p=p, dim=1)


def project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each sample's delta into the L2 ball of radius eps (norm computed in float64)."""
    norm = flat_norm(delta.double(), 2)
    factor = torch.clamp(eps / norm.clamp_min(1e-30) * (1 - 1e-7), max=1.0).to(delta.dtype)
    return delta * factor.view(-1, *([1] * (delta.ndim - 1)))


def normalize_l2(g: torch.Tensor) -> torch.Tensor:
    return g / flat_norm(g, 2).clamp_min(1e-12).view(-1, *([1] * (g.ndim - 1)))


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def logit_gap(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N,) max_{j != c} z_j - z_c: negative exactly when class c wins."""
    own = logits.gather(1, classes[:, None])[:, 0]
    other = logits.masked_fill(F.one_hot(classes, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - own


class Attack:
    """Base class: input checks, device, targets, the objective, success and norms.

    Args:
        model: a classifier taking images in [0,1]; 1-logit models are treated as [0, z].
        eps: the budget (float or a string like "8/255"); None for minimal-perturbation attacks (CW-L2).
        norm: "linf" or "l2".
        targeted: False (untargeted; the call's labels are the true classes), True (the call's labels are the
            targets), "random" (a uniformly drawn class other than the true one) or "least_likely" (the class
            with the lowest clean logit).
        loss: "ce" or "cw" (margin with confidence ``kappa``).
        constraint: an object with ``extractor(model)`` (a FeatureExtractor) and ``loss(features, classes) -> (N,)``
            (e.g. :class:`HFC`);
            its term is added to the objective, with features taken from the same forward pass as the logits.
        seed: seeds the random start and random targets.
    """

    default_loss = "ce"

    def __init__(
        self,
        model: nn.Module,
        eps: float | str | None = "8/255",
        norm: str = "linf",
        targeted: bool | str = False,
        loss: str | None = None,
        kappa: float = 0.0,
        constraint: Any = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise UserTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(targeted, bool) or targeted in TARGET_MODES):
            raise UserError(f"targeted must be True, False or one of {TARGET_MODES}, got {targeted!r}")
        loss = self.default_loss if loss is None else loss
        if loss not in ("ce", "cw"):
            raise UserError(f"loss must be 'ce' or 'cw', got {loss!r}")
        if constraint is not None and not all(callable(getattr(constraint, a, None)) for a in ("loss", "extractor")):
            raise UserTypeError("constraint must have .extractor(model) and .loss(features, classes), e.g. HFC")
        self.model = model
        self.eps = None if eps is None else parse_eps(eps)
        self.norm = check_norm(norm)
        self.targeted = targeted
        self.loss_kind = loss
        self.kappa = float(kappa)
        self.constraint = constraint
        self.seed = int(seed)
        self._forward = model if constraint is None else constraint.extractor(model)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps}, norm={self.norm!r}, targeted={self.targeted!r})"

    @classmethod
    def parameters(cls) -> list[str]:
        """The keyword arguments the constructor accepts besides ``model``, following ``**kwargs`` up the class
        hierarchy (how runs build any registered attack)."""
        names: list[str] = []
        for klass in cls.__mro__:
            if "__init__" not in vars(klass):
                continue
            params = inspect.signature(vars(klass)["__init__"]).parameters.values()
            names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return [n for n in dict.fromkeys(names) if n not in ("self", "model")]

    @classmethod
    def passes(cls, steps: int, options: Mapping[str, Any]) -> int:
        """Forward-backward passes per image when run with ``steps`` steps and its ``options`` (for cost
        estimates): one per step, plus the clean and the final prediction."""
        return steps + 2

    @classmethod
    def budgeted(cls) -> bool:
        """Whether the attack takes an ``eps`` budget (CW-L2, a minimal-perturbation attack, does not)."""
        return "eps" in cls.parameters()

    # ---- public API -------------------------------------------------------------------------------------------
    def __call__(self, x: Any, y: Any) -> AttackResult:
        """Attack the batch ``x`` (N, C, H, W) in [0,1]; ``y`` = targets if ``targeted=True``, else true labels."""
        return self.run_eps(x, y, [self.eps])[0]

    def run_eps(self, x: Any, y: Any, eps_list: Sequence[float | str | None]) -> list[AttackResult]:
        """One result per budget in ``eps_list``; input checks, targets and clean logits are shared."""
        eps_values = [None if e is None else parse_eps(e) for e in eps_list]
        with eval_mode(self.model):
            x, labels, target = self._prepare(x, y)
            return [self._run(x, labels, target, eps) for eps in eps_values]

    # ---- shared steps -----------------------------------------------------------------------------------------
    def _prepare(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = check_images(x).to(device=model_device(self.model), dtype=model_dtype(self.model))
        n = x.shape[0]
        if self.targeted == "least_likely":
            clean = self._logits(x)
            labels = None if y is None else check_labels(y, n, clean.shape[1], "y").to(x.device)
            return x, labels, clean.argmin(1)
        with torch.no_grad():  # the class count from one sample: no extra full forward pass
            num_classes = as_two_logits(self.model(x[:1])).shape[1]
        if self.targeted is True:
            return x, None, check_labels(y, n, num_classes, "y (the targets, since targeted=True)").to(x.device)
        labels = check_labels(y, n, num_classes, "y").to(x.device)
        if self.targeted == "random":
            gen = torch.Generator().manual_seed(self.seed)
            shift = torch.randint(1, num_classes, (n,), generator=gen).to(x.device)
            return x, labels, (labels + shift) % num_classes
        return x, labels, None

    def _run(self, x: torch.Tensor, labels: torch.Tensor | None, target: torch.Tensor | None, eps: float | None):
        adv, history = self._perturb(x, labels, target, eps)
        adv = adv.detach().contiguous()
        logits = self._logits(adv)
        pred = logits.argmax(1)
        success = pred == target if target is not None else pred != labels
        delta = adv - x
        return AttackResult(
            adv=adv,
            success=success,
            logits=logits,
            target=target,
            labels=labels,
            norms_linf=flat_norm(delta, math.inf),
            norms_l2=flat_norm(delta, 2),
            eps=eps,
            loss_history=history,
        )

    def objective(
        self, x_adv: torch.Tensor, labels: torch.Tensor | None, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample objective to minimise (N,), logits) from one forward pass of ``x_adv``."""
        if self.constraint is None:
            logits, features = as_two_logits(self._forward(fast_input(self.model, x_adv))), None
        else:
            out, features = self._forward(fast_input(self.model, x_adv))
            logits = as_two_logits(out)
        classes = target if target is not None else labels
        if self.loss_kind == "ce":
            loss = F.cross_entropy(logits, classes, reduction="none")
            loss = loss if target is not None else -loss
        else:  # CW margin: the target wins (or the true class loses) by kappa
            gap = logit_gap(logits, classes)
            loss = torch.clamp((gap if target is not None else -gap) + self.kappa, min=0.0)
        if features is not None:
            loss = loss + self.constraint.loss(features, self._constraint_classes(logits, labels, target))
        return loss, logits

    @staticmethod
    def _constraint_classes(logits: torch.Tensor, labels: torch.Tensor | None, target: torch.Tensor | None):
        """The class whose feature distribution the constraint pulls toward: the target, or (untargeted) the
        currently most likely class other than the true one."""
        if target is not None:
            return target
        masked = logits.detach().masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
        return masked.argmax(1)

    def input_grad(
        self, x_adv: torch.Tensor, labels: torch.Tensor | None, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(d objective.sum() / d x_adv, batch-mean objective) -- gradient w.r.t. the input only. The objective is
        a sum of per-sample terms, so it runs in chunks whose activations fit the memory budget
        (:func:`engine.models.auto_batch_size`): the batch, and so the random start and the results, stay the
        caller's whatever the memory."""
        grads, losses = [], []
        for rows in self._chunks(x_adv, backward=True):
            part = x_adv[rows].detach().requires_grad_(True)
            loss, _ = self.objective(part, _rows(labels, rows), _rows(target, rows))
            (grad,) = torch.autograd.grad(loss.sum(), part)
            grads.append(grad)
            losses.append(loss.detach())
        loss = torch.cat(losses)
        return torch.cat(grads), loss.sum() / loss.shape[0]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) logits of ``x`` without gradients, in memory-sized chunks."""
        with torch.no_grad():
            return torch.cat([as_two_logits(self.model(fast_input(self.model, x[rows]))) for rows in self._chunks(x)])

    def _chunks(self, x: torch.Tensor, backward: bool = False) -> list[slice]:
        """Row slices of ``x`` in as few chunks as fit the memory budget, of about equal size (28 images that fit
        25 at once go as 14 and 14, not 25 and 3)."""
        n = x.shape[0]
        fits = auto_batch_size(self.model, tuple(x.shape[1:]), backward=backward, limit=max(1, n))
        k = max(1, math.ceil(n / fits))
        return [slice(i * n // k, (i + 1) * n // k) for i in range(k)]

    def _perturb(
        self, x: torch.Tensor, labels: torch.Tensor | None, target: torch.Tensor | None, eps: float | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


__all__ = ["Attack", "AttackResult", "parse_eps", "box_bounds", "logit_gap", "as_two_logits"]
