"""Batched L2 DeepFool (Moosavi-Dezfooli et al., CVPR 2016), the inner step of DeepFool-UAP.

Per sample, as in the reference code (LTS4/deepfool): candidates are the ``candidates`` classes with the highest
clean logits (the first is the original label); each iteration linearises the candidates' logit differences
f_k = z_k - z_0 at x + (1 + overshoot) r, steps (|f_k| / ||w_k|| + 1e-4) w_k / ||w_k|| toward the closest boundary
(w_k = grad f_k), and stops once the label at x + (1 + overshoot) r changes. All samples advance together; the
gradients of the C'-1 differences come from C'-1 backward passes over the whole batch (inputs only; one vmapped
backward with ``is_grads_batched`` measured no faster on CPU), and the clean logits from the first iteration's
forward (no separate clean forward).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attacks.base import as_two_logits
from engine.errors import UserError
from engine.models import eval_mode


def deepfool(
    model: nn.Module, x: torch.Tensor, max_iter: int = 50, overshoot: float = 0.02, candidates: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r = (1 + overshoot) r_tot (N, ...), converged (N,) bool -- the label changed --, iterations (N,) int64).

    ``x`` must be on the model's device; it is not clamped (x + r may leave [0,1], as in the reference).
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise UserError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
        raise UserError(f"candidates must be an int >= 2, got {candidates!r}")
    with eval_mode(model):
        x = x.detach()
        r_tot = torch.zeros_like(x)
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        iterations = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        view = (-1,) + (1,) * (x.ndim - 1)
        for it in range(max_iter + 1):
            idx = active.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            xa = (x[idx] + (1 + overshoot) * r_tot[idx]).requires_grad_(True)
            z = as_two_logits(model(xa))
            if it == 0:  # r_tot = 0: z are the clean logits of every sample
                order = z.detach().argsort(dim=1, descending=True)[:, : min(candidates, z.shape[1])]  # (N, C')
                label = order[:, 0]
            changed = z.argmax(1) != label[idx]
            active[idx[changed]] = False
            if it == max_iter or bool(changed.all()):
                continue  # budget spent, or nothing left to step
            zc = z.gather(1, order[idx])
            diffs = zc[:, 1:] - zc[:, :1]  # (n, C'-1) f_k
            grads = torch.stack(
                [
                    torch.autograd.grad(diffs[:, k].sum(), xa, retain_graph=k < diffs.shape[1] - 1)[0]
                    for k in range(diffs.shape[1])
                ],
                dim=1,
            )  # (n, C'-1, ...) w_k: samples are independent, so the batch sum's gradient is per-sample
            w_norm = grads.flatten(2).norm(dim=2).clamp_min(1e-12)  # (n, C'-1)
            pert = diffs.detach().abs() / w_norm
            best = pert.argmin(1)
            rows = torch.arange(idx.numel(), device=x.device)
            w = grads[rows, best]
            step = ((pert[rows, best] + 1e-4) / w_norm[rows, best]).view(view) * w
            keep = ~changed
            r_tot[idx[keep]] += step[keep]
            iterations[idx[keep]] += 1
        return (1 + overshoot) * r_tot, ~active, iterations


__all__ = ["deepfool"]
