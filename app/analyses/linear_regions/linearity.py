"""How linear is the network around an input: FGSM versus random directions.

Two exact measures along each segment: region density (pieces per unit length) and the
largest gap between the network and its tangent along the line at the input (the tangent is
the first piece's affine map, so the gap is exact and peaks at a breakpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from app.analyses.linear_regions.directions import direction
from app.analyses.linear_regions.line import ExactLine, exact_lines
from app.analyses.linear_regions.points import host
from app.network import Network
from app.progress import ProgressFn, report


@dataclass
class DirectionLinearity:
    kind: str  # "fgsm" or "random"
    line: ExactLine
    tangent_gap: np.ndarray  # [k + 1] max over logits of |F - tangent| at the breakpoints

    @property
    def max_tangent_gap(self) -> float:
        return float(self.tangent_gap.max())

    @property
    def relative_tangent_gap(self) -> float:
        """Largest tangent gap over the largest logit change along the segment."""
        change = np.abs(self.line.logits - self.line.logits[0]).max()
        return self.max_tangent_gap / change if change > 0 else 0.0


@dataclass
class LinearityStudy:
    length: float
    fgsm: DirectionLinearity
    random: list[DirectionLinearity]

    @property
    def random_density(self) -> float:
        return float(np.mean([r.line.density for r in self.random]))

    @property
    def density_ratio(self) -> float:
        """FGSM density over mean random density (> 1: more regions along the attack)."""
        return self.fgsm.line.density / self.random_density if self.random_density else 0.0


def tangent_gap(line: ExactLine) -> np.ndarray:
    """``max_c |F_c(t) - (F_c(0) + t F_c'(0+))|`` at every breakpoint."""
    slope = (line.logits[1] - line.logits[0]) / (line.ts[1] - line.ts[0])
    tangent = line.logits[0][None] + line.ts[:, None] * slope[None]
    return np.abs(line.logits - tangent).max(1)


def linearity_study(
    net: Network,
    x: torch.Tensor | np.ndarray,
    length: float,
    *,
    label: int | None = None,
    n_random: int = 8,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> LinearityStudy:
    """Exact lines of L-inf ``length`` from ``x`` along FGSM and ``n_random`` sign directions."""
    xt = torch.as_tensor(host(x), dtype=torch.float64).reshape(net.input_shape)
    dirs = [direction(net, xt.to(net.dtype), "fgsm", label=label).to(torch.float64)]
    dirs += [direction(net, xt, "random", seed=seed + k).to(torch.float64)
             for k in range(n_random)]
    ends = torch.stack([xt + length * d for d in dirs])
    starts = xt.unsqueeze(0).expand_as(ends)
    report(progress, 0.05, f"{len(dirs)} directions")
    lines = exact_lines(net, starts, ends, progress=progress)
    rows = [DirectionLinearity(kind, ln, tangent_gap(ln))
            for kind, ln in zip(["fgsm"] + ["random"] * n_random, lines, strict=True)]
    return LinearityStudy(length=float(length), fgsm=rows[0], random=rows[1:])
