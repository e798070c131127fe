"""Activation codes as packed byte rows, and region ids numbered by first appearance.

Lines and planes carry one code array per bending node (ReLU bits, MaxPool arg-max).
Packing them once into ``[n, W]`` byte rows (padded to whole 64-bit words) makes the
neighbour comparisons and the id sort a few operations on narrow arrays. The rows are short
(a few words), so the word loops below run over columns: numpy reductions along a short last
axis cost several times more than one whole-column operation per word.
"""

from __future__ import annotations

import numpy as np

_MIX = np.random.default_rng(0x5EED).integers(1, 2**63, 64, dtype=np.uint64) | np.uint64(1)


def pack_codes(codes: list[np.ndarray], n: int) -> np.ndarray:
    """The ``n`` rows of all ``codes`` (each ``[n, ...]``) side by side as bytes, zero-padded
    to a multiple of 8 bytes per row; bool codes take one bit per unit."""
    parts = [packed_bits(c.reshape(n, -1)) if c.dtype == bool
             else np.ascontiguousarray(c.reshape(n, -1)).view(np.uint8) for c in codes]
    width = sum(part.shape[1] for part in parts)
    rows = np.zeros((n, -(-width // 8) * 8), dtype=np.uint8)
    col = 0
    for part in parts:
        rows[:, col:col + part.shape[1]] = part
        col += part.shape[1]
    return rows


def packed_bits(bits: np.ndarray) -> np.ndarray:
    """``np.packbits(bits, axis=1)``; whole-byte rows are packed as one flat stream (the same
    bytes, several times faster)."""
    n, m = bits.shape
    if m % 8 or not bits.flags.c_contiguous:
        return np.packbits(bits, axis=1)
    return np.packbits(bits.ravel()).reshape(n, m // 8)


def rows_differ(words: np.ndarray) -> np.ndarray:
    """``[n - 1]``: whether row ``i + 1`` of ``words`` ``[n, w]`` differs from row ``i``."""
    return _differ(list(words.T))


def _differ(cols: list[np.ndarray]) -> np.ndarray:
    out = np.zeros(max(len(cols[0]) - 1, 0), dtype=bool)
    for col in cols:
        out |= col[1:] != col[:-1]
    return out


def _sorted_runs(cols: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """An order that makes equal rows of the word columns ``cols`` (``w`` arrays ``[n]``)
    adjacent, and which sorted positions start a new run of equal rows.

    Rows are sorted by a 64-bit mix of their words (one argsort instead of a ``w``-key
    lexsort); the few pairs of neighbours with equal mixes are then checked to hold equal
    rows, and on a collision the rows are lexsorted instead, so the result is always exact."""
    if len(cols) <= len(_MIX):
        mix = cols[0] * _MIX[0]
        for k in range(1, len(cols)):
            mix += cols[k] * _MIX[k]
        order = np.argsort(mix)  # not stable (the faster sort): runs are ordered by the caller
        ordered = mix[order]
        same = ordered[1:] == ordered[:-1]
        at = np.flatnonzero(same)
        a, b = order[at], order[at + 1]
        if all((col[a] == col[b]).all() for col in cols):
            return order, np.concatenate([[True], ~same])
    order = np.lexsort(cols[::-1])
    return order, np.concatenate([[True], _differ([col[order] for col in cols])])


def first_appearance_ids(rows: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Integer ids of the packed code ``rows`` ``[n, W]`` (from ``pack_codes``), numbered in
    order of first appearance; with sorted ``groups`` ``[n]``, numbered from 0 within each
    group."""
    n = len(rows)
    if n == 0 or rows.shape[1] == 0:
        return np.zeros(n, dtype=np.int64)
    cols = list(rows.view(np.uint64).T)
    if groups is not None:
        cols.insert(0, groups.astype(np.uint64))
    order, new = _sorted_runs(cols)
    first = np.minimum.reduceat(order, np.flatnonzero(new))  # each run's first appearance
    is_first = np.zeros(n, dtype=bool)
    is_first[first] = True
    rank = np.cumsum(is_first) - 1
    ids = np.empty(n, dtype=np.int64)
    ids[order] = rank[first][np.cumsum(new) - 1]
    return ids if groups is None else ids - ids[group_starts(groups)]


def run_starts(groups: np.ndarray) -> np.ndarray:
    """The rows where a run of equal consecutive ``groups`` values begins."""
    return np.flatnonzero(np.concatenate([[True], groups[1:] != groups[:-1]]))


def group_starts(groups: np.ndarray) -> np.ndarray:
    """For each row, the index of the first row of its run of equal ``groups`` values."""
    starts = np.zeros(len(groups), dtype=np.int64)
    starts[1:] = np.where(groups[1:] != groups[:-1], np.arange(1, len(groups)), 0)
    return np.maximum.accumulate(starts)
