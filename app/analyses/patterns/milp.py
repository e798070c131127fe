"""Exact mixed-integer encoding of a network over an input box (scipy's HiGHS).

Each node's output gets one variable per unit. Affine layers become equalities from
``layer.matrix``; a ReLU whose phase is not known gets the usual big-M encoding with a binary
phase variable, M taken from interval bounds; max-pooling gets one binary per window entry.
Neurons with a *fixed* phase (the premise of a rule, or a full activation pattern) become
linear: ``on`` is ``y = x >= 0``, ``off`` is ``y = 0 >= x``. With every phase fixed the
program is a plain LP.

Every node's variables are scaled by one positive number (its largest bound), so the solver
sees values of order one whatever the scale of the weights: its absolute feasibility and
optimality tolerances (1e-7, 1e-6) then act as tolerances relative to that node's scale, and
coefficients scaled by 1e-9 are not dropped as zeros. Scaling by a positive number keeps every
sign, so ReLU phases and the order of the logits are unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from app.bounds import analyze
from app.layers import Add, AffineLayer, KindTable, MaxPool2d, ReLU
from app.network import INPUT, Network

# Fixed phases: ReLU node -> (indices that are on, indices that are off); MaxPool node ->
# (winning flat input index of every output, []).
Phases = dict[int, tuple[list[int], list[int]]]


def satisfies(
    net: Network, outs: list[torch.Tensor], x: torch.Tensor, phases: Phases
) -> torch.Tensor:
    """Which inputs of the batch ``x`` (with traced ``outs``) have the fixed phases."""
    ok = torch.ones(x.shape[0], dtype=torch.bool)
    for node, (first, second) in phases.items():
        pre = net.node_inputs(outs, x, node)[0]
        layer, flat = net.layers[node], pre.reshape(x.shape[0], -1)
        if isinstance(layer, MaxPool2d):  # the winner is the argmax (first of ties), as in
            # the patterns the phases come from
            winners = layer.windows(pre).reshape(x.shape[0], len(first), -1).argmax(-1)
            ok &= (_window_entries(layer, pre.shape[1:])[np.arange(len(first)), winners]
                   == torch.as_tensor(first)).all(1)
        else:
            ok &= (flat[:, first] > 0).all(1) & (flat[:, second] <= 0).all(1)
    return ok


def _window_entries(layer: MaxPool2d, in_shape: tuple[int, ...]) -> torch.Tensor:
    """``[windows, k]``: the flat input index of each window entry (-1 for padding)."""
    idx = torch.arange(math.prod(in_shape), dtype=torch.float64).reshape(1, *in_shape)
    win = layer.windows(idx).reshape(-1, math.prod(layer.kernel_size))
    return torch.nan_to_num(win, nan=-1.0, posinf=-1.0, neginf=-1.0).long()


@dataclass
class Program:
    """A MILP under construction: variables with bounds, sparse rows ``lo <= A v <= hi``."""

    lb: list[float] = field(default_factory=list)
    ub: list[float] = field(default_factory=list)
    integer: list[int] = field(default_factory=list)
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = field(default_factory=list)
    row_lo: list[np.ndarray] = field(default_factory=list)
    row_hi: list[np.ndarray] = field(default_factory=list)
    _cache: tuple | None = None

    @property
    def size(self) -> int:
        return len(self.lb)

    def _constraint(self) -> LinearConstraint:
        key = (len(self.rows), self.size)
        if self._cache is None or self._cache[0] != key:
            r, c, d, offset = [], [], [], 0
            for rows, cols, data, n in self.rows:
                r.append(rows + offset)
                c.append(cols)
                d.append(data)
                offset += n
            a = sparse.csr_matrix(
                (np.concatenate(d), (np.concatenate(r), np.concatenate(c))),
                shape=(offset, self.size),
            )
            self._cache = (key, LinearConstraint(a, np.concatenate(self.row_lo),
                                                 np.concatenate(self.row_hi)))
        return self._cache[1]

    def variables(self, lo: np.ndarray, hi: np.ndarray, integer: bool = False) -> np.ndarray:
        start = self.size
        self.lb.extend(lo.tolist())
        self.ub.extend(hi.tolist())
        self.integer.extend([int(integer)] * lo.size)
        return np.arange(start, self.size)

    def add(self, coef: sparse.spmatrix, cols: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        """Rows ``lo <= coef @ v[cols] <= hi`` (``coef`` is ``[rows, len(cols)]``)."""
        coef = sparse.coo_matrix(coef)
        self.rows.append((coef.row, cols[coef.col], coef.data, coef.shape[0]))
        self.row_lo.append(np.broadcast_to(np.asarray(lo, float), (coef.shape[0],)).copy())
        self.row_hi.append(np.broadcast_to(np.asarray(hi, float), (coef.shape[0],)).copy())

    def solve(
        self, objective: np.ndarray, time_limit: float, maximize: bool = True, relax: bool = False
    ):
        """Solve with HiGHS (``relax``: as an LP); scipy's result, objective sign restored."""
        sign = -1.0 if maximize else 1.0
        res = milp(
            sign * objective,
            integrality=np.zeros(self.size) if relax else np.asarray(self.integer),
            bounds=Bounds(np.asarray(self.lb), np.asarray(self.ub)),
            constraints=self._constraint(),
            options={"time_limit": max(0.05, time_limit), "disp": False},
        )
        if res.fun is not None:
            res.fun = sign * res.fun
        return res


@dataclass
class Encoding:
    """The program, the variable indices of the input and of every node, the output bounds.

    Variable ``v`` of node ``i`` stands for the value ``scales[i] * v`` (``input_scale`` for
    the input); ``output_bounds`` are in the network's own units.
    """

    program: Program
    input: np.ndarray
    nodes: list[np.ndarray]
    output_bounds: tuple[np.ndarray, np.ndarray]
    scales: list[float]
    input_scale: float

    @property
    def output_scale(self) -> float:
        return self.scales[-1]

    def inputs(self, solution: np.ndarray) -> np.ndarray:
        """The flat input (network units, float64) of a solver solution."""
        return np.asarray(solution, dtype=np.float64)[self.input] * self.input_scale


def encode(
    net: Network,
    lo: torch.Tensor,
    hi: torch.Tensor,
    phases: Phases,
    margin: float = 0.0,
    tighten: bool = True,
    deadline: float = math.inf,
) -> Encoding:
    """Encode ``net`` (float64) on the box ``[lo, hi]`` with the given fixed ReLU phases.

    Big-M constants come from interval bounds clamped by the fixed phases; with ``tighten``
    they are intersected with CROWN bounds, and each ReLU input still undecided is bounded
    by two LPs over the relaxation built so far
    (until ``deadline``, a ``time.perf_counter`` value), which makes the MILP far easier.
    ``margin > 0`` asks fixed-on inputs to be ``>= margin`` and fixed-off ones ``<= -margin``
    times their node's scale (to find counterexamples strictly inside a pattern).
    """
    shape = (1, *net.input_shape)
    bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {
        INPUT: (lo.reshape(shape).to(torch.float64), hi.reshape(shape).to(torch.float64))
    }
    crown = analyze(net, *bounds[INPUT], "crown") if tighten else None
    prog = Program()
    scales: dict[int, float] = {INPUT: _scale(bounds[INPUT])}
    nodes: dict[int, np.ndarray] = {INPUT: prog.variables(*_flat(bounds[INPUT], scales[INPUT]))}
    relus = set(net.relu_indices)
    for i, (layer, ins) in enumerate(zip(net.layers, net.inputs, strict=True)):
        if i in relus:
            if crown is not None and ins[0] != INPUT:
                c_lo, c_hi = crown.bounds(ins[0])
                b_lo, b_hi = bounds[ins[0]]
                bounds[ins[0]] = torch.maximum(b_lo, c_lo), torch.minimum(b_hi, c_hi)
            bounds[ins[0]] = _tightened(prog, nodes[ins[0]], scales[ins[0]], bounds[ins[0]],
                                        phases.get(i), deadline if tighten else -math.inf)
        bounds[i] = layer.interval(*(bounds[j] for j in ins))
        # ReLU and max-pool keep their input's scale (positively homogeneous)
        scales[i] = (scales[ins[0]] if isinstance(layer, (ReLU, MaxPool2d))
                     else _scale(bounds[i]))
        encoder = _ENCODERS(layer)
        nodes[i] = encoder(prog, layer, net.in_shape(i), [nodes[j] for j in ins],
                           [_flat(bounds[j], scales[j]) for j in ins],
                           _flat(bounds[i], scales[i]), phases.get(i), margin,
                           [scales[j] for j in ins], scales[i])
        if len(ins) == 1 and nodes[i] is nodes[ins[0]]:
            scales[i] = scales[ins[0]]  # the same variables (flatten, reshape)
    last = len(net.layers) - 1
    return Encoding(prog, nodes[INPUT], [nodes[i] for i in range(last + 1)],
                    _flat(bounds[last]), [scales[i] for i in range(last + 1)], scales[INPUT])


def _scale(bound: tuple[torch.Tensor, torch.Tensor]) -> float:
    """A node's scale: its largest finite bound in absolute value (1 when all are zero)."""
    mags = torch.cat([bound[0].detach().reshape(-1), bound[1].detach().reshape(-1)]).abs()
    mags = mags[torch.isfinite(mags)]
    top = float(mags.max()) if mags.numel() else 0.0
    return top if top > 0 else 1.0


def _flat(
    bound: tuple[torch.Tensor, torch.Tensor], scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    return (bound[0].detach().reshape(-1).numpy() / scale,
            bound[1].detach().reshape(-1).numpy() / scale)


def _tightened(
    prog: Program,
    pre: np.ndarray,
    scale: float,
    bound: tuple[torch.Tensor, torch.Tensor],
    fixed: tuple[list[int], list[int]] | None,
    deadline: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of a ReLU's input: clamped by its fixed phases, then LP-tightened if time allows."""
    lo, hi = (t.detach().reshape(-1).clone() for t in bound)
    if fixed is not None:
        lo[fixed[0]] = lo[fixed[0]].clamp(min=0)
        hi[fixed[1]] = hi[fixed[1]].clamp(max=0)
    for k in np.flatnonzero(((lo < 0) & (hi > 0)).numpy()):
        if time.perf_counter() >= deadline:
            break
        objective = np.zeros(prog.size)
        objective[pre[k]] = 1.0
        top = prog.solve(objective, deadline - time.perf_counter(), relax=True)
        if top.status == 0:  # 1e-7: HiGHS' feasibility tolerance, relative to the scale
            hi[k] = min(float(hi[k]), (top.fun + 1e-7) * scale)
        if hi[k] > 0:
            bottom = prog.solve(objective, deadline - time.perf_counter(), maximize=False,
                                relax=True)
            if bottom.status == 0:
                lo[k] = max(float(lo[k]), (bottom.fun - 1e-7) * scale)
    shape = bound[0].shape
    return lo.reshape(shape), hi.reshape(shape)


Interval = tuple[np.ndarray, np.ndarray]
# (program, layer, its input shape, the inputs' variables, their bounds, the output's bounds,
#  the layer's fixed phases, margin, the inputs' scales, the output's scale) -> output variables
Encoder = Callable[[Program, Any, tuple[int, ...], list[np.ndarray], list[Interval], Interval,
                    tuple[list[int], list[int]] | None, float, list[float], float], np.ndarray]
_ENCODERS: KindTable[Encoder] = KindTable("no MILP encoding for")


def _eye(n: int) -> sparse.csr_matrix:
    return sparse.identity(n, format="csr")


@_ENCODERS.register(AffineLayer)
def _affine(prog, layer, in_shape, srcs, src_bounds, out_bounds, fixed, margin, scales, scale):
    a, b = (t.detach().to(torch.float64).numpy() for t in layer.matrix(in_shape))
    if a.shape[0] == a.shape[1] and not b.any() and np.array_equal(a, np.eye(a.shape[0])):
        return srcs[0]  # flatten / reshape: the same variables
    y = prog.variables(*out_bounds)
    # scale * y = A (s_in * x) + b, divided by scale
    coef = sparse.hstack([sparse.csr_matrix(a * (scales[0] / scale)), -_eye(len(y))])
    prog.add(coef, np.concatenate([srcs[0], y]), -b / scale, -b / scale)
    return y


@_ENCODERS.register(Add)
def _add(prog, layer, in_shape, srcs, src_bounds, out_bounds, fixed, margin, scales, scale):
    y = prog.variables(*out_bounds)
    n = len(y)
    prog.add(sparse.hstack([(scales[0] / scale) * _eye(n), (scales[1] / scale) * _eye(n),
                            -_eye(n)]), np.concatenate([*srcs, y]), 0, 0)
    return y


@_ENCODERS.register(ReLU)
def _relu(prog, layer, in_shape, srcs, src_bounds, out_bounds, fixed, margin, scales, scale):
    pre, (lb, ub) = srcs[0], src_bounds[0]
    n = len(pre)
    on, off = (np.zeros(n, bool), np.zeros(n, bool))
    if fixed is not None:
        on[fixed[0]], off[fixed[1]] = True, True
    y = prog.variables(np.zeros(n), np.maximum(ub, 0))
    active = on | (lb >= 0) & ~off
    inactive = off | (ub <= 0) & ~on
    prog.add(_eye(int(on.sum())), pre[on], margin, math.inf)
    prog.add(_eye(int(off.sum())), pre[off], -math.inf, -margin)
    ident = np.flatnonzero(active)
    prog.add(sparse.hstack([_eye(len(ident)), -_eye(len(ident))]),
             np.concatenate([pre[ident], y[ident]]), 0, 0)
    zero = np.flatnonzero(inactive & ~active)
    prog.add(_eye(len(zero)), y[zero], 0, 0)
    split = np.flatnonzero(~active & ~inactive)
    if split.size:
        k = len(split)
        d = prog.variables(np.zeros(k), np.ones(k), integer=True)
        ls, us = lb[split], ub[split]
        cols = np.concatenate([y[split], pre[split], d])
        # y >= x
        prog.add(sparse.hstack([_eye(k), -_eye(k), sparse.csr_matrix((k, k))]), cols, 0, math.inf)
        # y <= x - lb (1 - d)  <=>  y - x - lb d <= -lb
        prog.add(sparse.hstack([_eye(k), -_eye(k), sparse.diags(-ls)]), cols, -math.inf, -ls)
        # y <= ub d
        prog.add(sparse.hstack([_eye(k), sparse.csr_matrix((k, k)), sparse.diags(-us)]), cols,
                 -math.inf, 0)
    return y


@_ENCODERS.register(MaxPool2d)
def _maxpool(prog, layer, in_shape, srcs, src_bounds, out_bounds, fixed, margin, scales, scale):
    idx = torch.arange(math.prod(in_shape), dtype=torch.float64).reshape(1, *in_shape)
    windows = layer.windows(idx).reshape(-1, math.prod(layer.kernel_size)).numpy()
    x, (lb, ub) = srcs[0], src_bounds[0]
    y = prog.variables(*out_bounds)
    for o, win in enumerate(windows):
        win = win[np.isfinite(win)].astype(int)
        if fixed is not None:  # a fixed winner: y = x_w >= every other input of the window
            # (no margin: windows of switched-off ReLUs tie at exactly 0)
            w, others = fixed[0][o], win[win != fixed[0][o]]
            prog.add(sparse.csr_matrix([[1.0, -1.0]]), np.array([y[o], x[w]]), 0, 0)
            k = len(others)
            prog.add(sparse.hstack([np.ones((k, 1)), -_eye(k)]),
                     np.concatenate([[x[w]], x[others]]), 0, math.inf)
            continue
        top = ub[win].max()
        cand = win[ub[win] >= lb[win].max()]  # the others can never be the max
        if len(cand) == 1:
            prog.add(sparse.csr_matrix([[1.0, -1.0]]), np.array([y[o], x[cand[0]]]), 0, 0)
            continue
        k = len(cand)
        d = prog.variables(np.zeros(k), np.ones(k), integer=True)
        ones = np.ones((k, 1))
        # y >= x_w
        prog.add(sparse.hstack([ones, -_eye(k)]), np.concatenate([[y[o]], x[cand]]), 0, math.inf)
        # y <= x_w + (top - l_w)(1 - d_w)
        big = top - lb[cand]
        prog.add(sparse.hstack([ones, -_eye(k), sparse.diags(big)]),
                 np.concatenate([[y[o]], x[cand], d]), -math.inf, big)
        prog.add(sparse.csr_matrix(np.ones((1, k))), d, 1, 1)
    return y
