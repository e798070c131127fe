"""The complete robustness check behind verified explanations: a MILP (scipy's HiGHS) of a
sequential ReLU network over an input box, big-M constants from CROWN bounds.

Consecutive affine layers are composed into one dense map; each ReLU input with bounds
``[l, u]`` is ``0`` when ``u <= 0``, the identity when ``l >= 0`` and otherwise the usual
big-M encoding with one binary. Every layer's variables are divided by that layer's largest
bound, so HiGHS's absolute tolerances act relative to each layer's scale. Fixed input
features are folded into the first layer's bias; only free features are variables.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import Tensor

from app.bounds import analyze
from app.layers import AffineLayer, ReLU
from app.network import Network

BOUND_SLACK = 1e-9  # big-M bounds widened by this fraction of their layer's scale
PROOF_MARGIN = 1e-5  # proof: no input has a rival margin below this fraction of the logits'
# scale (10x HiGHS's 1e-6 feasibility tolerance)

ROBUST, COUNTEREXAMPLE, UNKNOWN = "robust", "counterexample", "unknown"


def supported(net: Network) -> bool:
    """A sequential network of affine layers and ReLUs (what :func:`check` encodes)."""
    return net.is_sequential and all(isinstance(layer, (AffineLayer, ReLU))
                                     for layer in net.layers)


@dataclass
class Outcome:
    verdict: str  # ROBUST, COUNTEREXAMPLE or UNKNOWN (time limit or an unconfirmed point)
    point: Tensor | None  # a counterexample input (shaped like one input), forward-checked


def check(net: Network, lo: Tensor, hi: Tensor, target: int, deadline: float,
          prove_only: bool = False) -> Outcome:
    """Is every input in ``[lo, hi]`` classified ``target``? ``net`` is float64 and
    :func:`supported`; ``lo``/``hi`` are one input-shaped box. ``prove_only``: no search for
    a counterexample (UNKNOWN unless proven)."""
    with torch.no_grad():
        crown = analyze(net, lo[None], hi[None], "crown")
    free = (hi > lo).reshape(-1).numpy()
    base = lo.reshape(-1).numpy().astype(np.float64)
    scale_in = max(float(hi.abs().max()), float(lo.abs().max()), 1e-300)
    lb, ub, integer, rows = list(lo.reshape(-1).numpy()[free] / scale_in), \
        list(hi.reshape(-1).numpy()[free] / scale_in), [0] * int(free.sum()), _Rows()
    prev = np.arange(int(free.sum()))  # variable ids of the previous layer's output
    prev_scale = scale_in
    a_acc = np.eye(base.size)[:, free]  # current affine map on the free variables (unscaled)
    b_acc = base.copy()
    b_acc[free] = 0.0
    for i, layer in enumerate(net.layers):
        if isinstance(layer, AffineLayer):
            a, b = (t.detach().to(torch.float64).numpy() for t in layer.matrix(net.in_shape(i)))
            a_acc, b_acc = a @ a_acc, a @ b_acc + b
            continue
        low, high = (t.detach().reshape(-1).numpy() for t in crown.bounds(i - 1))
        scale = max(float(np.abs(low).max()), float(np.abs(high).max()), 1e-300)
        low, high = low - BOUND_SLACK * scale, high + BOUND_SLACK * scale
        coef = a_acc * prev_scale / scale  # y / scale = coef @ v_prev + b_acc / scale
        bias = b_acc / scale
        on, unstable = low >= 0, (low < 0) & (high > 0)
        keep = np.flatnonzero(on | unstable)
        z = np.arange(len(lb), len(lb) + len(keep))
        lb += [0.0] * len(keep)
        ub += list(np.maximum(high[keep], 0) / scale)
        integer += [0] * len(keep)
        for row, k in enumerate(keep):
            if on[k]:  # z = y
                rows.add(z[row], prev, 1.0, -coef[k], bias[k], bias[k])
            else:
                d = len(lb)
                lb.append(0.0)
                ub.append(1.0)
                integer.append(1)
                lo_k, hi_k = low[k] / scale, high[k] / scale
                rows.add(z[row], prev, 1.0, -coef[k], bias[k], np.inf)  # z >= y
                # z <= y - l (1 - d)
                rows.add(z[row], prev, 1.0, -coef[k], -np.inf, bias[k] - lo_k, d, -lo_k)
                rows.add(z[row], np.zeros(0, int), 1.0, np.zeros(0), -np.inf, 0.0, d, -hi_k)
        prev, prev_scale = z, scale
        out = np.zeros((len(low), len(keep)))
        out[keep, np.arange(len(keep))] = 1.0
        a_acc, b_acc = out, np.zeros(len(low))
    # logits = a_acc @ (prev_scale * v_prev) + b_acc; one binary s_j per rival class j:
    # sum s_j = 1 and margin_j <= PROOF_MARGIN where s_j = 1 (big-M from CROWN elsewhere)
    out_lo, out_hi = (t.detach().reshape(-1).numpy()
                      for t in crown.bounds(len(net.layers) - 1))
    out_scale = max(float(np.abs(out_lo).max()), float(np.abs(out_hi).max()), 1e-300)
    rivals = [j for j in range(len(out_lo))
              if j != target and out_lo[target] - out_hi[j] <= PROOF_MARGIN * out_scale]
    if not rivals:
        return Outcome(ROBUST, None)
    pick = np.arange(len(lb), len(lb) + len(rivals))
    lb += [0.0] * len(rivals)
    ub += [1.0] * len(rivals)
    integer += [1] * len(rivals)
    first = len(rows.lo)
    for j, s_j in zip(rivals, pick, strict=True):
        coef = (a_acc[target] - a_acc[j]) * prev_scale / out_scale
        offset = (b_acc[target] - b_acc[j]) / out_scale
        big = (out_hi[target] - out_lo[j]) / out_scale + 1.0
        # coef @ v + offset - big (1 - s_j) <= level
        rows.add(s_j, prev, big, coef, -np.inf, big - offset)
    rows.add_sum(pick)
    shift = np.zeros(len(rows.lo))
    shift[first: first + len(rivals)] = 1.0
    bounds = np.asarray(lb), np.asarray(ub), np.asarray(integer)
    # a proof: no rival margin even at +PROOF_MARGIN; then a counterexample at -PROOF_MARGIN
    proof = _solve(*bounds, rows.matrix(len(lb), PROOF_MARGIN * shift), deadline)
    if proof is None or proof.status not in (0, 2):
        return Outcome(UNKNOWN, None)
    if proof.status == 2:
        return Outcome(ROBUST, None)
    if prove_only:
        return Outcome(UNKNOWN, None)
    found = _solve(*bounds, rows.matrix(len(lb), -PROOF_MARGIN * shift), deadline)
    if found is None or found.status != 0:
        return Outcome(UNKNOWN, None)  # a near-tie (or the time limit)
    point = torch.from_numpy(base.copy())
    point[torch.from_numpy(free)] = torch.from_numpy(found.x[: int(free.sum())] * scale_in)
    point = torch.minimum(torch.maximum(point.reshape(lo.shape), lo), hi)
    with torch.no_grad():
        if int(net(point[None]).argmax()) != target:
            return Outcome(COUNTEREXAMPLE, point)
    return Outcome(UNKNOWN, None)


def _solve(lb: np.ndarray, ub: np.ndarray, integer: np.ndarray, constraint: LinearConstraint,
           deadline: float):
    """HiGHS feasibility run (zero objective: it stops at the first point); ``None`` once
    the deadline passed. Status 0 feasible, 1 time limit, 2 infeasible."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    return milp(np.zeros(len(lb)), integrality=integer, bounds=Bounds(lb, ub),
                constraints=constraint, options={"time_limit": left, "disp": False})


class _Rows:
    """Sparse rows ``lo <= z_coef * v_z + coef @ v_prev + d_coef * v_d <= hi``."""

    def __init__(self) -> None:
        self.r: list[np.ndarray] = []
        self.c: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def add(self, z: int, prev: np.ndarray, z_coef: float, coef: np.ndarray, lo: float,
            hi: float, d: int | None = None, d_coef: float = 0.0) -> None:
        row = len(self.lo)
        nz = np.flatnonzero(coef) if len(coef) else np.zeros(0, int)
        cols = [np.array([z]), prev[nz]] + ([np.array([d])] if d is not None else [])
        vals = [np.array([z_coef]), coef[nz]] + ([np.array([d_coef])] if d is not None else [])
        self.c.append(np.concatenate(cols))
        self.v.append(np.concatenate(vals))
        self.r.append(np.full(len(self.c[-1]), row))
        self.lo.append(lo)
        self.hi.append(hi)

    def add_sum(self, cols: np.ndarray) -> None:
        """``sum v[cols] == 1``."""
        row = len(self.lo)
        self.c.append(cols)
        self.v.append(np.ones(len(cols)))
        self.r.append(np.full(len(cols), row))
        self.lo.append(1.0)
        self.hi.append(1.0)

    def matrix(self, n: int, shift: np.ndarray) -> LinearConstraint:
        """The rows, with ``shift`` added to their upper bounds."""
        a = sparse.csr_matrix((np.concatenate(self.v), (np.concatenate(self.r),
                                                        np.concatenate(self.c))),
                              shape=(len(self.lo), n))
        return LinearConstraint(a, np.asarray(self.lo), np.asarray(self.hi) + shift)
