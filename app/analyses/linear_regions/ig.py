"""Exact Integrated Gradients from the ExactLine partition, and Captum's IG next to it.

On each linear piece of the path ``baseline -> x`` the gradient is constant, so the IG
integral is a finite sum: ``(x - baseline) * sum_i (t_{i+1} - t_i) grad_i``. Completeness
(attributions sum to ``F(x) - F(baseline)``) then holds up to rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import IntegratedGradients

from app.analyses.linear_regions.line import _as_batch, _in_dtype, exact_line
from app.network import Network
from app.progress import ProgressFn, report

GRAD_CHUNK = 512  # piece midpoints per backward pass


@dataclass
class ExactIG:
    """Exact IG attributions (shaped like ``x``) for logit ``target``."""

    attributions: np.ndarray
    target: int
    num_pieces: int
    f_x: float
    f_baseline: float

    @property
    def completeness_error(self) -> float:
        return abs(float(self.attributions.sum()) - (self.f_x - self.f_baseline))


@dataclass
class IGComparison:
    """Exact IG against Captum's IG at several step counts.

    ``rel_errors[i]`` is ``||captum - exact||_1 / ||exact||_1`` at ``steps[i]``.
    """

    exact: ExactIG
    exact_seconds: float
    method: str
    steps: list[int]
    rel_errors: list[float]
    seconds: list[float]
    captum: list[np.ndarray]


def exact_integrated_gradients(
    net: Network,
    x: torch.Tensor | np.ndarray,
    baseline: torch.Tensor | np.ndarray | None = None,
    target: int | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    progress: ProgressFn | None = None,
) -> ExactIG:
    """Exact IG of logit ``target`` (default: the predicted class) from ``baseline`` (zeros)."""
    net = _in_dtype(net, dtype)
    xb = _as_batch(net, x, dtype)
    bb = torch.zeros_like(xb) if baseline is None else _as_batch(net, baseline, dtype)
    with torch.no_grad():
        logits = net(torch.cat([xb, bb]))
    target = int(logits[0].argmax()) if target is None else int(target)
    line = exact_line(net, bb, xb, dtype=dtype,
                      progress=None if progress is None else lambda f, m: progress(0.8 * f, m))
    ts = torch.from_numpy(line.ts)
    mids, widths = (ts[:-1] + ts[1:]) / 2, torch.diff(ts)
    avg_grad = torch.zeros_like(xb[0])
    for lo in range(0, len(mids), GRAD_CHUNK):
        pts = torch.from_numpy(line.points(mids[lo:lo + GRAD_CHUNK].numpy())).to(dtype)
        pts.requires_grad_(True)
        (grad,) = torch.autograd.grad(net(pts)[:, target].sum(), pts)
        w = widths[lo:lo + GRAD_CHUNK].to(dtype).reshape(-1, *([1] * xb[0].dim()))
        avg_grad += (w * grad).sum(0)
        report(progress, 0.8 + 0.2 * (lo + GRAD_CHUNK) / len(mids), "gradients of the pieces")
    attributions = ((xb[0] - bb[0]) * avg_grad).detach()
    shape = tuple(np.shape(x))
    return ExactIG(
        attributions=attributions.reshape(shape).numpy(), target=target,
        num_pieces=line.num_pieces, f_x=float(logits[0, target]),
        f_baseline=float(logits[1, target]),
    )


def captum_integrated_gradients(
    net: Network, x: torch.Tensor | np.ndarray, baseline: torch.Tensor | np.ndarray | None,
    target: int, steps: int, *, method: str = "gausslegendre",
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """Captum's IG of logit ``target`` with ``steps`` steps (shaped like ``x``)."""
    net = _in_dtype(net, dtype)
    xb = _as_batch(net, x, dtype)
    bb = torch.zeros_like(xb) if baseline is None else _as_batch(net, baseline, dtype)
    attr = IntegratedGradients(net).attribute(
        xb, baselines=bb, target=target, n_steps=steps, method=method,
        internal_batch_size=min(steps, 1024))
    return attr.detach().reshape(tuple(np.shape(x))).numpy()


def relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """``||approx - exact||_1 / ||exact||_1``."""
    return float(np.abs(approx - exact).sum() / max(np.abs(exact).sum(), 1e-300))


def compare_with_captum(
    net: Network,
    x: torch.Tensor | np.ndarray,
    baseline: torch.Tensor | np.ndarray | None = None,
    target: int | None = None,
    *,
    steps: tuple[int, ...] = (20, 50, 100, 300),
    method: str = "gausslegendre",
    dtype: torch.dtype = torch.float64,
    progress: ProgressFn | None = None,
) -> IGComparison:
    """Exact IG and Captum's IG at ``steps``, with relative errors and wall times."""
    net = _in_dtype(net, dtype)
    t0 = time.perf_counter()
    exact = exact_integrated_gradients(
        net, x, baseline, target, dtype=dtype,
        progress=None if progress is None else lambda f, m: progress(0.5 * f, m))
    exact_seconds = time.perf_counter() - t0
    errors, seconds, attrs = [], [], []
    for k, n in enumerate(steps):
        t0 = time.perf_counter()
        attr = captum_integrated_gradients(net, x, baseline, exact.target, n, method=method,
                                           dtype=dtype)
        seconds.append(time.perf_counter() - t0)
        errors.append(relative_error(attr, exact.attributions))
        attrs.append(attr)
        report(progress, 0.5 + 0.5 * (k + 1) / len(steps), f"Captum IG with {n} steps")
    return IGComparison(exact=exact, exact_seconds=exact_seconds, method=method,
                        steps=list(steps), rel_errors=errors, seconds=seconds, captum=attrs)
