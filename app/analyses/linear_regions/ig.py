"""Exact Integrated Gradients from the ExactLine partition, and Captum's IG next to it.

On each linear piece of the path ``baseline -> x`` the gradient is constant, so the IG
integral is a finite sum: ``(x - baseline) * sum_i (t_{i+1} - t_i) grad_i``. Completeness
(attributions sum to ``F(x) - F(baseline)``) then holds up to rounding.

Conv nets (a ReLU, a conv with small windows, a ReLU, then dense layers) take the event
sweep of ``sweep``, which follows each conv unit only through its own window's switches and
integrates the gradient in closed form. Every other network takes the piece walk below.

The sum of gradients needs no forward pass at the pieces: the line walk already knows every
piece's activation codes, so the sum is one backward sweep of transposed layers, masked per
piece. Pieces that share the codes of all layers below a node share that part of the chain,
so before each bending node (going backwards) the rows of pieces that only differ above it
are added up: the sweep handles few rows near the input however many pieces the path has.
Through a ReLU followed by a large affine layer (the ones ``crossings`` handles on the way
forward) a run of rows costs one transposed layer plus one column per unit that flips inside
it, instead of a transposed layer per row (``_through_relu``). Layer kinds without a
closed-form backward (MaxPool) and graphs with branches use autograd at the piece midpoints
instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import Tensor

from app.analyses.linear_regions.codes import packed_bits, run_starts
from app.analyses.linear_regions.crossings import column_entries, cumsum_rows, fusable_chains
from app.analyses.linear_regions.line import trace_segments
from app.analyses.linear_regions.points import (
    Points,
    as_batch,
    in_dtype,
    merge_equal_neighbours,
    on_host,
)
from app.analyses.linear_regions.rules import rule_for
from app.analyses.linear_regions.sweep import sweep_path, sweep_plan
from app.layers import AffineLayer
from app.network import Network
from app.progress import ProgressFn, report

T = TypeVar("T")
GRAD_CHUNK = 512  # piece midpoints per backward pass (autograd fallback)


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
    """Exact IG of logit ``target`` (default: the predicted class) from ``baseline`` (zeros);
    computed on a host copy of ``net`` (see ``points.on_host``)."""
    net = on_host(net, dtype)
    xb = as_batch(net, x, dtype)
    bb = torch.zeros_like(xb) if baseline is None else as_batch(net, baseline, dtype)
    plan = sweep_plan(net)
    if plan is not None:
        swept = sweep_path(net, plan, bb[0].numpy(), xb[0].numpy(), target)
        return ExactIG(
            attributions=((xb[0] - bb[0]).numpy() * swept.mean_gradient).reshape(np.shape(x)),
            target=swept.target, num_pieces=swept.num_pieces,
            f_x=float(swept.logits[1, swept.target]),
            f_baseline=float(swept.logits[0, swept.target]))
    pts = trace_segments(net, bb.numpy(), xb.numpy(),
                         progress=None if progress is None else lambda f, m: progress(0.8 * f, m))
    merge_equal_neighbours(pts)
    logits = pts.values[len(net.layers) - 1].reshape(len(pts.ts), -1)
    target = int(logits[-1].argmax()) if target is None else int(target)
    report(progress, 0.8, "gradients of the pieces")
    avg_grad = _mean_gradient(net, pts, target)
    if avg_grad is None:
        avg_grad = _mean_gradient_autograd(net, pts, bb[0], xb[0], target, progress)
    attributions = ((xb[0] - bb[0]) * avg_grad.reshape(xb[0].shape)).detach()
    return ExactIG(
        attributions=attributions.reshape(tuple(np.shape(x))).numpy(), target=target,
        num_pieces=len(pts.ts) - 1, f_x=float(logits[-1, target]),
        f_baseline=float(logits[0, target]),
    )


def _mean_gradient(net: Network, pts: Points, target: int) -> Tensor | None:
    """``sum_i (t_{i+1} - t_i) grad_i`` of logit ``target`` over the pieces of one line, by a
    backward sweep with each piece's codes; None when a layer has no closed-form backward."""
    if not net.is_sequential:
        return None
    widths = np.diff(pts.ts)
    n = len(widths)
    codes = dict(zip(pts.code_nodes, pts.codes, strict=True))
    # levels[node]: group id per piece; pieces in a group agree on every code up to ``node``
    changed = np.zeros(max(n - 1, 0), dtype=bool)
    levels: dict[int, np.ndarray] = {}
    for node in pts.code_nodes:
        diff = codes[node][1:] != codes[node][:-1]
        changed |= diff.any(axis=tuple(range(1, diff.ndim)))
        levels[node] = np.concatenate([[0], np.cumsum(changed)])
    bends = sorted(levels)
    group = levels[bends[-1]] if bends else np.zeros(n, dtype=np.int64)
    weights = torch.from_numpy(np.bincount(group, widths))
    grad = torch.zeros(len(weights), net.num_outputs, dtype=net.dtype)
    grad[:, target] = weights.to(net.dtype)
    grad = grad.reshape(len(weights), *net.shapes[-1])
    chains = fusable_chains(net)
    through = {chains[b][-1]: b for b in bends if b in chains}  # affine node -> its ReLU
    skip: set[int] = set()
    for i, layer in reversed(list(enumerate(net.layers))):
        if i in skip:
            continue
        bend = through.get(i, i)
        if bend in levels:
            first = run_starts(levels[bend])
            below = bends.index(bend)
            coarse = levels[bends[below - 1]][first] if below else np.zeros(len(first), int)
        if i in through:  # the affine layer, the reshapes before it and the ReLU at once
            grad = _through_relu(layer, net.in_shape(i), grad, codes[bend][first], coarse)
            grad = grad.reshape(len(grad), *net.shapes[bend])
            skip.update(chains[bend][:-1] + [bend])
            continue
        grad = rule_for(layer).line_backward(layer, grad, codes[i][first] if i in levels else None,
                                             net.in_shape(i))
        if grad is None:
            return None
        if i in levels:  # add up the rows that agree on every code below node i
            grad = torch.zeros((int(coarse.max()) + 1, *grad.shape[1:]), dtype=grad.dtype
                               ).index_add_(0, torch.from_numpy(coarse), grad)
    return grad[0]


@torch.no_grad()
def _through_relu(layer: AffineLayer, in_shape: tuple[int, ...], grad: Tensor,
                  code: np.ndarray, group: np.ndarray) -> Tensor:
    """``sum_{g in G} D_g A^T grad_g`` for each run ``G`` of rows with the same ``group`` id
    (rows in line order), for a ReLU's masks ``D_g`` (``code``) and the affine layer ``A``
    after it: ``[n_groups, n]``.

    Consecutive rows' masks differ in a few units, so with ``D_g = D_first + the flips up to
    g`` a run's sum is ``D_first A^T sum_G grad`` plus, per flip of unit ``k`` at row ``g``,
    ``+-A[:, k] . sum_{g' in G, g' > g} grad_g'``: one transposed layer per run and one
    column per flip, instead of a transposed layer per row."""
    rows = grad.detach().reshape(len(grad), -1).numpy().copy()
    code = code.reshape(len(code), -1)
    starts = run_starts(group)
    sums = torch.zeros((len(starts), rows.shape[1]), dtype=grad.dtype).index_add_(
        0, torch.from_numpy(group), torch.from_numpy(rows))
    out = layer.transpose(sums.reshape(len(sums), *grad.shape[1:]), in_shape)
    out = out.reshape(len(sums), -1).masked_fill_(~torch.from_numpy(code[starts]), 0.0).numpy()
    sums = sums.numpy()
    g, k = _flips(code)
    inside = group[g] == group[g + 1]  # a flip between runs is in the next run's first mask
    g, k = g[inside], k[inside]
    if len(g):
        run = group[g]
        first = np.zeros(len(rows), dtype=bool)
        first[starts] = True
        cumsum_rows(rows, first)  # rows[g]: the run's sum up to row g
        index, value = column_entries(layer, in_shape, k, rows.dtype)
        width = rows.shape[1]
        after = sums.reshape(-1)[run[:, None] * width + index] - rows.reshape(-1)[
            g[:, None] * width + index]
        dots = np.einsum("em,em->e", value, after)
        np.add.at(out, (run, k), np.where(code[g + 1, k], dots, -dots))
    return torch.from_numpy(out)


def _flips(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where consecutive rows of a boolean ``code`` ``[R, n]`` differ: (row before, unit),
    found on packed bits (one byte compare per 8 units)."""
    packed = packed_bits(code)
    g, byte = np.nonzero(packed[1:] != packed[:-1])
    bits = np.unpackbits((packed[g + 1, byte] ^ packed[g, byte])[:, None], axis=1)
    row, bit = np.nonzero(bits)
    return g[row], byte[row] * 8 + bit


def _mean_gradient_autograd(net: Network, pts: Points, start: Tensor, end: Tensor,
                            target: int, progress: ProgressFn | None) -> Tensor:
    """The same sum from autograd at the piece midpoints (any graph, any layer kind)."""
    ts = torch.from_numpy(pts.ts)
    mids, widths = (ts[:-1] + ts[1:]) / 2, torch.diff(ts)
    shape = (-1, *([1] * start.dim()))
    total = torch.zeros_like(start)
    for lo in range(0, len(mids), GRAD_CHUNK):
        t = mids[lo:lo + GRAD_CHUNK].to(start.dtype).reshape(shape)
        points = (start + t * (end - start)).requires_grad_(True)
        (grad,) = torch.autograd.grad(net(points)[:, target].sum(), points)
        total += (widths[lo:lo + GRAD_CHUNK].to(start.dtype).reshape(shape) * grad).sum(0)
        report(progress, 0.8 + 0.2 * (lo + GRAD_CHUNK) / len(mids), "gradients of the pieces")
    return total


def captum_integrated_gradients(
    net: Network, x: torch.Tensor | np.ndarray, baseline: torch.Tensor | np.ndarray | None,
    target: int, steps: int, *, method: str = "gausslegendre",
    dtype: torch.dtype = torch.float64,
) -> np.ndarray:
    """Captum's IG of logit ``target`` with ``steps`` steps (shaped like ``x``)."""
    net = in_dtype(net, dtype)
    xb = as_batch(net, x, dtype)
    bb = torch.zeros_like(xb) if baseline is None else as_batch(net, baseline, dtype)
    attr = IntegratedGradients(net).attribute(
        xb, baselines=bb, target=target, n_steps=steps, method=method,
        internal_batch_size=min(steps, 1024))
    return attr.detach().reshape(tuple(np.shape(x))).cpu().numpy()


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
    repeats: int = 3,
    progress: ProgressFn | None = None,
) -> IGComparison:
    """Exact IG and Captum's IG at ``steps``, with relative errors and wall times (each the
    best of ``repeats`` runs: a single run of a few ms mostly measures what else the machine
    is doing)."""
    net = in_dtype(net, dtype)
    exact, exact_seconds = _best_of(repeats, lambda k: exact_integrated_gradients(
        net, x, baseline, target, dtype=dtype,
        progress=None if progress is None or k else lambda f, m: progress(0.5 * f, m)))
    errors, seconds, attrs = [], [], []
    for k, n in enumerate(steps):
        attr, best = _best_of(repeats, lambda _, n=n: captum_integrated_gradients(
            net, x, baseline, exact.target, n, method=method, dtype=dtype))
        seconds.append(best)
        errors.append(relative_error(attr, exact.attributions))
        attrs.append(attr)
        report(progress, 0.5 + 0.5 * (k + 1) / len(steps), f"Captum IG with {n} steps")
    return IGComparison(exact=exact, exact_seconds=exact_seconds, method=method,
                        steps=list(steps), rel_errors=errors, seconds=seconds, captum=attrs)


def _best_of(repeats: int, run: Callable[[int], T]) -> tuple[T, float]:
    """``run(k)``'s result and its shortest wall time over runs ``k = 0 .. repeats - 1``."""
    best = float("inf")
    for k in range(max(repeats, 1)):
        t0 = time.perf_counter()
        result = run(k)
        best = min(best, time.perf_counter() - t0)
    return result, best
