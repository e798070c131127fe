"""Input property: the convex polytope of inputs sharing one input's activation pattern.

Fixing the on/off state of every ReLU (and the winner of every max-pool window) up to a layer
makes each pre-activation an affine function ``C x + d`` of the input, so the inputs with that
pattern are ``{x : A x <= b}``. Around the input, the largest ball inside the polytope has
radius ``min_i slack_i / ||a_i||_*`` (a certified radius within which the pattern, and so the
network's affine behaviour, does not change); the largest ball anywhere inside it is the
Chebyshev centre LP.

Whether the decision holds on the whole polytope (within the input domain) is Prophecy's
input property (Gopinath et al.): when the pattern fixes every ReLU and max-pool of the
network the logits are affine on the polytope, so each rival's largest score gap is one LP;
when later layers still branch it is the MILP of :func:`check_property`, with input
splitting on few input dimensions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linprog
from torch import Tensor

from app.analyses.patterns.milp import Phases
from app.analyses.patterns.rules import decisions, relu_node
from app.analyses.patterns.verify import (
    InputDomain,
    Method,
    Verdict,
    check_property,
    confirm_counterexample,
)
from app.errors import InvalidInputError
from app.layers import Add, AffineLayer, KindTable, MaxPool2d, ReLU
from app.network import INPUT, Network

GAP_DISTANCE = 1e-6  # input-space distance below the decision boundary asked of an LP proof


@dataclass
class InputPolytope:
    """The pattern polytope ``A x <= b`` (flat inputs) of ``x`` up to ReLU layer ``layer``."""

    layer: int
    node: int
    a: np.ndarray
    b: np.ndarray
    num_constraints: int
    num_facets: int | None  # non-redundant constraints within the domain, when counted
    radius_linf: float  # largest L-inf ball around the input inside the polytope
    radius_l2: float
    chebyshev_linf: tuple[float, np.ndarray]  # largest L-inf ball in polytope ∩ domain
    chebyshev_l2: tuple[float, np.ndarray]  # (radius, centre)
    target: int
    verdict: Verdict  # does every input of polytope ∩ domain get decision ``target``?
    phases: Phases

    def contains(self, x: Tensor, tol: float = 1e-9) -> Tensor:
        """Which inputs of the batch ``x`` satisfy ``A x <= b``."""
        flat = x.to(torch.float64).reshape(x.shape[0], -1).numpy()
        return torch.from_numpy((flat @ self.a.T <= self.b + tol).all(1))


def input_property(
    net: Network,
    x: Tensor,
    input_domain: InputDomain | tuple[float | Tensor, float | Tensor],
    layer: int = -1,
    target: int | None = None,
    lowest: bool = False,
    count_facets: bool = True,
    timeout: float = 30.0,
    method: Method = "auto",
) -> InputPolytope:
    """The polytope of inputs sharing ``x``'s pattern up to ReLU ``layer``, and what it implies.

    ``target`` defaults to the network's decision at ``x``. When the pattern fixes every
    nonlinearity the output check is one LP per rival; otherwise :func:`check_property`
    with ``method`` (``"auto"`` splits the input box on few input dimensions).
    """
    ordinal, node = relu_node(net, layer)
    domain = InputDomain.of(net, input_domain)
    net64 = net.with_dtype(torch.float64)
    x64 = x.to(torch.float64).reshape(1, *net.input_shape)
    if not bool(domain.contains(x64)[0]):
        raise InvalidInputError("the input lies outside the input domain")
    a, b, phases = pattern_constraints(net64, x64, node)
    if target is None:
        target = int(decisions(net64, x64, lowest)[0])
    slack = b - a @ x64.reshape(-1).numpy()
    box_a, box_b = _box_rows(domain)
    verdict = _decide(net, net64, x64, a, b, phases, node, domain, target, lowest, timeout,
                      method)
    return InputPolytope(
        ordinal, node, a, b, len(b),
        _count_facets(a, b, box_a, box_b) if count_facets else None,
        _ball_radius(slack, np.abs(a).sum(1)), _ball_radius(slack, np.linalg.norm(a, axis=1)),
        _chebyshev(a, b, box_a, box_b, np.inf), _chebyshev(a, b, box_a, box_b, 2),
        target, verdict, phases,
    )


def property_verdict(
    net: Network,
    x: Tensor,
    input_domain: InputDomain | tuple[float | Tensor, float | Tensor],
    layer: int = -1,
    lowest: bool = False,
    timeout: float = 30.0,
    method: Method = "auto",
    net64: Network | None = None,
) -> Verdict:
    """Only the verdict of :func:`input_property` for the network's decision at ``x`` (no
    radii, no Chebyshev balls): does the polytope of its pattern imply it?"""
    _, node = relu_node(net, layer)
    domain = InputDomain.of(net, input_domain)
    net64 = net64 if net64 is not None else net.with_dtype(torch.float64)
    x64 = x.to(torch.float64).reshape(1, *net.input_shape)
    if not bool(domain.contains(x64)[0]):
        raise InvalidInputError("the input lies outside the input domain")
    a, b, phases = pattern_constraints(net64, x64, node)
    target = int(decisions(net64, x64, lowest)[0])
    return _decide(net, net64, x64, a, b, phases, node, domain, target, lowest, timeout, method)


def _decide(net, net64, x64, a, b, phases, node, domain, target, lowest, timeout,
            method) -> Verdict:
    """The LP on the affine polytope where every nonlinearity is fixed, else the MILP
    (with input splitting on few inputs) on the polytope's bounding box."""
    if node >= max(net64.relu_indices + net64.maxpool_indices):
        _, _, _, (m, c) = _symbolic(net64, x64, len(net64.layers) - 1)
        return _check_affine(net, net64, x64, a, b, m, c, domain, phases, target, lowest)
    # every input with the pattern lies in the polytope's bounding box: search only there
    return check_property(net, phases, _bounding_box(a, b, domain, x64), target, lowest,
                          timeout, net64=net64, method=method, known=x64)


def pattern_constraints(
    net64: Network, x64: Tensor, node: int
) -> tuple[np.ndarray, np.ndarray, Phases]:
    """``(A, b, phases)``: inputs with ``x64``'s pattern at every ReLU (and max-pool winners)
    up to ``node``."""
    a, b, phases, _ = _symbolic(net64, x64, node)
    return a, b, phases


def _symbolic(
    net64: Network, x64: Tensor, node: int
) -> tuple[np.ndarray, np.ndarray, Phases, tuple[np.ndarray, np.ndarray]]:
    """:func:`pattern_constraints` and the affine map ``(M, c)`` of node ``node``'s output
    on the polytope (flat input to flat output)."""
    n_in = math.prod(net64.input_shape)
    with torch.no_grad():
        outs = net64.trace(x64)
    maps: list[tuple[np.ndarray, np.ndarray]] = []
    rows_a: list[np.ndarray] = []
    rows_b: list[np.ndarray] = []
    phases: Phases = {}
    for i, (layer, ins) in enumerate(zip(net64.layers, net64.inputs, strict=True)):
        if i > node:
            break
        srcs = [(np.eye(n_in), np.zeros(n_in)) if j == INPUT else maps[j] for j in ins]
        values = [t.reshape(-1).numpy() for t in net64.node_inputs(outs, x64, i)]
        fn = _SYMBOLIC(layer)
        (m, c), (ca, cb), phase = fn(layer, net64.in_shape(i), srcs, values)
        maps.append((m, c))
        rows_a.append(ca)
        rows_b.append(cb)
        if phase is not None:
            phases[i] = phase
    a, b = np.concatenate(rows_a), np.concatenate(rows_b)
    keep = np.abs(a).sum(1) > 1e-12  # a neuron constant over the inputs adds no constraint
    return a[keep], b[keep], phases, maps[node]


def _check_affine(net, net64, x64, a, b, m, c, domain, phases, target, lowest) -> Verdict:
    """The decision on ``{A x <= b} ∩ domain`` where the logits are ``M x + c``: one LP per
    rival, maximising its score gap over the target's.

    Rows and objective are normalised to unit length, so the LP's value is a signed distance
    in input space: a rival is beaten when its gap stays ``GAP_DISTANCE`` below 0, which no
    scaling of the weights or logits changes. A positive optimum is confirmed by float64
    forward passes (nudged towards ``x``, inside the convex polytope) before it is reported.
    """
    start = time.perf_counter()
    norms = np.linalg.norm(a, axis=1)
    a_n, b_n = a / norms[:, None], b / norms
    bounds = list(zip(domain.lo.reshape(-1).tolist(), domain.hi.reshape(-1).tolist(),
                      strict=True))
    sign = -1.0 if lowest else 1.0
    worst, tie, unconfirmed = -math.inf, False, False
    for j in range(m.shape[0]):
        if j == target:
            continue
        w, const = sign * (m[j] - m[target]), sign * (c[j] - c[target])
        size = float(np.linalg.norm(w))
        if size == 0.0:  # the gap is the constant on the whole polytope
            if const >= 0:
                return Verdict("unknown", time.perf_counter() - start,
                               f"class {j} ties or beats {target} by a constant {const:.3g}")
            worst = max(worst, const)
            continue
        res = linprog(-w / size, A_ub=a_n, b_ub=b_n, bounds=bounds, method="highs")
        if res.status != 0:
            return Verdict("unknown", time.perf_counter() - start,
                           f"the LP for class {j} ended with status {res.status} although the "
                           "input lies in the polytope (numerical trouble)")
        distance = -res.fun + const / size
        if distance > 0:
            found = confirm_counterexample(net, net64, res.x, phases, target, lowest, domain,
                                           toward=x64)
            if found is not None:
                x, cls = found
                return Verdict("counterexample", time.perf_counter() - start,
                               f"class {cls} wins instead of {target} (LP on the affine "
                               "polytope)", x, cls, distance * size)
            unconfirmed = True
        if distance > -GAP_DISTANCE:
            tie = True
            continue
        worst = max(worst, distance * size)
    seconds = time.perf_counter() - start
    if unconfirmed:
        return Verdict("unknown", seconds, "the LP's point where a rival wins did not survive "
                       "a forward pass (numerically on a boundary)")
    if tie:
        return Verdict("unknown", seconds, "a rival's largest score gap on the polytope is "
                       "within the LP's tolerance of 0")
    return Verdict("proven", seconds, "holds on the whole polytope within the domain (the "
                   "network is affine there: one LP per rival)", worst_margin=float(worst))


Affine = tuple[np.ndarray, np.ndarray]  # (M, c): a node's values as M @ x + c
# (layer, its input shape, the inputs' affine maps, the inputs' values at the point) ->
# (the output's map, the rows (A, b) it adds to the polytope, the ReLU phase or None)
Symbolic = Callable[[Any, tuple[int, ...], list[Affine], list[np.ndarray]],
                    tuple[Affine, Affine, Any]]
_SYMBOLIC: KindTable[Symbolic] = KindTable("no pattern polytope for")


def _none(n_in: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, n_in)), np.zeros(0)


@_SYMBOLIC.register(AffineLayer)
def _affine(layer, in_shape, srcs, values):
    w, bias = (t.detach().to(torch.float64).numpy() for t in layer.matrix(in_shape))
    m, c = srcs[0]
    return (w @ m, w @ c + bias), _none(m.shape[1]), None


@_SYMBOLIC.register(Add)
def _add(layer, in_shape, srcs, values):
    (m1, c1), (m2, c2) = srcs
    return (m1 + m2, c1 + c2), _none(m1.shape[1]), None


@_SYMBOLIC.register(ReLU)
def _relu(layer, in_shape, srcs, values):
    m, c = srcs[0]
    on = values[0] > 0
    # on: C x + d > 0 (closed: -C x <= d); off: C x + d <= 0
    sign = np.where(on, -1.0, 1.0)[:, None]
    rows = (sign * m, (-sign[:, 0]) * c)
    phase = (np.flatnonzero(on).tolist(), np.flatnonzero(~on).tolist())
    return (m * on[:, None], c * on), rows, phase


@_SYMBOLIC.register(MaxPool2d)
def _maxpool(layer, in_shape, srcs, values):
    m, c = srcs[0]
    idx = torch.arange(math.prod(in_shape), dtype=torch.float64).reshape(1, *in_shape)
    windows = layer.windows(idx).reshape(-1, math.prod(layer.kernel_size)).numpy()
    v = values[0]
    winners, ra, rb = [], [], []
    for win in windows:
        win = win[np.isfinite(win)].astype(int)
        w = int(win[np.argmax(v[win])])
        winners.append(w)
        others = win[win != w]
        ra.append(m[others] - m[w])  # x_other <= x_winner
        rb.append(c[w] - c[others])
    n_in = m.shape[1]
    return ((m[winners], c[winners]),
            (np.concatenate(ra) if ra else np.zeros((0, n_in)),
             np.concatenate(rb) if rb else np.zeros(0)), (winners, []))


def _bounding_box(a: np.ndarray, b: np.ndarray, domain: InputDomain, x64: Tensor) -> InputDomain:
    """The smallest box around ``{A x <= b} ∩ domain`` (two LPs per input), widened by the LP
    tolerance; the domain itself where an LP fails or the box would miss ``x64``."""
    norms = np.linalg.norm(a, axis=1)
    a_n, b_n = a / norms[:, None], b / norms
    lo, hi = domain.lo.reshape(-1).numpy().copy(), domain.hi.reshape(-1).numpy().copy()
    bounds = list(zip(lo.tolist(), hi.tolist(), strict=True))
    for i in range(lo.size):
        unit = np.zeros(lo.size)
        unit[i] = 1.0
        low = linprog(unit, A_ub=a_n, b_ub=b_n, bounds=bounds, method="highs")
        high = linprog(-unit, A_ub=a_n, b_ub=b_n, bounds=bounds, method="highs")
        if low.status != 0 or high.status != 0:
            return domain
        pad = 1e-7 * (hi[i] - lo[i]) + 1e-9 * max(1.0, abs(lo[i]), abs(hi[i]))
        lo[i], hi[i] = max(lo[i], low.fun - pad), min(hi[i], -high.fun + pad)
    shape = domain.lo.shape
    box = InputDomain(torch.from_numpy(lo).reshape(shape), torch.from_numpy(hi).reshape(shape))
    return box if bool(box.contains(x64)[0]) else domain


def _ball_radius(slack: np.ndarray, norms: np.ndarray) -> float:
    """Largest radius around a point with these slacks and dual norms of the rows."""
    return float((slack / norms).min()) if slack.size else math.inf


def _box_rows(domain: InputDomain) -> tuple[np.ndarray, np.ndarray]:
    n = domain.lo.numel()
    eye = np.eye(n)
    return (np.concatenate([eye, -eye]),
            np.concatenate([domain.hi.reshape(-1).numpy(), -domain.lo.reshape(-1).numpy()]))


def _chebyshev(a, b, box_a, box_b, norm: float) -> tuple[float, np.ndarray]:
    """Radius of the largest ball (``norm`` 2 or inf) inside ``{A x <= b} ∩ box`` (an LP)."""
    full_a, full_b = np.concatenate([a, box_a]), np.concatenate([b, box_b])
    dual = np.abs(full_a).sum(1) if norm == np.inf else np.linalg.norm(full_a, axis=1)
    n = full_a.shape[1]
    cost = np.zeros(n + 1)
    cost[-1] = -1.0
    res = linprog(cost, A_ub=np.hstack([full_a, dual[:, None]]), b_ub=full_b,
                  bounds=[(None, None)] * n + [(0, None)], method="highs")
    if res.status != 0:
        return 0.0, np.full(n, np.nan)
    return float(res.x[-1]), res.x[:-1]


def _count_facets(a, b, box_a, box_b) -> int:
    """How many of the pattern constraints are not implied by the others and the box."""
    full_a, full_b = np.concatenate([a, box_a]), np.concatenate([b, box_b])
    facets = 0
    for i in range(len(b)):
        keep = np.ones(len(full_b), bool)
        keep[i] = False
        # relax row i a little so the LP stays bounded; facet if the max exceeds b_i
        res = linprog(-a[i], A_ub=np.vstack([full_a[keep], a[i]]),
                      b_ub=np.append(full_b[keep], b[i] + 1.0), bounds=(None, None),
                      method="highs")
        if res.status == 0 and -res.fun > b[i] + 1e-9:
            facets += 1
    return facets
