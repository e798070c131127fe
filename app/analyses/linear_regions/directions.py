"""Segments a user asks for: from an input along FGSM, PGD or a random direction.

Every direction is scaled to unit L-infinity norm, so ``length`` is the L-infinity distance
of the far end and FGSM and random (sign) directions have the same Euclidean length too.
"""

from __future__ import annotations

import numpy as np
import torch

from app.analyses.linear_regions.points import host
from app.attacks import fgsm, pgd
from app.errors import InvalidInputError
from app.network import Network

DIRECTIONS = ("fgsm", "pgd", "random")


def direction(
    net: Network,
    x: torch.Tensor | np.ndarray,
    kind: str,
    *,
    label: int | None = None,
    seed: int = 0,
    pgd_eps: float = 0.1,
    pgd_steps: int = 20,
) -> torch.Tensor:
    """Unit-L-inf direction (shaped like one input) of ``kind`` at ``x``.

    ``fgsm``/``pgd`` increase the loss of ``label`` (default: the predicted class); ``random``
    is a seeded random sign vector.
    """
    xb = torch.as_tensor(host(x), dtype=net.dtype).reshape(1, *net.input_shape).to(net.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)  # the same draws on any device
    if kind == "random":
        d = torch.randint(0, 2, xb.shape, generator=gen, device="cpu").to(xb) * 2 - 1
    elif kind in ("fgsm", "pgd"):
        with torch.no_grad():
            y = net(xb).argmax(1) if label is None else torch.tensor([int(label)], device=xb.device)
        if kind == "fgsm":
            d = fgsm(net, xb, y, eps=1.0, clip=None) - xb
        else:
            d = pgd(net, xb, y, eps=pgd_eps, steps=pgd_steps, clip=None, generator=gen) - xb
    else:
        raise InvalidInputError(f"direction must be one of {DIRECTIONS}, not {kind!r}")
    scale = float(d.abs().max())
    if scale == 0.0:
        raise InvalidInputError(f"the {kind} direction is zero at this input (flat loss)")
    return (d / scale)[0].detach().cpu()


def endpoint(net: Network, x: torch.Tensor | np.ndarray, kind: str, length: float,
             **kwargs) -> torch.Tensor:
    """``x + length * direction(net, x, kind)``."""
    xt = torch.as_tensor(host(x), dtype=net.dtype).reshape(net.input_shape)
    return xt + float(length) * direction(net, xt, kind, **kwargs)
