"""Universal adversarial perturbations (docs/methods.md, Universal perturbations): one v (C,H,W) for all inputs.

* :func:`deepfool_uap` -- Moosavi-Dezfooli et al. 2017, the classic algorithm: passes over the shuffled data one
  image at a time; an image whose prediction at x+v still equals the clean one gets the minimal DeepFool step
  from x+v (:func:`engine.attacks.deepfool.deepfool`), which is added to v, and v is projected to the eps-ball
  before the next image; stop once the fooling rate on the fitting data reaches 1 - delta, or after ``max_passes``.
* :func:`deepfool_uap_batched` -- a different, cheaper variant: the not-yet-fooled images of a whole batch get
  their DeepFool steps from the same v, the converged steps are summed and v is projected once per batch.
* :func:`sgd_uap` -- Shafahi et al. 2020: minibatch projected sign-gradient ascent on v of the clipped
  cross-entropy min(CE, beta) (targeted: descent on the CE toward ``target``); or (``loss="margin"``) descent on
  the clamped logit margin of the clean prediction, optionally with a linearly decaying step.
* :func:`targeted_uap` -- Hirano & Takemoto 2020: the batched DeepFool-UAP loop with a targeted inner step
  (targeted BIM from x+v, sign-gradient steps); only steps that reach the target are added.
* :func:`data_free_uap` -- Fast Feature Fool / GD-UAP (Mopuri et al.): maximise sum_l log ||f_l(base + v)||_2 over
  v alone (raw feature maps of the chosen layers, Adam, projection), no images; ``base`` is a uniform grey image,
  the [0,1] analogue of feeding v to a mean-subtracted network.

Images x + v are clamped to [0,1] whenever they are evaluated. Metrics (:func:`evaluate_uap`) on a held-out set:
fooling rate = share of predictions that differ from the clean predictions; targeted success = share predicted
as the target; accuracy, quadratic-weighted Cohen's kappa (sklearn) and the confusion matrix (rows true labels,
columns predictions under attack), clean and attacked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine.attacks.base import as_two_logits, check_images, check_norm, parse_eps, project_l2
from engine.attacks.deepfool import deepfool
from engine.attacks.gradient import BIM
from engine.data import as_tensors, check_batch_size
from engine.errors import UserError
from engine.models import FeatureExtractor, eval_mode, model_device, model_dtype, predict_logits


@dataclass
class UAPResult:
    """A universal perturbation and its held-out metrics (see :func:`evaluate_uap`)."""

    perturbation: torch.Tensor
    method: str
    eps: float
    norm: str
    fooling_rate: float
    targeted_success_rate: float | None
    kappa: float
    clean_kappa: float
    accuracy: float
    clean_accuracy: float
    confusion: np.ndarray
    target: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def project_universal(v: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project one perturbation (C,H,W) to the L-inf or L2 eps-ball (L-inf exactly: the bound is rounded down)."""
    if norm == "l2":
        return project_l2(v[None], eps)[0]
    bound = torch.tensor(eps, dtype=torch.float64).to(v.dtype)
    if float(bound) > eps:
        bound = torch.nextafter(bound, torch.zeros_like(bound))
    return v.clamp(-float(bound), float(bound))


def predict(model: torch.nn.Module, x: torch.Tensor, v: torch.Tensor | None = None, batch_size: int = 256):
    """Predicted classes (N,) of clamp(x + v, 0, 1), on the model's device (1-logit models as [0, z])."""
    logits = torch.from_numpy(predict_logits(model, x, batch_size, perturbation=v))
    return as_two_logits(logits).argmax(1).to(model_device(model))


def evaluate_uap(
    model: torch.nn.Module, perturbation: torch.Tensor, data: Any, target: int | None = None, batch_size: int = 256
) -> dict[str, Any]:
    """Fooling rate, targeted success, accuracy, quadratic kappa and confusion matrix of v on ``data``."""
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    x, y = as_tensors(data, name="heldout")
    v = perturbation.to(device=model_device(model), dtype=model_dtype(model))
    clean = predict(model, x, None, batch_size).cpu().numpy()
    adv = predict(model, x, v, batch_size).cpu().numpy()
    y = y.numpy()
    num_classes = int(max(y.max(), clean.max(), adv.max())) + 1
    kappa = cohen_kappa_score(y, adv, weights="quadratic", labels=np.arange(num_classes))
    clean_kappa = cohen_kappa_score(y, clean, weights="quadratic", labels=np.arange(num_classes))
    return {
        "fooling_rate": float((adv != clean).mean()),
        "targeted_success_rate": None if target is None else float((adv == target).mean()),
        "kappa": float(kappa),
        "clean_kappa": float(clean_kappa),
        "accuracy": float((adv == y).mean()),
        "clean_accuracy": float((clean == y).mean()),
        "confusion": confusion_matrix(y, adv, labels=np.arange(num_classes)),
    }


def _setup(model, data, eps, norm, name="data"):
    eps = parse_eps(eps)
    check_norm(norm)
    x, y = as_tensors(data, name=name)
    check_images(x, name)
    return eps, x, y, model_device(model), model_dtype(model)


def _finish(model, v, method, eps, norm, heldout, target, history, start) -> UAPResult:
    v = v.detach()
    metrics = evaluate_uap(model, v, heldout, target)
    return UAPResult(
        perturbation=v.cpu(),
        method=method,
        eps=eps,
        norm=norm,
        target=target,
        history=history,
        seconds=time.perf_counter() - start,
        **metrics,
    )


def _universal_loop(
    model, x, eps, norm, needs_step: Callable, inner: Callable, delta, max_passes, batch_size, seed, progress, desc
):
    """The UAP loop: ``needs_step(pred_adv, idx) -> mask``; ``inner(x_adv, idx) -> (dr, ok)``. Each pass visits
    the data in the order ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` draws (one draw per
    pass, same generator); ``batch_size=None`` steps one image at a time (the classic loop), an int sums the steps
    of each batch. Returns (v, history of the fit-set rate of images needing no step after each pass)."""
    v = torch.zeros(x.shape[1:], device=model_device(model), dtype=model_dtype(model))
    gen = torch.Generator().manual_seed(seed)
    history = []
    start = time.perf_counter()
    with eval_mode(model):
        for p in tqdm(range(max_passes), desc=desc, disable=not progress):
            order = torch.randperm(x.shape[0], generator=gen)
            if batch_size is None:
                v = _sequential_pass(model, x, v, order, eps, norm, needs_step, inner)
            else:
                v = _batched_pass(model, x, v, order, eps, norm, needs_step, inner, batch_size)
            rate = _fit_rate(model, x, v, needs_step)
            history.append({"pass": p + 1, "fit_rate": rate, "seconds": time.perf_counter() - start})
            if rate >= 1 - delta:
                break
    return v, history


def _needs(model, x, v, idx, needs_step) -> torch.Tensor:
    xb = x[idx].to(device=v.device, dtype=v.dtype)
    with torch.no_grad():
        return needs_step(as_two_logits(model((xb + v).clamp(0, 1))).argmax(1), idx.to(v.device))


def _batched_pass(model, x, v, order, eps, norm, needs_step, inner, batch_size):
    for idx in order.split(batch_size):
        mask = _needs(model, x, v, idx, needs_step)
        if bool(mask.any()):
            xb = x[idx[mask.cpu()]].to(device=v.device, dtype=v.dtype)
            dr, ok = inner((xb + v).clamp(0, 1), idx.to(v.device)[mask])
            if bool(ok.any()):
                v = project_universal(v + dr[ok].sum(0), eps, norm)
    return v


def _sequential_pass(model, x, v, order, eps, norm, needs_step, inner, max_ahead: int = 64):
    """One image at a time, exactly: the images after the last step are checked against the current v in one
    batch (``ahead`` of them, doubled while none needs a step and halved when the first one does); the first that
    needs a step gets it, v changes, and checking resumes after it."""
    i, ahead = 0, 1
    while i < len(order):
        idx = order[i : i + ahead]
        mask = _needs(model, x, v, idx, needs_step).cpu()
        if not bool(mask.any()):
            i, ahead = i + len(idx), min(2 * ahead, max_ahead)
            continue
        j = int(mask.nonzero()[0, 0])
        ahead = max(1, ahead // 2) if j == 0 else ahead
        k = idx[j : j + 1]
        dr, ok = inner((x[k].to(device=v.device, dtype=v.dtype) + v).clamp(0, 1), k.to(v.device))
        if bool(ok[0]):
            v = project_universal(v + dr[0], eps, norm)
        i += j + 1
    return v


def _fit_rate(model, x, v, needs_step) -> float:
    """Share of the fitting data for which no further step is needed (fooled, or at the target)."""
    pred = predict(model, x, v)
    return float((~needs_step(pred, torch.arange(x.shape[0], device=pred.device))).float().mean())


def deepfool_uap(
    model: torch.nn.Module,
    data: Any,
    eps: float | str = "10/255",
    norm: str = "linf",
    heldout: Any = None,
    delta: float = 0.2,
    max_passes: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 50,
    seed: int = 0,
    progress: bool = False,
    batch_size: int | None = None,
) -> UAPResult:
    """Classic DeepFool-UAP (Moosavi-Dezfooli et al. 2017) on ``data`` (Dataset or (images, labels)): one image at
    a time, a DeepFool step (kept when DeepFool changed the label within ``max_iter``) for each image v does not
    fool yet, projection after each step; passes until the fit-set fooling rate reaches 1 - ``delta`` or
    ``max_passes``. Metrics on ``heldout`` (default: ``data``). ``batch_size`` (an int) runs the batched variant
    instead: use :func:`deepfool_uap_batched`, which names it."""
    start = time.perf_counter()
    eps, x, _, _, _ = _setup(model, data, eps, norm)
    if batch_size is not None:
        check_batch_size(batch_size)
    clean = predict(model, x)
    method = "deepfool_uap" if batch_size is None else "deepfool_uap_batched"

    def needs_step(pred, idx):
        return pred == clean[idx]

    def inner(x_adv, idx):
        r, converged, _ = deepfool(model, x_adv, max_iter=max_iter, overshoot=overshoot)
        return r, converged

    v, history = _universal_loop(
        model, x, eps, norm, needs_step, inner, delta, max_passes, batch_size, seed, progress, method
    )
    return _finish(model, v, method, eps, norm, data if heldout is None else heldout, None, history, start)


def deepfool_uap_batched(model: torch.nn.Module, data: Any, batch_size: int = 32, **options: Any) -> UAPResult:
    """Batched variant of :func:`deepfool_uap` (not the same algorithm): DeepFool runs from the same v for all
    not-yet-fooled images of a batch of ``batch_size``; their converged steps are summed into v, then v is
    projected once. ``options`` as for :func:`deepfool_uap`. Cheaper per pass; fooling rate vs time of both in
    benchmarks/bench_uap.py."""
    return deepfool_uap(model, data, batch_size=batch_size, **options)


def targeted_uap(
    model: torch.nn.Module,
    data: Any,
    target: int,
    eps: float | str = "10/255",
    norm: str = "linf",
    heldout: Any = None,
    delta: float = 0.2,
    max_passes: int = 10,
    batch_size: int = 32,
    inner_steps: int = 5,
    inner_eps: float | str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> UAPResult:
    """Targeted UAP toward class ``target``: inner step = targeted BIM from x+v with budget ``inner_eps``
    (default eps), run on the not-yet-targeted images of each batch; only inner steps that reach the target are
    added to v (summed per batch, as in :func:`deepfool_uap_batched`)."""
    start = time.perf_counter()
    eps, x, _, device, _ = _setup(model, data, eps, norm)
    check_batch_size(batch_size)
    target = _check_target(model, x, target)
    inner_attack = BIM(model, eps=eps if inner_eps is None else inner_eps, steps=inner_steps, norm=norm, targeted=True)

    def needs_step(pred, idx):
        return pred != target

    def inner(x_adv, idx):
        res = inner_attack(x_adv, torch.full((x_adv.shape[0],), target, device=x_adv.device))
        return res.adv - x_adv, res.success

    v, history = _universal_loop(
        model, x, eps, norm, needs_step, inner, delta, max_passes, batch_size, seed, progress, "targeted UAP"
    )
    return _finish(model, v, "targeted_uap", eps, norm, data if heldout is None else heldout, target, history, start)


def sgd_uap(
    model: torch.nn.Module,
    data: Any,
    eps: float | str = "10/255",
    norm: str = "linf",
    heldout: Any = None,
    target: int | None = None,
    epochs: int = 5,
    step_size: float | str | None = None,
    batch_size: int = 32,
    beta: float = 10.0,
    delta: float | None = None,
    seed: int = 0,
    progress: bool = False,
    loss: str = "ce",
    kappa: float = 1.0,
    schedule: str = "constant",
) -> UAPResult:
    """SGD-UAP: per minibatch v <- proj(v - step * sign(grad_v L)) (L2: unit gradient). ``loss="ce"`` (Shafahi et
    al.): L = -sum min(CE(x+v, y), beta) on the true labels; targeted: L = CE toward ``target``.
    ``loss="margin"``: L = sum max(z_c - max_{k!=c} z_k, -kappa) on the clean predictions c (the fooling
    criterion); targeted: sum max(max_{k!=t} z_k - z_t, -kappa); samples fooled by a margin kappa give no gradient.
    ``step_size`` defaults to eps / 10; ``schedule="linear"`` decays it linearly to 0 over all steps of ``epochs``.
    The fitting set's fooling (targeted: success) rate is recorded after every epoch; with ``delta`` training
    stops once it reaches 1 - delta (the DeepFool-UAP stopping rule)."""
    start = time.perf_counter()
    eps, x, y, device, dtype = _setup(model, data, eps, norm)
    check_batch_size(batch_size)
    if loss not in ("ce", "margin"):
        raise UserError(f"loss must be 'ce' or 'margin', got {loss!r}")
    if schedule not in ("constant", "linear"):
        raise UserError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
    if not kappa >= 0:
        raise UserError(f"kappa must be a margin >= 0, got {kappa!r}")
    target = None if target is None else _check_target(model, x, target)
    step = eps / 10 if step_size is None else parse_eps(step_size, "step_size")
    v = torch.zeros(x.shape[1:], device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    history = []
    clean = predict(model, x)
    labels = clean if loss == "margin" and target is None else y.to(device)
    total_steps, t = epochs * math.ceil(x.shape[0] / batch_size), 0

    def needs_step(pred, idx):
        return pred == clean[idx] if target is None else pred != target

    with eval_mode(model):
        for epoch in tqdm(range(epochs), desc="SGD-UAP", disable=not progress):
            for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
                xb = x[idx].to(device=device, dtype=dtype)
                v_var = v.detach().requires_grad_(True)
                logits = as_two_logits(model((xb + v_var).clamp(0, 1)))
                yb = labels[idx.to(device)] if target is None else torch.full_like(idx, target).to(device)
                objective = _sgd_objective(logits, yb, loss, target is not None, beta, kappa)
                (grad,) = torch.autograd.grad(objective, v_var)
                direction = grad.sign() if norm == "linf" else grad / grad.norm().clamp_min(1e-12)
                lr = step * (1 - t / total_steps) if schedule == "linear" else step
                v = project_universal(v - lr * direction, eps, norm)
                t += 1
            rate = _fit_rate(model, x, v, needs_step)
            history.append({"epoch": epoch + 1, "fit_rate": rate, "seconds": time.perf_counter() - start})
            if delta is not None and rate >= 1 - delta:
                break
    return _finish(model, v, "sgd_uap", eps, norm, data if heldout is None else heldout, target, history, start)


def _sgd_objective(logits, labels, loss, targeted, beta, kappa) -> torch.Tensor:
    """The SGD-UAP loss to minimise over v (see :func:`sgd_uap`); ``labels``: true/clean labels or the target."""
    if loss == "ce":
        ce = F.cross_entropy(logits, labels, reduction="none")
        return ce.sum() if targeted else -ce.clamp(max=beta).sum()
    own = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], -math.inf).amax(1)
    margin = other - own if targeted else own - other
    return margin.clamp(min=-kappa).sum()


def data_free_uap(
    model: torch.nn.Module,
    input_shape: Sequence[int],
    eps: float | str = "10/255",
    norm: str = "linf",
    heldout: Any = None,
    layers: str | Sequence[str] = "activations",
    steps: int = 200,
    lr: float | None = None,
    base: float = 0.5,
    seed: int = 0,
    progress: bool = False,
) -> UAPResult:
    """Fast Feature Fool / GD-UAP (data-free): maximise sum_l log ||f_l(base + v)||_2 over v (Adam with learning
    rate ``lr``, default eps / 10, projected after every step) from a uniform random start. ``heldout`` (required)
    only scores the result."""
    if heldout is None:
        raise UserError("heldout data is required to measure the fooling rate of a data-free UAP")
    start = time.perf_counter()
    eps = parse_eps(eps)
    check_norm(norm)
    if not 0.0 <= base <= 1.0:
        raise UserError(f"base must be a grey level in [0,1], got {base!r}")
    device, dtype = model_device(model), model_dtype(model)
    gen = torch.Generator().manual_seed(seed)
    init = (torch.rand(tuple(input_shape), generator=gen, dtype=dtype) * 2 - 1) * eps
    v = project_universal(init.to(device), eps, norm).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=eps / 10 if lr is None else lr)
    extractor = FeatureExtractor(model, layers, pooled=False)
    history = []
    try:
        with eval_mode(model):
            for step in tqdm(range(steps), desc="data-free UAP", disable=not progress):
                _, feats = extractor((base + v).clamp(0, 1)[None])
                objective = sum(torch.log(f.flatten().norm() + 1e-12) for f in feats.values())
                (v.grad,) = torch.autograd.grad(-objective, v)
                opt.step()
                with torch.no_grad():
                    v.copy_(project_universal(v, eps, norm))
                if step % 20 == 0 or step == steps - 1:
                    elapsed = time.perf_counter() - start
                    history.append({"step": step + 1, "objective": float(objective.detach()), "seconds": elapsed})
    finally:
        extractor.remove()
    return _finish(model, v, "data_free_uap", eps, norm, heldout, None, history, start)


def _check_target(model, x, target) -> int:
    with torch.no_grad(), eval_mode(model):
        num_classes = as_two_logits(model(x[:1].to(model_device(model), model_dtype(model)))).shape[1]
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < num_classes:
        raise UserError(f"target must be a class index in [0, {num_classes}), got {target!r}")
    return int(target)


@dataclass(frozen=True)
class UAPMethod:
    """A UAP algorithm: its function, its family (a model fine-tuned on one UAP of a family has seen the family) and
    its cost for estimates: forward-backward passes per fitting image to craft one with a study's options, or per
    optimisation step for an algorithm that needs no images (``data_free``)."""

    craft: Callable[..., UAPResult]
    family: str
    passes: float
    data_free: bool = False


# Passes relative to SGD-UAP's 3 (its epochs): DeepFool-UAP from CPU seconds measured in the default audit's UAP
# study (the classic loop runs one image at a time, so its passes are dear); targeted from an earlier batched
# measurement, and the batched DeepFool-UAP assumed as dear as it (the same batched loop; not measured). The targeted
# UAP's inner step is a targeted BIM, the same sign-gradient steps as SGD-UAP.
UAP_METHODS: dict[str, UAPMethod] = {
    "deepfool": UAPMethod(deepfool_uap, "DeepFool", 34.0),
    "deepfool_batched": UAPMethod(deepfool_uap_batched, "DeepFool", 15.0),
    "sgd": UAPMethod(sgd_uap, "sign gradient", 3.0),
    "targeted": UAPMethod(targeted_uap, "sign gradient", 15.0),
    "data_free": UAPMethod(data_free_uap, "feature maximisation", 1.0, data_free=True),
}

__all__ = [
    "UAPResult",
    "deepfool_uap",
    "deepfool_uap_batched",
    "sgd_uap",
    "targeted_uap",
    "data_free_uap",
    "evaluate_uap",
    "UAP_METHODS",
    "UAPMethod",
]
