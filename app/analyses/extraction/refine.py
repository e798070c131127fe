"""Precision refinement of first-layer hyperplanes once the whole layer is known.

Finite differences are exact inside a linear piece up to rounding, which shrinks with the
step: the farther a probe may stand from every other boundary, the more digits a normal keeps
(Carlini, Jagielski & Mironov 2020 refine each critical point this way). For each plane a
linear program finds the point of the plane, inside the box, farthest from all the other
planes (the centre of its cell); there the Jacobians on both sides are re-measured with steps
a quarter of that distance, and the kink is re-located along the normal by intersecting the two
linear pieces, which fixes the offset to full precision too.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

from app.analyses.extraction.lines import RANK_ONE_RTOL, jacobians
from app.analyses.extraction.oracle import Oracle

DELTA = 0.4  # probes stand this fraction of the free radius off the plane
STEP = 0.25  # and take finite-difference steps of this fraction of it
ALIGN = 1 - 1e-4  # a re-measured normal must point the old one's way


def cell_centre(normals: np.ndarray, offsets: np.ndarray, j: int, ref: np.ndarray,
                lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, float]:
    """The point of plane ``j`` in the box, in ``ref``'s cell, farthest from the other planes.

    Returns it and its distance to the nearest other plane (normals are unit rows); ``ref``
    and a distance of 0 when the program fails.
    """
    others = np.delete(np.arange(len(offsets)), j)
    side = np.sign(normals[others] @ ref + offsets[others])
    side[side == 0] = 1.0
    d = normals.shape[1]
    # maximise t: side_i (n_i x + b_i) >= t, n_j x + b_j = 0, lo <= x <= hi
    a_ub = np.hstack([-side[:, None] * normals[others], np.ones((len(others), 1))])
    b_ub = side * offsets[others]
    res = linprog(np.r_[np.zeros(d), -1.0], A_ub=a_ub, b_ub=b_ub,
                  A_eq=np.r_[normals[j], 0.0][None], b_eq=[-offsets[j]],
                  bounds=[*zip(lo, hi, strict=True), (0, None)], method="highs")
    if res.status != 0:
        return ref, 0.0
    x = res.x[:d]
    return x, float(np.abs(normals[others] @ x + offsets[others]).min(initial=np.inf))


def remeasure(oracle: Oracle, normals: np.ndarray, centres: np.ndarray, radii: np.ndarray
              ) -> list[tuple[np.ndarray, float] | None]:
    """New ``(normal, offset)`` of each plane from probes around its centre (``2 d + 2``
    queries per plane), ``None`` where the jump is not rank one or the normal turned."""
    delta, step = DELTA * radii, STEP * radii
    n = normals
    sides = np.vstack([centres - delta[:, None] * n, centres + delta[:, None] * n])
    values = oracle(sides)
    jac = jacobians(oracle, sides, values, np.concatenate([step, step]))
    m = len(centres)
    out: list[tuple[np.ndarray, float] | None] = []
    for i in range(m):
        jump = jac[m + i] - jac[i]
        _, sv, vt = np.linalg.svd(jump, full_matrices=False)
        normal = vt[0] * np.sign(vt[0] @ n[i])
        if not (sv[0] > 0 and (len(sv) < 2 or sv[1] <= RANK_ONE_RTOL * sv[0])
                and normal @ n[i] > ALIGN):
            out.append(None)
            continue
        # the two linear pieces along the old normal meet at the kink: s* from the centre
        slope_m, slope_p = jac[i] @ n[i], jac[m + i] @ n[i]
        k = int(np.argmax(np.abs(slope_p - slope_m)))
        s = (values[i, k] - values[m + i, k] + delta[i] * (slope_p[k] + slope_m[k])) \
            / (slope_p[k] - slope_m[k])
        if not abs(s) < delta[i]:
            out.append(None)
            continue
        out.append((normal, float(-normal @ (centres[i] + s * n[i]))))
    return out
