"""A ReLU's zero crossings pushed through the affine layer after it, one column per crossing.

Cutting a segment at a ReLU's zero crossings and then running the next affine layer ``A`` on
every new point costs one full layer evaluation per crossing; a conv net's first ReLU crosses
zero a thousand times on a typical path. Between two neighbouring points only the crossing
unit ``k`` changes its on/off state, so ``A relu(x)`` changes slope by ``|dx_k| A[:, k]``
there: the values at all new points follow from the values at the segment's two ends (which
the layer computes anyway) plus one column of ``A`` per crossing, gathered from the weights.

Inside an old segment with end values ``ya``, ``yb`` and crossings at ratios
``0 < r_1 < ... < r_M < 1``, write ``g_j`` for the slope of ``y`` on sub-segment ``j`` (between
``r_j`` and ``r_{j+1}``, with ``r_0 = 0``, ``r_{M+1} = 1``) and ``h_j = g_j - g_0`` for the
sum of the columns switched on (minus those switched off) up to ``r_j``. Then
``yb - ya = g_0 + sum_j (r_{j+1} - r_j) h_j`` gives ``g_0``, and
``y(r_m) = ya + r_m g_0 + sum_{j < m} (r_{j+1} - r_j) h_j``: two cumulative sums (``_block``
evaluates the same sum from the segment's end).
The on/off codes of the sub-segments are the first sub-segment's code with the crossing
units flipped, a cumulative XOR over a boolean array instead of the float values.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from app.analyses.linear_regions.codes import group_starts, packed_bits, run_starts
from app.analyses.linear_regions.points import Points
from app.analyses.linear_regions.rules import relu_crossings, rule_for
from app.layers import AffineLayer, Flatten, ReLU, Reshape
from app.network import Network

MAX_BLOCK = 1 << 23  # new points x layer outputs per block of the column sums (64 MiB float64)
WIDE_ROWS = 256  # from this row width on, cumulative sums run row by row
MIN_MACS = 32_768  # per point; below, a full layer evaluation costs less than the bookkeeping
MAX_TABLE = 1 << 22  # entries of a layer's remembered column table (index + value: 64 MiB)

# remembered per network / per layer; both are treated as immutable once loaded
_CHAINS: weakref.WeakKeyDictionary[Network, dict[int, list[int]]] = weakref.WeakKeyDictionary()
_TABLES: weakref.WeakKeyDictionary[AffineLayer, tuple[np.ndarray, np.ndarray]] = \
    weakref.WeakKeyDictionary()


def fusable_chains(net: Network) -> dict[int, list[int]]:
    """``fusable_chain`` of every ReLU node that has one, remembered per network (a line walk
    asks for them on every call; tiny nets would feel the cost)."""
    if net not in _CHAINS:
        consumers = net.consumers
        _CHAINS[net] = {i: chain for i in net.relu_indices
                        if (chain := fusable_chain(net, i, consumers)) is not None}
    return _CHAINS[net]


def fusable_chain(net: Network, i: int, consumers: dict[int, list[int]]) -> list[int] | None:
    """The nodes after ReLU node ``i`` that its crossings can skip: reshapes, then one affine
    layer with gathered columns, each the only reader of the one before (None: no such chain,
    or its layer is so small that evaluating it at every new point is cheaper).
    """
    if not isinstance(net.layers[i], ReLU) or len(consumers.get(net.inputs[i][0], ())) != 1:
        return None
    chain, node = [], i
    while len(consumers.get(node, ())) == 1:
        node = consumers[node][0]
        layer = net.layers[node]
        if net.inputs[node] != (chain[-1] if chain else i,) or not isinstance(layer, AffineLayer):
            return None
        chain.append(node)
        if not isinstance(layer, Flatten | Reshape):
            return chain if _macs_per_point(layer, net.in_shape(node)) >= MIN_MACS else None
    return None


def column_entries(layer: AffineLayer, in_shape: tuple[int, ...], units: np.ndarray,
                   dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """``layer.column_entries`` of ``units`` as fresh numpy arrays (callers change them) in
    ``dtype``, gathered from a table of every column remembered per layer (a line walk needs a
    few hundred columns per call, and building them costs a dozen small torch calls)."""
    table = _TABLES.get(layer)
    if table is None:
        big = _macs_per_point(layer, in_shape) > MAX_TABLE
        with torch.no_grad():
            index, value = layer.column_entries(
                torch.from_numpy(units) if big else torch.arange(int(np.prod(in_shape))), in_shape)
        if big:  # copies: a layer may hand out views (an expanded index)
            return np.array(index.numpy()), value.numpy().astype(dtype)
        table = _TABLES[layer] = (index.numpy(), value.numpy())
    return table[0][units], table[1][units].astype(dtype, copy=False)


def column_size(layer: AffineLayer, in_shape: tuple[int, ...]) -> int:
    """How many entries ``layer.column_entries`` lists per column."""
    with torch.no_grad():
        index, _ = layer.column_entries(torch.zeros(1, dtype=torch.long), in_shape)
    return index.shape[1]


def _macs_per_point(layer: AffineLayer, in_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one evaluation (entries of all columns): a table's size too."""
    return column_size(layer, in_shape) * int(np.prod(in_shape))


def cut_and_push(pts: Points, net: Network, i: int, chain: list[int]) -> None:
    """Cut the points' segments at ReLU node ``i``'s zero crossings, record its codes, and give
    the points the values of the chain's last node (``fusable_chain``), without computing the
    ReLU's or the reshapes' values at the new points."""
    pre_node, last = net.inputs[i][0], chain[-1]
    pre = pts.values.pop(pre_node)
    flat = pre.reshape(len(pre), -1)
    y_old = np.maximum(pre, 0)
    for node in chain:
        y_old = rule_for(net.layers[node]).line_forward(net.layers[node], [y_old])
    seg, ratio, unit = relu_crossings(flat, pts.valid)
    first_code = (flat[:-1] + flat[1:]) > 0
    if not len(seg):
        pts.codes.append(first_code)
        pts.code_nodes.append(i)
        pts.values[last] = y_old
        return
    seg, ratio, order, keep, inside = pts.place(seg, ratio)
    unit = unit[order]
    kept = np.cumsum(keep) - 1  # the last kept new point at or before each cut
    seg_first = group_starts(seg)
    # a crossing too close to its segment's end stays in the last sub-segment; one before the
    # segment's first new point is in the first sub-segment's code already
    flips = inside & (kept >= kept[seg_first] + 1 - keep[seg_first])
    k_seg, k_ratio = seg[keep], ratio[keep]
    f_point, f_unit = kept[flips], unit[flips]
    f_weight = np.abs(flat[seg[flips] + 1, f_unit] - flat[seg[flips], f_unit])

    # the code of each cut segment's first sub-segment, at that sub-segment's middle
    cut_segs, first_kept = np.unique(k_seg, return_index=True)
    r1 = k_ratio[first_kept][:, None]
    first_code[cut_segs] = torch.lerp(torch.from_numpy(flat[cut_segs]),
                                      torch.from_numpy(flat[cut_segs + 1]),
                                      torch.from_numpy((r1 / 2).astype(flat.dtype))).numpy() > 0
    y_new = _values_at_new_points(net.layers[last], net.in_shape(last), y_old, k_seg, k_ratio,
                                  f_point, f_unit, f_weight)
    reps, new_pos = pts.spread(k_seg, k_ratio)
    pts.codes.append(_flipped_codes(first_code, reps[:-1], new_pos, f_point, f_unit))
    pts.code_nodes.append(i)
    out = np.repeat(y_old, reps, 0)
    out[new_pos] = y_new
    pts.values[last] = out


def cumsum_rows(x: np.ndarray, first: np.ndarray, reverse: bool = False) -> None:
    """In place: each row of ``x`` ``[R, n]`` plus the rows before it (after it, ``reverse``)
    in its segment; segments start at rows where ``first``.

    Wide rows are added one after the other: fewer, longer operations than a cumulative sum
    down each column. Narrow ones go down all columns at once (``cumsum_down``)."""
    if reverse:
        x, first = x[::-1], np.append(first[1:], True)[::-1]
    if x.shape[1] >= WIDE_ROWS:
        for i in np.flatnonzero(~first):
            np.add(x[i - 1], x[i], out=x[i])
        return
    starts = np.flatnonzero(first)
    total = cumsum_down(x)
    offsets = total[starts - 1]
    offsets[starts == 0] = 0
    x[:] = total - np.repeat(offsets, np.diff(np.append(starts, len(x))), 0)


def cumsum_down(x: np.ndarray) -> np.ndarray:
    """``np.cumsum(x, axis=0)`` by torch, which runs down all columns of a 2-D array at once
    (numpy walks each column separately, about four times slower)."""
    return torch.cumsum(torch.from_numpy(np.ascontiguousarray(x)), 0).numpy()


def _values_at_new_points(layer: AffineLayer, in_shape: tuple[int, ...], y_old: np.ndarray,
                          k_seg: np.ndarray, k_ratio: np.ndarray, f_point: np.ndarray,
                          f_unit: np.ndarray, f_weight: np.ndarray) -> np.ndarray:
    """The layer's values at the kept new points, in blocks of whole segments."""
    width = int(np.prod(y_old.shape[1:]))
    y_flat = y_old.reshape(len(y_old), width)
    out = np.empty((len(k_seg), width), dtype=y_old.dtype)
    bounds = np.append(run_starts(k_seg), len(k_seg))  # segment starts, then the end
    step = max(1, MAX_BLOCK // max(width, 1))
    lo = 0
    while lo < len(k_seg):
        hi = bounds[np.searchsorted(bounds, lo + step, side="right") - 1]
        hi = hi if hi > lo else bounds[np.searchsorted(bounds, lo, side="right")]
        fl, fh = np.searchsorted(f_point, [lo, hi])
        index, value = column_entries(layer, in_shape, f_unit[fl:fh], y_old.dtype)
        value *= f_weight[fl:fh, None]
        index += (f_point[fl:fh, None] - lo) * width
        h = torch.zeros((hi - lo) * width, dtype=torch.from_numpy(value).dtype).index_add_(
            0, torch.from_numpy(index.reshape(-1)), torch.from_numpy(value.reshape(-1)))
        out[lo:hi] = _block(y_flat, h.numpy().reshape(hi - lo, width), k_seg[lo:hi],
                            k_ratio[lo:hi])
        lo = hi
    return out.reshape(len(k_seg), *y_old.shape[1:])


def _block(y_flat: np.ndarray, h: np.ndarray, seg: np.ndarray,
           ratio: np.ndarray) -> np.ndarray:
    """``y(r_m)`` for new points sorted by (segment, ratio) from the columns switched at each
    point, ``h`` (overwritten). With ``R_m = sum_{j >= m} (r_{j+1} - r_j) h_j`` the module
    docstring's formula reads ``y(r_m) = yb - (1 - r_m) g_0 - R_m`` and ``g_0 = yb - ya - R_1``:
    two cumulative sums, then an outer product added in place (torch's ``addr_``; numpy's
    broadcast product is several times slower)."""
    first = np.ones(len(seg), dtype=bool)
    first[1:] = seg[1:] != seg[:-1]
    cumsum_rows(h, first)  # h_m: the columns switched up to point m
    r_next = np.ones_like(ratio)
    r_next[:-1] = np.where(first[1:], 1.0, ratio[1:])
    torch.from_numpy(h).mul_(torch.from_numpy((r_next - ratio).astype(h.dtype))[:, None])
    cumsum_rows(h, first, reverse=True)  # R_m
    starts = np.flatnonzero(first)
    ya, yb = y_flat[seg[starts]], y_flat[seg[starts] + 1]
    g0 = torch.from_numpy(yb - ya - h[starts])
    out = torch.from_numpy(h).neg_()
    rest = torch.from_numpy((1 - ratio).astype(h.dtype))
    if len(starts) == 1:
        out.add_(torch.from_numpy(yb[0])).addr_(rest, g0[0], alpha=-1)
    else:
        counts = torch.from_numpy(np.diff(np.append(starts, len(seg))))
        out.add_(torch.from_numpy(y_flat[seg + 1])).sub_(
            rest[:, None] * g0.repeat_interleave(counts, 0))
    return h


def _flipped_codes(first_code: np.ndarray, reps: np.ndarray, new_pos: np.ndarray,
                   f_point: np.ndarray, f_unit: np.ndarray) -> np.ndarray:
    """On/off codes of the new sub-segments: each old segment's first code, with every unit
    that crossed zero flipped from its crossing's sub-segment to the end of the segment.
    The flips are accumulated on packed bits (one bit per unit, 64 per word)."""
    n_units = first_code.shape[1]
    words = -(-n_units // 64)
    packed = np.zeros((len(first_code), words * 8), dtype=np.uint8)
    packed[:, :-(-n_units // 8)] = packed_bits(first_code)
    codes = np.repeat(packed, reps, 0)
    flips = np.zeros_like(codes)
    np.bitwise_xor.at(flips, (new_pos[f_point], f_unit // 8),
                      (128 >> (f_unit % 8)).astype(np.uint8))
    flip_words = flips.view(np.uint64)
    parity = np.bitwise_xor.accumulate(flip_words, 0)
    starts = np.cumsum(reps) - reps  # each old segment's first sub-segment
    before = np.zeros((len(starts), parity.shape[1]), dtype=parity.dtype)
    before[1:] = parity[starts[1:] - 1]
    parity ^= np.repeat(before, reps, 0)
    codes.view(np.uint64)[:] ^= parity
    return np.unpackbits(codes, axis=1, count=n_units).astype(bool)
