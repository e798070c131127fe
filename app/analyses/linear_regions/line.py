"""ExactLine: the exact partition of input segments into the network's linear pieces.

Points along the segments are pushed through the graph layer by layer. Before a ReLU or
MaxPool node, every segment on which the node stops being linear is cut where it does (the
zero crossing, the arg-max switch); the new points' values at every live node are linear
interpolations, exact because everything computed so far is affine on each segment, so no
prefix of the network is ever recomputed. A ReLU followed by a large affine layer skips even
that: its crossings go straight through the layer, one gathered column each (``crossings``).
Many segments are processed together in one set of points, so small networks stay cheap.

The bookkeeping (cuts, merges, re-indexing) is numpy: it is many small index operations,
where numpy's per-call cost is several times lower than torch's. The layers themselves run in
torch on the same memory (``torch.from_numpy`` shares it), fully connected ones as one numpy
matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from app.analyses.linear_regions.codes import first_appearance_ids
from app.analyses.linear_regions.crossings import cut_and_push, fusable_chains
from app.analyses.linear_regions.points import Points, as_array, merge_equal_neighbours, on_host
from app.analyses.linear_regions.rules import rule_for
from app.analyses.linear_regions.strips import class_strips
from app.errors import InvalidInputError
from app.network import INPUT, Network
from app.progress import ProgressFn, report


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


def trace_segments(net: Network, starts: np.ndarray, ends: np.ndarray,
                   progress: ProgressFn | None = None) -> Points:
    """Push the segments through every node, cutting where a node bends."""
    n = len(starts)
    if starts.flags.c_contiguous and ends.flags.c_contiguous:  # np.stack's layout, cheaper
        x = np.empty((2 * n, *starts.shape[1:]), dtype=starts.dtype)
        x[0::2], x[1::2] = starts, ends
    else:  # keep the inputs' memory layout: a conv's rounding depends on it
        x = np.stack([starts, ends], 1).reshape(2 * n, *starts.shape[1:])
    ts = np.zeros(2 * n)
    ts[1::2] = 1.0
    pts = Points(ts, np.repeat(np.arange(n), 2), {INPUT: x},
                  min_gap=8 * float(np.finfo(starts.dtype).eps))
    last_use = net.last_readers
    chains = fusable_chains(net)
    done = -1  # nodes up to here were computed by a ReLU's crossings (``cut_and_push``)
    for i, layer in enumerate(net.layers):
        if i <= done:
            continue
        if i in chains:
            cut_and_push(pts, net, i, chains[i])
            done = chains[i][-1]
        else:
            _walk_node(pts, net, i, last_use)
        if progress is not None:
            report(progress, (max(i, done) + 1) / len(net.layers),
                   f"layer {i + 1}/{len(net.layers)} ({layer.kind}): {len(pts.ts)} points")
    return pts


def _walk_node(pts: Points, net: Network, i: int, last_use: dict[int, int]) -> None:
    """Cut where node ``i`` bends, record its code, and compute its values at every point."""
    layer = net.layers[i]
    rule = rule_for(layer)
    for _ in range(rule.line_rounds):
        cuts = rule.line_cuts(layer, pts.inputs(net, i), pts.valid)
        if cuts is None:
            break
        pts.insert(*cuts)
    ins = pts.inputs(net, i)
    code = rule.line_code(layer, ins)
    if code is not None:
        pts.codes.append(code)
        pts.code_nodes.append(i)
    pts.values[i] = rule.line_forward(layer, ins)
    for j in net.inputs[i]:
        if last_use[j] == i:
            del pts.values[j]


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
    net = on_host(net, dtype)
    a, b = as_array(net, starts, dtype), as_array(net, ends, dtype)
    if a.shape != b.shape:
        raise InvalidInputError("starts and ends must have the same shape")
    pts = trace_segments(net, a, b, progress)
    rows = merge_equal_neighbours(pts)
    n_seg = len(pts.ts) - 1
    relu_nodes = set(net.relu_indices)
    relu_codes = [c.reshape(n_seg, -1) for node, c in zip(pts.code_nodes, pts.codes, strict=True)
                  if node in relu_nodes]
    relu_bits = (np.concatenate(relu_codes, 1) if relu_codes
                 else np.zeros((n_seg, 0), dtype=bool))
    ids = first_appearance_ids(rows, pts.line[:-1])
    logits = pts.values[len(net.layers) - 1].reshape(len(pts.ts), -1)
    classes = (logits[:-1] + logits[1:]).argmax(1)
    class_ts, class_labels, strip_bounds = class_strips(pts.ts, pts.line, pts.valid, logits,
                                                        len(a), pts.min_gap)
    # one view per field and line: slices built once, applied by ``map`` (no per-line loop)
    bounds = np.searchsorted(pts.line, np.arange(len(a) + 1))
    lo, hi = bounds[:-1].tolist(), bounds[1:].tolist()
    pieces, segs = list(map(slice, lo, hi)), list(map(slice, lo, (bounds[1:] - 1).tolist()))
    sb = strip_bounds
    strips = list(map(slice, sb[:-1].tolist(), sb[1:].tolist()))
    k = np.arange(len(a))
    strip_ts = list(map(slice, (sb[:-1] + k).tolist(), (sb[1:] + k + 1).tolist()))
    return list(map(ExactLine, a, b, map(pts.ts.__getitem__, pieces),
                    map(logits.__getitem__, pieces), map(ids.__getitem__, segs),
                    map(classes.__getitem__, segs), map(relu_bits.__getitem__, segs),
                    map(class_ts.__getitem__, strip_ts), map(class_labels.__getitem__, strips)))


def exact_line(
    net: Network,
    start: Tensor | np.ndarray,
    end: Tensor | np.ndarray,
    *,
    dtype: torch.dtype = torch.float64,
    progress: ProgressFn | None = None,
) -> ExactLine:
    """ExactLine of the segment ``start -> end`` (each shaped like one input)."""
    return exact_lines(net, as_array(net, start, dtype), as_array(net, end, dtype),
                       dtype=dtype, progress=progress)[0]
