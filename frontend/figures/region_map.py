"""Geometry for drawing an exact plane partition as a map: which polygon holds a point, a
raster of region ids, neighbour colouring and the edges where the predicted class changes.

Drawing 1,700 filled polygons as plotly traces takes the browser most of a minute; one
heatmap plus two line traces draws in well under a second, and the heatmap's hover can say
which region and class a point lies in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EDGE_PROBES = 8  # points per polygon edge that look across it for the neighbour's class


def locate(polygons: list[np.ndarray], points: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Index of a convex, counter-clockwise polygon holding each point ``[N, 2]`` (-1: none).

    Exact up to ``tol`` (relative to the polygon's size): a point on an edge shared by two
    polygons goes to the later one. Only points inside a polygon's bounding box are tested,
    found by binary search on the points sorted by x.
    """
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    owner = np.full(len(points), -1, dtype=np.int64)
    order = np.argsort(points[:, 0], kind="stable")
    xs = points[order, 0]
    for k, poly in enumerate(polygons):
        lo, hi = poly.min(0), poly.max(0)
        span = float(max(hi - lo)) or 1.0
        eps = tol * span
        start, stop = np.searchsorted(xs, [lo[0] - eps, hi[0] + eps], side="left")
        idx = order[start:stop]
        if idx.size == 0:
            continue
        p = points[idx]
        idx = idx[(p[:, 1] >= lo[1] - eps) & (p[:, 1] <= hi[1] + eps)]
        if idx.size == 0:
            continue
        edge = np.roll(poly, -1, axis=0) - poly  # [V, 2]
        rel = points[idx][:, None, :] - poly[None]  # [n, V, 2]
        cross = edge[None, :, 0] * rel[..., 1] - edge[None, :, 1] * rel[..., 0]
        length = np.linalg.norm(edge, axis=1)
        inside = (cross >= -eps * np.maximum(length, 1e-300)[None]).all(1)
        owner[idx[inside]] = k
    return owner


@dataclass(frozen=True)
class Raster:
    """Polygon index per pixel centre (-1 outside the shape); row 0 is the smallest b."""

    a: np.ndarray  # [W] pixel centres along a
    b: np.ndarray  # [H] pixel centres along b
    owner: np.ndarray  # [H, W]


def raster(polygons: list[np.ndarray], size: int = 240) -> Raster:
    """The polygon under each pixel centre of a ``size`` x ``size`` grid over their bounds."""
    pts = np.concatenate(polygons)
    lo, hi = pts.min(0), pts.max(0)
    a = lo[0] + (np.arange(size) + 0.5) * (hi[0] - lo[0]) / size
    b = lo[1] + (np.arange(size) + 0.5) * (hi[1] - lo[1]) / size
    grid = np.stack(np.meshgrid(a, b), -1).reshape(-1, 2)
    return Raster(a, b, locate(polygons, grid).reshape(size, size))


def neighbours(polygons: list[np.ndarray], probes: int = EDGE_PROBES
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Short pieces of every polygon edge and the polygon just across each piece.

    Returns ``starts [P, 2]``, ``ends [P, 2]`` (each edge cut into ``probes`` pieces), the
    owning polygon ``[P]`` and the polygon across ``[P]`` (-1 on the shape's outline), found
    by :func:`locate` a tiny step outward from the piece's midpoint.
    """
    starts, ends, own = [], [], []
    frac = np.arange(probes + 1) / probes
    for k, poly in enumerate(polygons):
        nxt = np.roll(poly, -1, axis=0)
        keep = np.linalg.norm(nxt - poly, axis=1) > 0
        p, q = poly[keep], nxt[keep]
        cuts = p[:, None] + frac[None, :, None] * (q - p)[:, None]  # [E, probes + 1, 2]
        starts.append(cuts[:, :-1].reshape(-1, 2))
        ends.append(cuts[:, 1:].reshape(-1, 2))
        own.append(np.full(len(p) * probes, k))
    s, e, o = np.concatenate(starts), np.concatenate(ends), np.concatenate(own)
    d = e - s
    normal = np.stack([d[:, 1], -d[:, 0]], 1)  # outward for counter-clockwise polygons
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-300)
    scale = float(np.ptp(np.concatenate(polygons), axis=0).max()) or 1.0
    across = locate(polygons, 0.5 * (s + e) + 1e-7 * scale * normal)
    return s, e, o, across


def colour_regions(region_ids: np.ndarray, owner: np.ndarray, across: np.ndarray,
                   colours: int) -> np.ndarray:
    """A colour index per region id, differing between neighbouring regions where
    ``colours`` allow (greedy, in id order; planar maps rarely need more than six)."""
    n = int(region_ids.max()) + 1 if len(region_ids) else 0
    adjacent: list[set[int]] = [set() for _ in range(n)]
    valid = across >= 0
    for u, v in zip(region_ids[owner[valid]], region_ids[across[valid]], strict=True):
        if u != v:
            adjacent[u].add(int(v))
            adjacent[v].add(int(u))
    colour = np.full(n, -1, dtype=np.int64)
    for r in range(n):
        used = {int(colour[m]) for m in adjacent[r] if colour[m] >= 0}
        free = [c for c in range(colours) if c not in used]
        colour[r] = free[0] if free else r % colours
    return colour


def segments(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Line pieces as one trace's x and y (NaN, which plotly leaves as a gap, between)."""
    gap = np.full(len(starts), np.nan)
    return (np.stack([starts[:, 0], ends[:, 0], gap], 1).ravel(),
            np.stack([starts[:, 1], ends[:, 1], gap], 1).ravel())


def outlines(polygons: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every polygon's closed outline as one trace's x and y (NaN between polygons)."""
    rings = [np.concatenate([p, p[:1], [[np.nan, np.nan]]]) for p in polygons]
    joined = np.concatenate(rings) if rings else np.zeros((0, 2))
    return joined[:, 0], joined[:, 1]
