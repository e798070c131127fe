"""Following one second-layer neuron's boundary from cell to cell of the first layer.

A second-layer pre-activation ``u`` is affine inside each cell of the first layer's
arrangement, so its boundary ``u = 0`` is one plane per cell, and planes of neighbouring cells
meet on the first-layer plane between them (``u`` is continuous). From one critical point of
a neuron the boundary can be followed: a linear program finds where the plane of the current
cell meets first-layer plane ``i`` inside that cell (as far from the other planes as
possible), a step just across plane ``i`` lands in the neighbouring cell, and a short line
there, parallel to plane ``i``, crosses the continued boundary next to the common edge. A
kink found there belongs to the same neuron when its plane passes through that edge, its jump
points the same way in output space, and its gradient agrees with the old one along plane
``i`` (there the two differ only by a multiple of plane ``i``'s normal), which also fixes the
relative sign of the two equations.

This finds critical points of a neuron that random lines rarely cross (one active on a tiny
part of the box) and, outside the box where the oracle may be queried there, in cells where
first-layer units are in the state they never take on the neuron's boundary inside the box
(without such points those weights are not determined). Each cell visited gives two points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from app.analyses.extraction.lines import Hyperplane, boundary_normals, jacobians, kinks_on_line
from app.analyses.extraction.oracle import Oracle

SAME_OUTPUT_COS = 1 - 1e-6  # as in the grouping: one neuron's jumps share their output direction
EDGE_RTOL = 1e-5  # the new plane passes this close to the edge (times the cell's margin)
GRAD_RTOL = 1e-3  # the gradients of neighbouring cells agree along the plane between them
MIN_MARGIN = 1e-3  # an edge narrower than this (times the box size) is not followed
MAX_MARGIN = 0.1  # lines are at most this long (times the box size)
MIN_ANGLE = 0.05  # planes this close to parallel to the boundary are not crossed
WIDEN = (1.0, 10.0)  # the box may be left by this many box sizes on every side (where allowed)
SHARPEN_RTOL = 1e-3  # a jump re-measured farther out must agree with the first measurement
LINE_QUERIES = 2000  # a line costing more is given up (outputs near zero, rounding noise)


@dataclass
class Trace:
    """The planes found on one neuron's boundary and the sign of each one's equations."""

    planes: list[Hyperplane]
    signs: np.ndarray
    cells: int


def jump_vector(plane: Hyperplane) -> tuple[np.ndarray, np.ndarray]:
    """``(g, out)`` of a boundary piece, as :func:`.second_layer.critical_points` takes them."""
    out = plane.slope_jump / np.linalg.norm(plane.slope_jump)
    return plane.jump.T @ out, out


def equation_rank(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> int:
    """Rank of the second-layer equations of points ``x`` (unknowns ``a``, ``e``, ``c``)."""
    m, d = x.shape
    n = len(bias)
    z = x @ weight.T + bias
    on = (z > 0).astype(np.float64)
    mg = np.zeros((m, d, n + d + 1))
    mg[:, :, :n] = weight.T[None] * on[:, None, :]
    mg[:, :, n:n + d] = np.eye(d)[None]
    mz = np.hstack([np.maximum(z, 0.0), x, np.ones((m, 1))])
    mz /= np.linalg.norm(mz, axis=1, keepdims=True)
    rows = np.concatenate([mg, mz[:, None]], 1).reshape(-1, n + d + 1)
    sv = np.linalg.svd(rows, compute_uv=False)
    return int((sv > 1e-9 * sv[0]).sum())


def trace(oracle: Oracle, normals: np.ndarray, offsets: np.ndarray, start: Hyperplane,
          lo: np.ndarray, hi: np.ndarray, anywhere: bool, late: Callable[[], bool],
          max_cells: int, max_queries: int, known: np.ndarray | None = None) -> Trace:
    """Follow the boundary of ``start``'s neuron through up to ``max_cells`` cells.

    ``normals`` are the first layer's unit rows (any signs); ``known`` are points of the
    neuron found before (they count towards what is seen). Edges are taken best first: those
    into a cell where some unit takes a state not seen yet on the boundary, then those whose
    edge point lies nearest to the plane of such a unit (a greedy walk towards it). Stops once
    every unit has been seen in both states and the equations of the cells with two points
    (with ``known``) have full rank with some to spare; or when no edge is left, at
    ``max_cells``, after about ``max_queries`` oracle queries or when ``late()``.
    """
    n1, d = normals.shape
    scale = float(np.linalg.norm(hi - lo))
    tol = 1e-6 * scale
    bounds = [(lo, hi)]
    if anywhere:
        bounds += [(lo - w * (hi - lo), hi + w * (hi - lo)) for w in WIDEN]
    counted = _Counted(oracle)
    start = _sharpened(counted, normals, offsets, start)
    g0, out0 = jump_vector(start)
    x0 = start.points[0]
    atol = 1e-8 * float(np.abs(start.slope_jump).max()) * scale
    planes, signs = [start], [1.0]
    pattern0 = normals @ x0 + offsets > 0
    # a second point of the start's cell, on a line along its normal
    margin = np.abs(normals @ x0 + offsets).min()
    half = min(0.5 * margin, MAX_MARGIN * scale)
    unit = g0 / np.linalg.norm(g0)
    shift = _in_plane(unit, np.random.default_rng(0).normal(size=d))
    c = x0 + 0.5 * half * shift
    got = _kink_near(counted, normals, offsets, *_line(c, unit, half), out0, tol,
                     lambda p: abs(p.normal @ x0 + p.offset) <= EDGE_RTOL * half, atol)
    if got is not None:
        g, _ = jump_vector(got)
        planes.append(got)
        signs.append(1.0 if g @ g0 > 0 else -1.0)
    cells = [(x0, g0, pattern0)]
    twice = [x0] if got is not None else []
    known = np.zeros((0, d)) if known is None else known
    seen = np.zeros((n1, 2), dtype=bool)
    for pts in (known, x0[None]):
        on = pts @ normals.T + offsets > 0
        seen[:, 1] |= on.any(axis=0)
        seen[:, 0] |= (~on).any(axis=0)
    visited = {pattern0.tobytes()}
    edges: list[tuple[int, int, np.ndarray, float]] = []  # cell, unit, edge point, margin

    def push_edges(k: int) -> None:
        x, g, pattern = cells[k]
        for i in range(n1):
            flipped = pattern.copy()
            flipped[i] = ~flipped[i]
            if flipped.tobytes() in visited:
                continue
            edge = _edge_in(normals, offsets, g, x, pattern, i, bounds, scale)
            if edge is not None:
                edges.append((k, i, *edge))
    push_edges(0)
    while edges and len(cells) < max_cells and not late() and counted.used < max_queries:
        if _done(np.vstack([known, *twice]) if twice else known, seen, normals, offsets):
            break
        # re-score every edge: the wanted states change as cells are added
        wanted = ~seen
        scores = [_score(normals, offsets, cells[k][2], i, q, wanted) for k, i, q, _ in edges]
        k, i, q, margin = edges.pop(int(np.argmin(scores)))
        x, g, pattern = cells[k]
        flipped = pattern.copy()
        flipped[i] = ~flipped[i]
        if flipped.tobytes() in visited:
            continue
        got = _cross(counted, normals, offsets, g, pattern, i, q, margin, out0, tol, atol)
        if got is None:
            continue
        visited.add(flipped.tobytes())
        new_planes, new_signs = got
        planes += new_planes
        signs += new_signs
        cells.append((new_planes[0].points[0], new_signs[0] * jump_vector(new_planes[0])[0],
                      flipped))
        if len(new_planes) == 2:
            twice.append(new_planes[0].points[0][None])
        seen[i, int(flipped[i])] = True
        push_edges(len(cells) - 1)
    return Trace(planes, np.array(signs), len(cells))


class _Counted:
    """The oracle, counting the rows it answers."""

    def __init__(self, oracle: Oracle) -> None:
        self.oracle, self.used = oracle, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.used += len(np.atleast_2d(x))
        return self.oracle(x)


def _score(normals: np.ndarray, offsets: np.ndarray, pattern: np.ndarray, i: int,
           q: np.ndarray, wanted: np.ndarray) -> float:
    """Lower is taken first: 0 for an edge into a state not seen yet, else one plus the
    distance of its point to the nearest plane of a unit with a state not seen yet."""
    if wanted[i, int(not pattern[i])]:
        return 0.0
    units = np.flatnonzero(wanted.any(axis=1))
    if not len(units):
        return 1.0
    return float(1.0 + np.abs(normals[units] @ q + offsets[units]).min())


def _done(points: np.ndarray, seen: np.ndarray, normals: np.ndarray,
          offsets: np.ndarray) -> bool:
    if not seen.all():
        return False
    n1, d = normals.shape
    unknowns = n1 + d + 1
    if len(points) * (d + 1) < unknowns + 2 * (d + 1):
        return False
    return equation_rank(points, normals, offsets) >= unknowns


def _line(centre: np.ndarray, direction: np.ndarray, half: float) -> tuple[np.ndarray, ...]:
    """Ends of a line of length ``2 half`` about ``centre``, off-centre so that a kink at the
    centre does not fall on the line's first grid of points (where no segment shows it)."""
    return centre - 0.93 * half * direction, centre + 1.07 * half * direction


def _in_plane(unit: np.ndarray, v: np.ndarray) -> np.ndarray:
    v = v - (v @ unit) * unit
    return v / (np.linalg.norm(v) + 1e-300)


def _edge(normals: np.ndarray, offsets: np.ndarray, unit: np.ndarray, x: np.ndarray,
          pattern: np.ndarray, i: int, lo: np.ndarray, hi: np.ndarray,
          cap: float) -> tuple[np.ndarray, float] | None:
    """The point of the cell's boundary plane on plane ``i``, farthest from the others."""
    n1, d = normals.shape
    others = np.delete(np.arange(n1), i)
    side = np.where(pattern[others], 1.0, -1.0)
    a_ub = np.hstack([-side[:, None] * normals[others], np.ones((len(others), 1))])
    b_ub = side * offsets[others]
    a_eq = np.vstack([np.r_[normals[i], 0.0], np.r_[unit, 0.0]])
    b_eq = [-offsets[i], unit @ x]
    res = linprog(np.r_[np.zeros(d), -1.0], A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq,
                  bounds=[*zip(lo, hi, strict=True), (0, cap)], method="highs")
    if res.status != 0:
        return None
    return res.x[:d], float(res.x[-1])


def _edge_in(normals: np.ndarray, offsets: np.ndarray, g: np.ndarray, x: np.ndarray,
             pattern: np.ndarray, i: int, bounds: list, scale: float
             ) -> tuple[np.ndarray, float] | None:
    """The edge point towards plane ``i`` in the first of ``bounds`` that has a wide one."""
    unit = g / np.linalg.norm(g)
    if _in_plane(unit, normals[i]) @ normals[i] < MIN_ANGLE:
        return None  # the boundary runs nearly parallel to plane i
    for lo, hi in bounds:
        edge = _edge(normals, offsets, unit, x, pattern, i, lo, hi, MAX_MARGIN * scale)
        if edge is not None and edge[1] >= MIN_MARGIN * scale:
            return edge
    return None


def _cross(oracle: Oracle, normals: np.ndarray, offsets: np.ndarray, g: np.ndarray,
           pattern: np.ndarray, i: int, q: np.ndarray, margin: float, out0: np.ndarray,
           tol: float, atol: float) -> tuple[list[Hyperplane], list[float]] | None:
    """The boundary's plane in the cell across plane ``i`` from the edge point ``q`` (at least
    ``margin`` from every other plane): one or two pieces and their signs."""
    unit = g / np.linalg.norm(g)
    across = _in_plane(unit, normals[i])
    step = across * (-1.0 if pattern[i] else 1.0)  # moves z_i to the other side
    line = _in_plane(normals[i], unit)  # parallel to plane i, as close to the normal as can be
    half = margin / 2
    proj = np.eye(len(q)) - np.outer(normals[i], normals[i])
    target = proj @ g

    def same(plane: Hyperplane) -> bool:
        return abs(plane.normal @ q + plane.offset) <= EDGE_RTOL * margin

    out: list[Hyperplane] = []
    signs: list[float] = []
    for eps in (margin / 8, margin / 80, margin / 800):
        got = _kink_near(oracle, normals, offsets, *_line(q + eps * step, line, half), out0,
                         tol, same, atol)
        if got is None:
            continue
        sign = _sign(jump_vector(got)[0], proj, target)
        if sign is None:
            continue
        out, signs = [got], [sign]
        second = _kink_near(oracle, normals, offsets, *_line(q + 2 * eps * step, line, half),
                            out0, tol, same, atol)
        if second is not None and (s2 := _sign(jump_vector(second)[0], proj, target)):
            out.append(second)
            signs.append(s2)
        break
    return (out, signs) if out else None


def _sign(g: np.ndarray, proj: np.ndarray, target: np.ndarray) -> float | None:
    """+1 / -1 when ``g`` (or ``-g``) agrees with ``target`` along the plane, else ``None``."""
    p = proj @ g
    sign = 1.0 if p @ target >= 0 else -1.0
    if np.linalg.norm(sign * p - target) > GRAD_RTOL * np.linalg.norm(target):
        return None
    return sign


def _kink_near(oracle: Oracle, normals: np.ndarray, offsets: np.ndarray, a: np.ndarray,
               b: np.ndarray, out0: np.ndarray, tol: float,
               accept: Callable[[Hyperplane], bool], atol: float) -> Hyperplane | None:
    """The first kink on ``a -> b`` off the first-layer planes that ``accept`` takes."""
    kinks = [k for k in kinks_on_line(oracle, a, b, max_queries=LINE_QUERIES, atol=atol)
             if np.abs(normals @ k.x + offsets).min() > tol]
    for plane in boundary_normals(oracle, kinks):
        if plane is None or plane.slope_jump is None:
            continue
        out = plane.slope_jump / np.linalg.norm(plane.slope_jump)
        if out @ out0 >= SAME_OUTPUT_COS and accept(plane):
            return _sharpened(oracle, normals, offsets, plane)
    return None


def _sharpened(oracle: Oracle, normals: np.ndarray, offsets: np.ndarray,
               plane: Hyperplane) -> Hyperplane:
    """``plane`` with its Jacobian jump re-measured farther out (as :mod:`.refine` does for
    first-layer planes): probes a third of the way to the nearest first-layer plane, steps
    half as long. Kept only where it agrees with the first measurement (no other boundary
    of a deeper neuron came between), which it then replaces; a jump on a line is measured
    with steps a thousandth of the distance to the next probe, and one of a neuron with small
    outgoing weights loses digits to rounding there."""
    x = plane.points[0]
    reach = np.abs(normals @ x + offsets).min() / 3
    if reach <= 2 * plane.gap:
        return plane
    n = plane.normal
    sides = np.stack([x - reach * n, x + reach * n])
    values = oracle(sides)
    jac = jacobians(oracle, sides, values, np.full(2, reach / 2))
    jump = jac[1] - jac[0]
    if np.linalg.norm(jump - plane.jump) > SHARPEN_RTOL * np.linalg.norm(plane.jump):
        return plane
    _, sv, vt = np.linalg.svd(jump, full_matrices=False)
    normal = vt[0] * np.sign(vt[0] @ n)
    return Hyperplane(normal, float(-normal @ x), [x], jump, plane.slope_jump, reach)
