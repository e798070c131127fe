"""The complete robustness check behind verified explanations: a MILP (scipy's HiGHS) of a
sequential ReLU network over an input box, big-M constants from CROWN bounds.

Consecutive affine layers are composed into one dense map; each ReLU input with bounds
``[l, u]`` is ``0`` when ``u <= 0``, the identity when ``l >= 0`` and otherwise the usual
big-M encoding with one binary. Every layer's variables are divided by that layer's largest
bound, so HiGHS's absolute tolerances act relative to each layer's scale. Fixed input
features are folded into the first layer's bias; only free features are variables. One MILP
per rival class j the bounds cannot exclude: minimise the margin ``logit_target - logit_j`` subject to
``margin <= 1e-5`` of the logits' scale; infeasible for every j is the proof, and an optimum
is returned as a counterexample only once the forward pass classifies it otherwise.
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
    device = lo.device
    lo, hi = lo.cpu(), hi.cpu()  # scipy's HiGHS works on host arrays
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
            a, b = (t.detach().to(torch.float64).cpu().numpy()
                    for t in layer.matrix(net.in_shape(i)))
            a_acc, b_acc = a @ a_acc, a @ b_acc + b
            continue
        low, high = (t.detach().reshape(-1).cpu().numpy() for t in crown.bounds(i - 1))
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
    # logits = a_acc @ (prev_scale * v_prev) + b_acc. One MILP per rival class j: minimise
    # the margin logit_target - logit_j under "margin <= PROOF_MARGIN"; infeasible = proof
    out_lo, out_hi = (t.detach().reshape(-1).cpu().numpy()
                      for t in crown.bounds(len(net.layers) - 1))
    out_scale = max(float(np.abs(out_lo).max()), float(np.abs(out_hi).max()), 1e-300)
    rivals = sorted((j for j in range(len(out_lo)) if j != target
                     and out_lo[target] - out_hi[j] <= PROOF_MARGIN * out_scale),
                    key=lambda j: out_lo[target] - out_hi[j])
    n = len(lb)
    network = [rows.matrix(n)] if rows.lo else []
    box = Bounds(np.asarray(lb), np.asarray(ub))
    for j in rivals:
        objective = np.zeros(n)
        objective[prev] = (a_acc[target] - a_acc[j]) * prev_scale / out_scale
        offset = (b_acc[target] - b_acc[j]) / out_scale
        margin = LinearConstraint(objective[None], -np.inf, PROOF_MARGIN - offset)
        res = _solve(objective, box, np.asarray(integer), network + [margin], deadline)
        if res is None:
            return Outcome(UNKNOWN, None)
        if res.status == 2:
            continue  # no input where j comes within PROOF_MARGIN of the target
        if prove_only or res.x is None:
            return Outcome(UNKNOWN, None)
        point = torch.from_numpy(base.copy())
        point[torch.from_numpy(free)] = torch.from_numpy(res.x[: int(free.sum())] * scale_in)
        point = torch.minimum(torch.maximum(point.reshape(lo.shape), lo), hi).to(device)
        with torch.no_grad():
            if int(net(point[None]).argmax()) != target:
                return Outcome(COUNTEREXAMPLE, point)
        return Outcome(UNKNOWN, None)  # a near-tie, or the time limit before a point
    return Outcome(ROBUST, None)


def _solve(objective: np.ndarray, box: Bounds, integer: np.ndarray,
           constraints: list[LinearConstraint], deadline: float):
    """HiGHS; ``None`` once the deadline passed or on a solver failure. Status 0 optimal,
    1 time limit, 2 infeasible."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    res = milp(objective, integrality=integer, bounds=box, constraints=constraints,
               options={"time_limit": left, "disp": False})
    return res if res.status in (0, 1, 2) else None


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

    def matrix(self, n: int) -> LinearConstraint:
        a = sparse.csr_matrix((np.concatenate(self.v), (np.concatenate(self.r),
                                                        np.concatenate(self.c))),
                              shape=(len(self.lo), n))
        return LinearConstraint(a, np.asarray(self.lo), np.asarray(self.hi))
