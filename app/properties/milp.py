"""A complete check of one case by mixed-integer programming (HiGHS through scipy's ``milp``).

For a sequential network of affine layers and ReLUs, the case "``lo <= x <= hi`` and every
row ``c_k y <= d_k``" has a point exactly when ``min_x max_k (c_k y - d_k) <= 0``. The ReLUs
are encoded exactly: stable ones as identities or zeros, unstable ones with one binary each
(big-M with alpha-CROWN's bounds of the pre-activations for this case, in float64). HiGHS' dual bound is
a lower bound of that minimum even when the time limit stops the search, so a dual bound
above a relative slack refutes the case. Solver tolerances are not exact arithmetic: the
slack is ``1e-6`` of the largest output magnitude, and a dual bound above the value at a
known point (the box centre, by a forward pass) is a solver error and proves nothing.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from app.bounds import analyze, float64, fold_last_layer
from app.layers import AffineLayer, ReLU
from app.network import Network
from app.properties.vnnlib import Case

SLACK = 1e-6


def supports(net: Network) -> bool:
    """Whether the encoding covers ``net``: a chain of affine layers and ReLUs."""
    return net.is_sequential and all(isinstance(layer, AffineLayer | ReLU) for layer in net.layers)


def refute(net: Network, case: Case, time_limit: float
           ) -> tuple[bool, float, np.ndarray | None]:
    """``(refuted, lower bound of min max_k (c_k y - d_k), best input found or None)``
    within ``time_limit`` seconds; the input is the solver's (clipped to the box), unchecked."""
    start = time.monotonic()
    net = float64(net)
    lo = torch.as_tensor(case.lo, dtype=torch.float64).reshape(1, *net.input_shape)
    hi = torch.as_tensor(case.hi, dtype=torch.float64).reshape(1, *net.input_shape)
    rows, rhs = case.rows, case.rhs
    spec = torch.as_tensor(rows, dtype=torch.float64)[None]
    with torch.no_grad():
        alpha = analyze(net, lo, hi, "alpha-crown", time_limit=time_limit / 4)
        node, folded, bias = fold_last_layer(net, spec)
        alpha.lower(node, folded, bias - torch.as_tensor(rhs)[None])  # tightens the intermediate bounds for this case
        bounds = [tuple(t[0].reshape(-1).numpy() for t in alpha.bounds(i))
                  for i in range(len(net.layers))]
        centre = net((lo + hi) / 2)[0].numpy()
    at_centre = float((rows @ centre - rhs).max())
    prog = _Program()
    cur = prog.add(case.lo, case.hi)
    shape = net.input_shape
    for i, layer in enumerate(net.layers):
        b_lo, b_hi = bounds[i]
        if isinstance(layer, ReLU):
            cur = _relu(prog, cur, *bounds[i - 1]) if i > 0 else _relu(prog, cur, case.lo, case.hi)
        else:
            a, b = (t.detach().numpy() for t in layer.matrix(shape))
            z = prog.add(b_lo, b_hi)
            prog.equal(z, cur, -a, b)  # z - A x = b
            cur = z
        shape = net.shapes[i]
    y_lo, y_hi = bounds[-1]
    t_lo = float(np.min(rows.clip(min=0) @ y_lo + rows.clip(max=0) @ y_hi - rhs))
    t = prog.add(np.array([t_lo]), np.array([np.inf]))
    for k in range(rows.shape[0]):  # t - c_k y >= -d_k
        prog.row({int(t[0]): 1.0, **{int(v): -float(c) for v, c in zip(cur, rows[k], strict=True)
                                     if c != 0}}, -rhs[k], np.inf)
    res = prog.solve(int(t[0]), time_limit - (time.monotonic() - start))
    point = None if res.x is None else np.clip(res.x[: case.lo.size], case.lo, case.hi)
    bound = getattr(res, "mip_dual_bound", None)
    if bound is None or not np.isfinite(bound):
        bound = res.fun if res.status == 0 else -np.inf
    scale = max(float(np.abs(y_lo).max()), float(np.abs(y_hi).max()), float(np.abs(rhs).max()))
    if bound > at_centre + SLACK * scale:  # contradicts a known point: no verdict
        return False, float("-inf"), point
    return bool(bound > SLACK * scale), float(bound), point


class _Program:
    """Variables with bounds and integrality, and sparse linear rows, for scipy's ``milp``."""

    def __init__(self) -> None:
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.integer: list[int] = []
        self.entries: list[tuple[int, int, float]] = []
        self.row_lo: list[float] = []
        self.row_hi: list[float] = []

    def add(self, lo: np.ndarray, hi: np.ndarray, integer: bool = False) -> np.ndarray:
        start = len(self.lo)
        self.lo += list(map(float, lo))
        self.hi += list(map(float, hi))
        self.integer += [int(integer)] * len(lo)
        return np.arange(start, len(self.lo))

    def row(self, coefs: dict[int, float], low: float, high: float) -> None:
        r = len(self.row_lo)
        self.entries += [(r, v, c) for v, c in coefs.items()]
        self.row_lo.append(float(low))
        self.row_hi.append(float(high))

    def equal(self, z: np.ndarray, x: np.ndarray, neg_a: np.ndarray, b: np.ndarray) -> None:
        """Rows ``z_i + sum_j neg_a[i, j] x_j = b_i`` (added in bulk)."""
        r0 = len(self.row_lo)
        ii, jj = np.nonzero(neg_a)
        self.entries += list(zip((r0 + ii).tolist(), x[jj].tolist(), neg_a[ii, jj].tolist(),
                                 strict=True))
        self.entries += [(r0 + i, int(v), 1.0) for i, v in enumerate(z)]
        self.row_lo += list(map(float, b))
        self.row_hi += list(map(float, b))

    def solve(self, objective: int, time_limit: float):
        n = len(self.lo)
        c = np.zeros(n)
        c[objective] = 1.0
        r, v, w = zip(*self.entries, strict=True)
        a = coo_matrix((w, (r, v)), shape=(len(self.row_lo), n)).tocsr()
        return milp(c, constraints=LinearConstraint(a, self.row_lo, self.row_hi),
                    integrality=np.array(self.integer), bounds=Bounds(self.lo, self.hi),
                    options={"time_limit": max(1.0, time_limit), "disp": False})


def _relu(prog: _Program, z: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Variables of ``max(z, 0)``: ``z`` itself when active, 0 when inactive, else big-M."""
    out = np.empty_like(z)
    for i, v in enumerate(z.tolist()):
        if lo[i] >= 0:
            out[i] = v
        elif hi[i] <= 0:
            out[i] = prog.add(np.zeros(1), np.zeros(1))[0]
        else:
            h = int(prog.add(np.zeros(1), np.array([hi[i]]))[0])
            d = int(prog.add(np.zeros(1), np.ones(1), integer=True)[0])
            prog.row({h: 1.0, v: -1.0}, 0.0, np.inf)  # h >= z
            prog.row({h: 1.0, d: -hi[i]}, -np.inf, 0.0)  # h <= u d
            prog.row({h: 1.0, v: -1.0, d: -lo[i]}, -np.inf, -lo[i])  # h <= z - l (1 - d)
            out[i] = h
    return out
