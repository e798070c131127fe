"""Gradient attacks on the engine's networks (FGSM, PGD) in an L-infinity ball.

Shared by training (PGD adversarial training), the directions of the linear-region analysis
and the soundness checks of the bound propagators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def input_gradient(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Gradient of the cross-entropy loss of ``net`` at the batch ``x`` with labels ``y``."""
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(net(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(net: nn.Module, x: Tensor, y: Tensor, eps: float,
         clip: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    """One signed-gradient step of size ``eps`` (Goodfellow et al.)."""
    adv = x + eps * input_gradient(net, x, y).sign()
    return adv.clamp(*clip) if clip else adv


def pgd(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    clip: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on the loss inside ``||x' - x||_inf <= eps`` (Madry et al.).

    Returns, per sample, the point with the highest loss over all restarts.
    """
    step_size = step_size if step_size is not None else 2.5 * eps / steps
    best, best_loss = x.detach().clone(), x.new_full((x.shape[0],), -torch.inf)
    lo, hi = x - eps, x + eps
    if clip:
        lo, hi = lo.clamp(*clip), hi.clamp(*clip)
    for _ in range(restarts):
        # drawn where the generator lives (the CPU by default), so a seed gives the same
        # starts on every device
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype,
                           device=generator.device if generator else "cpu").to(x) * 2 - 1
        adv = torch.min(torch.max(x + eps * noise, lo), hi)
        for _ in range(steps):
            adv = adv + step_size * input_gradient(net, adv, y).sign()
            adv = torch.min(torch.max(adv, lo), hi).detach()
        with torch.no_grad():
            loss = F.cross_entropy(net(adv), y, reduction="none")
        better = loss > best_loss
        best = torch.where(better.reshape(-1, *[1] * (x.dim() - 1)), adv, best)
        best_loss = torch.where(better, loss, best_loss)
    return best
