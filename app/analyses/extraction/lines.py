"""Critical points: where a line through input space crosses a neuron's boundary.

Along a line ``x(t) = a + t * dir`` a ReLU network is piecewise linear in ``t``. A segment
``[l, r]`` holds exactly one kink when the line through ``l`` with the slope just right of
``l`` and the line through ``r`` with the slope just left of ``r`` meet at a point where the
network agrees with both (Carlini, Jagielski & Mironov 2020). Segments that fail the test are
bisected. At each kink the Jacobians on both sides (forward differences inside the neighbouring
linear pieces) differ by a rank-one matrix ``c u^T``: ``u`` is the boundary's normal there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.analyses.extraction.oracle import Oracle

SLOPE_STEP = 1e-6  # one-sided slope probes at this fraction of the segment length
LINEAR_RTOL = 1e-8  # deviation (relative to the outputs' scale) still counted as linear
RANK_ONE_RTOL = 1e-5  # second singular value of a Jacobian jump, relative to the first


@dataclass
class Kink:
    """One critical point on a line, with probe points inside the two linear pieces around it."""

    x: np.ndarray
    direction: np.ndarray
    x_minus: np.ndarray
    x_plus: np.ndarray
    f_minus: np.ndarray
    f_plus: np.ndarray
    gap: float
    slope_jump: np.ndarray


@dataclass
class Hyperplane:
    """``normal . x + offset = 0`` with a unit normal: one neuron's boundary (locally)."""

    normal: np.ndarray
    offset: float
    points: list[np.ndarray] = field(default_factory=list)
    jump: np.ndarray | None = None  # Jacobian jump [k, d] across it at ``points[0]``
    slope_jump: np.ndarray | None = None  # [k] jump of the slope along the line found on
    gap: float = 0.0  # distance of the probes that measured ``normal`` from ``points[0]``

    def value(self, x: np.ndarray) -> np.ndarray:
        return x @ self.normal + self.offset


def kinks_on_line(f: Oracle, a: np.ndarray, b: np.ndarray, n_init: int = 32,
                  max_queries: int | None = None, atol: float = 0.0) -> list[Kink]:
    """Every kink of ``f`` on the segment ``a -> b`` that bisection and the two-line test find.

    With ``max_queries`` the line is given up (no kinks) once it has cost that many; ``atol``
    is a floor on the linearity tolerance (where the outputs on the line are all near zero).
    """
    length = float(np.linalg.norm(b - a))
    if not np.isfinite(length) or length == 0:
        return []
    direction = (b - a) / length

    def at(ts: np.ndarray) -> np.ndarray:
        return a + np.outer(ts, direction)

    ts = np.linspace(0.0, length, n_init + 1)
    values = f(at(ts))
    tol = max(LINEAR_RTOL * (np.abs(values).max() + 1e-300), atol)
    spent = len(ts)
    segments = [(ts[i], ts[i + 1], values[i], values[i + 1]) for i in range(n_init)]
    found: list[tuple[tuple, float]] = []
    while segments:
        spent += 2 * len(segments)
        if max_queries is not None and spent > max_queries:
            return []
        eps = np.array([SLOPE_STEP * (r - lo) for lo, r, _, _ in segments])
        lo_t = np.array([s[0] for s in segments])
        hi_t = np.array([s[1] for s in segments])
        probes = f(at(np.concatenate([lo_t + eps, hi_t - eps])))
        n = len(segments)
        candidates, split = [], []
        for i, seg in enumerate(segments):
            lo, r, f_lo, f_r = seg
            s_l = (probes[i] - f_lo) / eps[i]
            s_r = (f_r - probes[n + i]) / eps[i]
            if np.abs(f_lo + s_l * (r - lo) - f_r).max() <= tol:
                continue  # one line from end to end: no kink (up to cancellation)
            t_star = _intersection(lo, f_lo, s_l, r, f_r, s_r)
            if lo + eps[i] < t_star < r - eps[i]:
                candidates.append((seg, t_star, s_l, s_r))
            elif r - lo > 1e-12 * length:
                split.append(seg)
        if candidates:
            spent += len(candidates)
            at_star = f(at(np.array([c[1] for c in candidates])))
            for (seg, t_star, s_l, s_r), f_star in zip(candidates, at_star, strict=True):
                lo, r, f_lo, f_r = seg
                left_ok = np.abs(f_lo + s_l * (t_star - lo) - f_star).max() <= tol
                right_ok = np.abs(f_r + s_r * (t_star - r) - f_star).max() <= tol
                if left_ok and right_ok:
                    found.append((seg, t_star))
                elif r - lo > 1e-12 * length:
                    split.append(seg)
        segments = []
        if split:
            spent += len(split)
            mids = np.array([(s[0] + s[1]) / 2 for s in split])
            f_mid = f(at(mids))
            for (lo, r, f_lo, f_r), m, fm in zip(split, mids, f_mid, strict=True):
                segments += [(lo, m, f_lo, fm), (m, r, fm, f_r)]
    return _refine(f, at, direction, found)


def _intersection(lo: float, f_lo: np.ndarray, s_l: np.ndarray, r: float, f_r: np.ndarray,
                  s_r: np.ndarray) -> float:
    """Where the line from ``lo`` (slope ``s_l``) meets the line from ``r`` (slope ``s_r``)."""
    ds = s_l - s_r
    i = int(np.argmax(np.abs(ds)))
    if ds[i] == 0:
        return float("nan")
    return float((f_r[i] - f_lo[i] + s_l[i] * lo - s_r[i] * r) / ds[i])


def _refine(f: Oracle, at, direction: np.ndarray, found: list) -> list[Kink]:
    """Re-intersect with long baselines (both linear pieces) for full float64 precision."""
    if not found:
        return []
    gaps = np.array([min(t - s[0], s[1] - t) / 2 for s, t in found])
    t_stars = np.array([t for _, t in found])
    sides = f(at(np.concatenate([t_stars - gaps, t_stars + gaps])))
    n = len(found)
    kinks = []
    for i, ((lo, r, f_lo, f_r), t_star) in enumerate(found):
        t_m, t_p = t_star - gaps[i], t_star + gaps[i]
        s_l = (sides[i] - f_lo) / (t_m - lo)
        s_r = (f_r - sides[n + i]) / (r - t_p)
        t_fine = _intersection(lo, f_lo, s_l, r, f_r, s_r)
        if not t_m < t_fine < t_p:
            t_fine = t_star
        kinks.append(Kink(
            x=at(np.array([t_fine]))[0], direction=direction,
            x_minus=at(np.array([t_m]))[0], x_plus=at(np.array([t_p]))[0],
            f_minus=sides[i], f_plus=sides[n + i], gap=float(gaps[i]), slope_jump=s_r - s_l,
        ))
    return kinks


def jacobians(f: Oracle, points: np.ndarray, values: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Forward-difference Jacobians ``[m, k, d]`` at ``points`` (exact inside a linear piece)."""
    m, d = points.shape
    shifted = points[:, None, :] + steps[:, None, None] * np.eye(d)[None]
    out = f(shifted.reshape(m * d, d)).reshape(m, d, -1)
    return np.transpose((out - values[:, None, :]) / steps[:, None, None], (0, 2, 1))


def boundary_normals(f: Oracle, kinks: list[Kink]) -> list[Hyperplane | None]:
    """The local boundary hyperplane at each kink, ``None`` where the jump is not rank one.

    Costs ``2 d`` queries per kink. The finite-difference step is a thousandth of the distance
    to the kink along the line, so the probes stay inside the two linear pieces.
    """
    if not kinks:
        return []
    points = np.stack([k.x_minus for k in kinks] + [k.x_plus for k in kinks])
    values = np.stack([k.f_minus for k in kinks] + [k.f_plus for k in kinks])
    steps = np.array([1e-3 * k.gap for k in kinks] * 2)
    jac = jacobians(f, points, values, steps)
    n = len(kinks)
    planes: list[Hyperplane | None] = []
    for i, kink in enumerate(kinks):
        jump = jac[n + i] - jac[i]
        _, sv, vt = np.linalg.svd(jump, full_matrices=False)
        along = jump @ kink.direction
        scale = np.abs(kink.slope_jump).max()
        consistent = np.abs(along - kink.slope_jump).max() <= 1e-4 * scale
        rank_one = len(sv) < 2 or sv[1] <= RANK_ONE_RTOL * sv[0]
        if not (consistent and rank_one and sv[0] > 0):
            planes.append(None)
            continue
        normal = vt[0] * np.sign(vt[0][np.argmax(np.abs(vt[0]))])
        planes.append(Hyperplane(normal, float(-normal @ kink.x), [kink.x], jump,
                                 kink.slope_jump, kink.gap))
    return planes
