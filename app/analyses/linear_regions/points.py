"""The points of the exact line walk, and the inputs and network it runs on.

Public to every linear-regions module (``line``, ``crossings``, ``ig``, ``plane``): the points
along segments with their live node values and codes, the conversions of user inputs, and the
host copy of the network. The walks' bookkeeping is numpy, so they run on a CPU copy of a
network that may live on any device (``on_host``); methods that are pure torch (Captum's IG)
keep the network where it is (``in_dtype``, ``as_batch``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from app.analyses.linear_regions.codes import pack_codes, rows_differ
from app.errors import InvalidInputError
from app.network import Network


class Points:
    """Points on one or more segments, sorted by (segment, t), with live node values.

    ``codes[k]`` ``[S, ...]`` is the linear behaviour of node ``code_nodes[k]`` on each of the
    ``S = P - 1`` segments between consecutive points (rows between two lines are unused).
    """

    def __init__(self, ts: np.ndarray, line: np.ndarray, values: dict[int, np.ndarray],
                 min_gap: float) -> None:
        self.ts = ts  # [P] float64
        self.line = line  # [P] which segment each point is on
        self.values = values
        self.min_gap = min_gap
        self.codes: list[np.ndarray] = []
        self.code_nodes: list[int] = []
        self.valid = line[1:] == line[:-1]  # segment s joins two points of the same line

    def insert(self, seg: np.ndarray, ratio: np.ndarray) -> None:
        """Add points at ``ratio`` along segments ``seg``, interpolating every live value."""
        seg, ratio, _, keep, _ = self.place(seg, ratio)
        self.spread(seg[keep], ratio[keep])

    def place(self, seg: np.ndarray, ratio: np.ndarray) -> tuple[np.ndarray, ...]:
        """Cuts sorted by (segment, ratio): ``seg``, ``ratio``, the sorting ``order``, which to
        ``keep`` and which are ``inside`` (not within ``min_gap`` of their segment's end).

        A new point closer than ``min_gap`` (in t) to the point before it or to the segment's
        end is dropped."""
        seg, ratio, order = sorted_cuts(seg, ratio.astype(np.float64, copy=False))
        t0 = self.ts[seg]
        span = self.ts[seg + 1] - t0
        t_new = t0 + ratio * span
        first = np.ones(len(seg), dtype=bool)
        first[1:] = seg[1:] != seg[:-1]
        prev = np.empty_like(t_new)
        prev[1:] = t_new[:-1]
        prev[first] = t0[first]
        inside = t0 + span - t_new >= self.min_gap
        return seg, ratio, order, (t_new - prev >= self.min_gap) & inside, inside

    def spread(self, seg: np.ndarray, ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Insert kept cuts (sorted): every old point is followed by the new points of its
        segment, so the merged arrays are the old ones with each row repeated (1 + its
        segment's new points) times, then the new rows written over the copies. Returns those
        repeats and the new rows' positions."""
        reps = np.bincount(seg, minlength=len(self.ts)) + 1
        new_pos = seg + np.arange(1, len(seg) + 1)
        if not len(seg):
            return reps, new_pos
        t_new = self.ts[seg] + ratio * (self.ts[seg + 1] - self.ts[seg])
        self.ts = np.repeat(self.ts, reps)
        self.ts[new_pos] = t_new
        self.line = np.repeat(self.line, reps)
        for node, v in self.values.items():
            va, vb = v.take(seg, 0), v.take(seg + 1, 0)
            vb -= va  # in place: the interpolation allocates only the two gathers
            vb *= ratio.astype(v.dtype, copy=False).reshape(-1, *([1] * (v.ndim - 1)))
            vb += va
            out = np.repeat(v, reps, 0)
            out[new_pos] = vb
            self.values[node] = out
        self.codes = [np.repeat(c, reps[:-1], 0) for c in self.codes]
        self.valid = np.repeat(self.valid, reps[:-1])
        return reps, new_pos

    def inputs(self, net: Network, i: int) -> list[np.ndarray]:
        return [self.values[j] for j in net.inputs[i]]


def sorted_cuts(seg: np.ndarray, ratio: np.ndarray) -> tuple[np.ndarray, ...]:
    """``seg``, ``ratio`` and the order in ``np.lexsort((ratio, seg))`` order, found by one
    stable argsort of ``seg + ratio`` (ratios lie in [0, 1)); the lexsort runs only where that
    order is checked to be wrong (rounding merged two ratios, or a ratio rounded up to 1)."""
    order = np.argsort(seg + ratio, kind="stable")
    s, r = seg[order], ratio[order]
    if ((s[1:] > s[:-1]) | ((s[1:] == s[:-1]) & (r[1:] >= r[:-1]))).all():
        return s, r, order
    order = np.lexsort((ratio, seg))
    return seg[order], ratio[order], order


def host(x: Tensor | np.ndarray) -> np.ndarray:
    """``x`` as a numpy array on the host, from a tensor on any device or an array."""
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def as_array(net: Network, x: Tensor | np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``x`` as a numpy batch ``[B, *input_shape]`` in ``dtype`` (numpy in, numpy out: no
    tensor round trip on the line hot path)."""
    a = host(x)
    a = a.astype(torch.empty(0, dtype=dtype, device="cpu").numpy().dtype, copy=False)
    if a.shape == net.input_shape:
        a = a[None]
    if a.shape[1:] != net.input_shape:
        raise InvalidInputError(
            f"input shape {a.shape} does not match the model's {net.input_shape}")
    return a


def as_batch(net: Network, x: Tensor | np.ndarray, dtype: torch.dtype) -> Tensor:
    """``x`` as a batch tensor ``[B, *input_shape]`` in ``dtype`` on ``net``'s device."""
    return torch.from_numpy(as_array(net, x, dtype)).to(net.device)


def in_dtype(net: Network, dtype: torch.dtype) -> Network:
    """``net`` in ``dtype`` (a copy unless it already is), on its own device."""
    return net if net.dtype == dtype else net.with_dtype(dtype)


def on_host(net: Network, dtype: torch.dtype) -> Network:
    """``net`` in ``dtype`` on the CPU, where the walks' numpy bookkeeping lives (a copy
    unless it already is; a float64 walk copies the network anyway)."""
    net = in_dtype(net, dtype)
    return net if net.device.type == "cpu" else net.cpu()



def merge_equal_neighbours(pts: Points) -> np.ndarray:
    """Drop breakpoints whose two sides have the same code (arg-max tracing can over-cut).

    Returns the pieces' codes packed into byte rows (``pack_codes``), after the merge."""
    rows = pack_codes(pts.codes, len(pts.ts) - 1)
    if not pts.codes:
        return rows
    same = pts.valid[:-1] & pts.valid[1:] & ~rows_differ(rows.view(np.uint64))
    if not same.any():
        return rows
    keep = np.ones(len(pts.ts), dtype=bool)
    keep[1:-1] = ~same
    seg_keep = np.concatenate([[True], ~same])
    pts.codes = [c[seg_keep] for c in pts.codes]
    pts.ts, pts.line = pts.ts[keep], pts.line[keep]
    pts.values = {k: v[keep] for k, v in pts.values.items()}
    pts.valid = pts.line[1:] == pts.line[:-1]
    return rows[seg_keep]
