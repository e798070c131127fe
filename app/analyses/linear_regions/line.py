"""ExactLine: the exact partition of input segments into the network's linear pieces.

Points along the segments are pushed through the graph layer by layer. Before a ReLU or
MaxPool node, every segment on which the node stops being linear is cut where it does (the
zero crossing, the arg-max switch); the new points' values at every live node are linear
interpolations, exact because everything computed so far is affine on each segment. Many
segments are processed together in one set of points, so small networks stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from app.analyses.linear_regions.rules import Cuts, envelope_cuts, rule_for, tolerance
from app.errors import InvalidInputError
from app.network import INPUT, Network
from app.progress import ProgressFn, report

MAX_ROUNDS = 64  # arg-max tracing needs at most k - 1 rounds per window of k candidates


@dataclass
class ExactLine:
    """The linear pieces of ``t -> net(start + t (end - start))`` on ``[0, 1]``.

    Piece ``i`` is ``[ts[i], ts[i + 1]]``; the logits are affine on it, so ``logits`` at the
    breakpoints give the exact curve. ``classes[i]`` is the prediction at the piece's middle;
    the prediction may still change inside a piece, exactly at ``class_ts``.
    """

    start: np.ndarray
    end: np.ndarray
    ts: np.ndarray  # [k + 1] breakpoints, 0 = t0 < ... < tk = 1
    logits: np.ndarray  # [k + 1, C] logits at the breakpoints
    pattern_ids: np.ndarray  # [k] activation-pattern id, numbered by first appearance
    classes: np.ndarray  # [k] predicted class at each piece's midpoint
    relu_pattern: np.ndarray  # [k, n_relu] on/off of every ReLU unit (``net.relu_indices`` order)
    class_ts: np.ndarray  # [m + 1] where the predicted class changes (plus 0 and 1)
    class_labels: np.ndarray  # [m] the predicted class between consecutive ``class_ts``

    @property
    def num_pieces(self) -> int:
        return len(self.ts) - 1

    @property
    def length(self) -> float:
        """Euclidean length of the segment in input space."""
        return float(np.linalg.norm((self.end - self.start).ravel()))

    @property
    def density(self) -> float:
        """Linear pieces per unit of Euclidean length."""
        return self.num_pieces / self.length if self.length > 0 else 0.0

    def points(self, ts: np.ndarray) -> np.ndarray:
        """Inputs at the parameters ``ts``: ``[len(ts), *input_shape]``."""
        ts = np.asarray(ts, dtype=np.float64).reshape(-1, *([1] * self.start.ndim))
        return self.start[None] + ts * (self.end - self.start)[None]

    def logits_at(self, ts: np.ndarray) -> np.ndarray:
        """Exact logits at ``ts`` by interpolating the piece ends (no network evaluation)."""
        ts = np.asarray(ts, dtype=np.float64)
        return np.stack([np.interp(ts, self.ts, col) for col in self.logits.T], axis=-1)


@dataclass
class _Points:
    """Points on one or more segments, sorted by (segment, t), with live node values."""

    ts: Tensor  # [P] float64
    line: Tensor  # [P] which segment each point is on
    values: dict[int, Tensor]
    codes: list[Tensor] = field(default_factory=list)  # per-segment codes, one per bending node
    code_nodes: list[int] = field(default_factory=list)  # the node each code belongs to
    min_gap: float = 0.0

    @property
    def valid(self) -> Tensor:
        """Segment s (points s, s + 1) is a real piece of a line."""
        return self.line[1:] == self.line[:-1]

    def insert(self, seg: Tensor, ratio: Tensor) -> None:
        """Add points at ``ratio`` along segments ``seg``, interpolating every live value."""
        n_old = len(self.ts)
        r64 = ratio.to(torch.float64)
        seg_len = self.ts[seg + 1] - self.ts[seg]
        t_new = self.ts[seg] + r64 * seg_len
        # lexicographic sort by (segment, ratio); old point j sorts as (j, 0)
        key_seg = torch.cat([torch.arange(n_old), seg])
        key_r = torch.cat([torch.zeros(n_old, dtype=torch.float64), r64])
        order = torch.sort(key_r, stable=True).indices
        order = order[torch.sort(key_seg[order], stable=True).indices]
        t_all = torch.cat([self.ts, t_new])[order]
        is_new = order >= n_old
        gap_prev = torch.diff(t_all, prepend=t_all[:1] - 1)
        to_next_old = torch.cat([torch.full((n_old,), 1.0, dtype=torch.float64),
                                 (1 - r64) * seg_len])[order]
        keep = ~is_new | ((gap_prev >= self.min_gap) & (to_next_old >= self.min_gap))
        idx = order[keep]
        parent = torch.cumsum((~is_new)[keep].long(), 0)[:-1] - 1
        self.ts = t_all[keep]
        self.line = torch.cat([self.line, self.line[seg]])[idx]
        for node, v in self.values.items():
            va, vb = v[seg], v[seg + 1]
            rv = ratio.to(v.dtype).reshape(-1, *([1] * (v.dim() - 1)))
            self.values[node] = torch.cat([v, va + rv * (vb - va)])[idx]
        self.codes = [c[parent] for c in self.codes]

    def refine(self, cut: callable) -> None:
        """Insert the cuts ``cut()`` proposes until it proposes none."""
        for _ in range(MAX_ROUNDS):
            cuts: Cuts | None = cut()
            if cuts is None:
                return
            self.insert(*cuts)


def _as_batch(net: Network, x: Tensor | np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).detach().to(dtype)
    if tuple(t.shape) == net.input_shape:
        t = t.unsqueeze(0)
    if tuple(t.shape[1:]) != net.input_shape:
        raise InvalidInputError(
            f"input shape {tuple(t.shape)} does not match the model's {net.input_shape}")
    return t


def _in_dtype(net: Network, dtype: torch.dtype) -> Network:
    return net if net.dtype == dtype else net.with_dtype(dtype)


def _trace_line(net: Network, starts: Tensor, ends: Tensor,
                progress: ProgressFn | None) -> _Points:
    """Push the segments through every node, cutting where a node bends."""
    n = starts.shape[0]
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64).repeat(n)
    line = torch.arange(n).repeat_interleave(2)
    x = torch.stack([starts, ends], 1).reshape(2 * n, *starts.shape[1:])
    pts = _Points(ts, line, {INPUT: x}, min_gap=8 * torch.finfo(starts.dtype).eps)
    last_use = {j: i for i, ins in enumerate(net.inputs) for j in ins}
    for i, layer in enumerate(net.layers):
        rule = rule_for(layer)

        def ins(i: int = i) -> list[Tensor]:
            return [pts.values[j] for j in net.inputs[i]]

        pts.refine(lambda rule=rule, layer=layer, ins=ins: rule.line_cuts(layer, ins(), pts.valid))
        code = rule.line_code(layer, ins())
        if code is not None:
            pts.codes.append(code)
            pts.code_nodes.append(i)
        with torch.no_grad():
            pts.values[i] = layer(*ins())
        for j in net.inputs[i]:
            if last_use[j] == i:
                del pts.values[j]
        report(progress, (i + 1) / len(net.layers),
               f"layer {i + 1}/{len(net.layers)} ({layer.kind}): {len(pts.ts)} points")
    return pts


def _merge_equal_neighbours(pts: _Points) -> None:
    """Drop breakpoints whose two sides have the same code (arg-max tracing can over-cut)."""
    if not pts.codes:
        return
    codes = torch.cat([c.reshape(c.shape[0], -1).to(torch.int16) for c in pts.codes], 1)
    same = pts.valid[:-1] & pts.valid[1:] & (codes[1:] == codes[:-1]).all(1)
    if not bool(same.any()):
        return
    keep = torch.ones(len(pts.ts), dtype=torch.bool)
    keep[1:-1] = ~same
    seg_keep = torch.cat([torch.ones(1, dtype=torch.bool), ~same])
    pts.codes = [c[seg_keep] for c in pts.codes]
    pts.ts, pts.line = pts.ts[keep], pts.line[keep]
    pts.values = {k: v[keep] for k, v in pts.values.items()}


def _class_strips(ts: Tensor, line: Tensor, logits: Tensor) -> list[tuple[np.ndarray,
                                                                           np.ndarray]]:
    """Per line, the exact points where the arg-max of the piecewise-linear logits changes
    (with 0 and 1) and the class between them."""
    pts = _Points(ts.clone(), line.clone(), {0: logits}, min_gap=8 * torch.finfo(logits.dtype).eps)
    tol = tolerance(logits)

    def cut() -> Cuts | None:
        v = pts.values[0].unsqueeze(1)
        return envelope_cuts(v[:-1], v[1:], pts.valid, tol)

    pts.refine(cut)
    v = pts.values[0]
    labels = (v[:-1] + v[1:]).argmax(1)
    valid = pts.valid
    change = valid & torch.cat([torch.ones(1, dtype=torch.bool),
                                (labels[1:] != labels[:-1]) | ~valid[:-1]])
    seg_line = pts.line[:-1]
    out = []
    for k in range(int(line.max()) + 1):
        mine = change & (seg_line == k)
        end = pts.ts[torch.searchsorted(pts.line, k, right=True) - 1].reshape(1)
        out.append((torch.cat([pts.ts[:-1][mine], end]).numpy(), labels[mine].numpy()))
    return out


def _first_appearance_ids(codes: Tensor) -> np.ndarray:
    """Integer ids of the rows of ``codes``, numbered in order of first appearance."""
    if codes.shape[1] == 0:
        return np.zeros(codes.shape[0], dtype=np.int64)
    _, inverse = torch.unique(codes, dim=0, return_inverse=True)
    inv = inverse.numpy()
    _, first = np.unique(inv, return_index=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inv]


def exact_lines(
    net: Network,
    starts: Tensor | np.ndarray,
    ends: Tensor | np.ndarray,
    *,
    dtype: torch.dtype = torch.float64,
    progress: ProgressFn | None = None,
) -> list[ExactLine]:
    """ExactLine for a batch of segments ``starts[i] -> ends[i]`` (``[B, *input_shape]``).

    All segments share one set of points, so the cost is a few batched passes over all
    breakpoints. ``dtype`` float64 (default) keeps breakpoints exact to ~1e-12.
    """
    net = _in_dtype(net, dtype)
    a, b = _as_batch(net, starts, dtype), _as_batch(net, ends, dtype)
    if a.shape != b.shape:
        raise InvalidInputError("starts and ends must have the same shape")
    pts = _trace_line(net, a, b, progress)
    _merge_equal_neighbours(pts)
    relu_nodes = set(net.relu_indices)
    relu_codes = [c for node, c in zip(pts.code_nodes, pts.codes, strict=True)
                  if node in relu_nodes]
    all_codes = (torch.cat([c.reshape(c.shape[0], -1).to(torch.int16) for c in pts.codes], 1)
                 if pts.codes else torch.zeros(len(pts.ts) - 1, 0, dtype=torch.int16))
    relu_bits = (torch.cat([c.reshape(c.shape[0], -1) for c in relu_codes], 1) if relu_codes
                 else torch.zeros(len(pts.ts) - 1, 0, dtype=torch.bool))
    logits = pts.values[len(net.layers) - 1].reshape(len(pts.ts), -1)
    bounds = torch.searchsorted(pts.line, torch.arange(a.shape[0] + 1))
    strips = _class_strips(pts.ts, pts.line, logits)
    results = []
    for k, (class_ts, class_labels) in enumerate(strips):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        lg = logits[lo:hi]
        results.append(ExactLine(
            start=a[k].numpy(), end=b[k].numpy(), ts=pts.ts[lo:hi].numpy(), logits=lg.numpy(),
            pattern_ids=_first_appearance_ids(all_codes[lo:hi - 1]),
            classes=(lg[:-1] + lg[1:]).argmax(1).numpy(),
            relu_pattern=relu_bits[lo:hi - 1].numpy(),
            class_ts=class_ts, class_labels=class_labels,
        ))
    return results


def exact_line(
    net: Network,
    start: Tensor | np.ndarray,
    end: Tensor | np.ndarray,
    *,
    dtype: torch.dtype = torch.float64,
    progress: ProgressFn | None = None,
) -> ExactLine:
    """ExactLine of the segment ``start -> end`` (each shaped like one input)."""
    return exact_lines(net, _as_batch(net, start, dtype), _as_batch(net, end, dtype),
                       dtype=dtype, progress=progress)[0]
