"""Activation codes as packed byte rows, and region ids numbered by first appearance.

Lines and planes carry one code array per bending node (ReLU bits, MaxPool arg-max).
Packing them once into ``[n, W]`` byte rows (padded to whole 64-bit words) makes the
neighbour comparisons and the id sort a few operations on narrow arrays.
"""

from __future__ import annotations

import numpy as np

_MIX = np.random.default_rng(0x5EED).integers(1, 2**63, 64, dtype=np.uint64) | np.uint64(1)


def pack_codes(codes: list[np.ndarray], n: int) -> np.ndarray:
    """The ``n`` rows of all ``codes`` (each ``[n, ...]``) side by side as bytes, zero-padded
    to a multiple of 8 bytes per row; bool codes take one bit per unit."""
    parts = [np.packbits(c.reshape(n, -1), axis=1) if c.dtype == bool
             else np.ascontiguousarray(c.reshape(n, -1)).view(np.uint8) for c in codes]
    width = sum(part.shape[1] for part in parts)
    rows = np.zeros((n, -(-width // 8) * 8), dtype=np.uint8)
    col = 0
    for part in parts:
        rows[:, col:col + part.shape[1]] = part
        col += part.shape[1]
    return rows


def _sorted_runs(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stable order that makes equal rows of ``words`` ``[n, w]`` adjacent, and which sorted
    positions start a new run of equal rows.

    Rows are sorted by a 64-bit mix of their words (one argsort instead of a ``w``-key
    lexsort); every run of equal mixes is then checked to hold equal rows, and on a
    collision the rows are lexsorted instead, so the result is always exact."""
    n, w = words.shape
    if w <= len(_MIX):
        mix = (words * _MIX[:w]).sum(1, dtype=np.uint64)
        order = np.argsort(mix, kind="stable")
        ordered = words[order]
        same = mix[order][1:] == mix[order][:-1]
        if (ordered[1:][same] == ordered[:-1][same]).all():
            return order, np.concatenate([[True], ~same])
    order = np.lexsort(words.T[::-1])
    ordered = words[order]
    return order, np.concatenate([[True], (ordered[1:] != ordered[:-1]).any(1)])


def first_appearance_ids(rows: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Integer ids of the packed code ``rows`` ``[n, W]`` (from ``pack_codes``), numbered in
    order of first appearance; with sorted ``groups`` ``[n]``, numbered from 0 within each
    group."""
    n = len(rows)
    if n == 0 or rows.shape[1] == 0:
        return np.zeros(n, dtype=np.int64)
    words = rows.view(np.uint64)
    if groups is not None:
        words = np.concatenate([groups.astype(np.uint64).reshape(n, 1), words], 1)
    order, new = _sorted_runs(words)
    is_first = np.zeros(n, dtype=bool)
    is_first[order[new]] = True  # stable sort: a run's first row is its first appearance
    rank = np.cumsum(is_first) - 1
    ids = np.empty(n, dtype=np.int64)
    ids[order] = rank[order[new]][np.cumsum(new) - 1]
    if groups is None:
        return ids
    return ids - ids[np.searchsorted(groups, groups)]
