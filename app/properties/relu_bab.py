"""Branch and bound over ReLU splits (beta-CROWN style, Wang et al., NeurIPS 2021).

For inputs too large to split (MNIST: 784 dimensions) a case is refuted by splitting
unstable ReLUs instead: a sub-domain fixes some neurons active (``z >= 0``) or inactive
(``z <= 0``). Each sub-domain's lower bound of ``c y - d`` is a CROWN back-substitution in
float64 over the network's chain of dense affine maps, with

* the pre-activation bounds of the root (alpha-CROWN's, for this case) clamped by the splits,
  so a split neuron is relaxed exactly (identity or zero);
* the split constraints themselves added with Lagrange multipliers ``beta >= 0``
  (``f(x) - beta * s * z(x) <= f(x)`` wherever the split ``s z >= 0`` holds);
* optimised lower slopes ``alpha`` and ``beta`` (projected Adam on the bound; every step's
  bound is sound, the best is kept), warm-started from the parent.

Any ``alpha`` in ``[0, 1]`` and ``beta >= 0`` give a sound bound, so the search settings
only affect strength. Many sub-domains are bounded in one batched pass; the branching
neuron is the one whose upper-chord intercept costs the bound most (BaBSR's intercept
score). The input minimising each sub-domain's linear bound is checked by a forward pass,
and PGD runs from the worst ones. A bound is lowered by a relative float slack before it
counts. Only chains of affine layers and ReLUs (``milp.supports``) are covered.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from app.bounds import analyze, float64, fold_last_layer
from app.errors import InvalidInputError
from app.layers import AffineLayer, ReLU
from app.network import INPUT, Network
from app.progress import ProgressFn, report
from app.properties.vnnlib import Case

BATCH = 256  # sub-domains taken per step (each gives two children)
MAX_DOMAINS = 200_000  # open sub-domains before giving up (unknown)
STEPS = 5  # alpha/beta steps per batch (warm-started from the parent: few suffice)
ROOT_STEPS = 60
MAX_SPLITS = 3  # neurons split at once per sub-domain
SLACK = 1e-9  # relative to the largest magnitude a bound's terms reach


@dataclass
class Chain:
    """The dense float64 maps of a chain ``z_0 = W_0 x + b_0``, ``z_k = W_k relu(z_{k-1}) +
    b_k``, the output ``y = W_K relu(z_{K-1}) + b_K``, and the root bounds of each ``z_k``."""

    weights: list[Tensor]
    biases: list[Tensor]
    lower: list[Tensor]  # [n_k] per ReLU
    upper: list[Tensor]


@dataclass
class BabResult:
    """``status``: ``refuted`` | ``counterexample`` | ``unknown``; ``leaves``: sub-domains
    bounded above zero (the proof's leaves), ``point`` a checked counterexample input."""

    status: str
    reason: str
    domains: int
    leaves: int
    point: Tensor | None = None
    case: int | None = None  # index into the cases given, of the one ``point`` meets


def chain(net: Network, lo: Tensor, hi: Tensor, spec: Tensor, offset: Tensor,
          time_limit: float) -> Chain:
    """Dense maps of ``net`` (a chain of affine layers and ReLUs) and alpha-CROWN bounds of
    each ReLU's input on the box ``[lo, hi]`` (``[1, *input_shape]``), tightened for the
    rows ``spec`` ``[1, m, n_out]`` + ``offset``."""
    net = float64(net)
    with torch.no_grad():
        alpha = analyze(net, lo, hi, "alpha-crown", time_limit=time_limit)
        node, folded, bias = fold_last_layer(net, spec.to(torch.float64))
        alpha.lower(node, folded, bias + offset.to(torch.float64))
        weights, biases, lower, upper = [], [], [], []
        w = torch.eye(int(torch.tensor(net.input_shape).prod()), dtype=torch.float64)
        b = torch.zeros(w.shape[0], dtype=torch.float64)
        shape = net.input_shape
        for i, layer in enumerate(net.layers):
            if isinstance(layer, ReLU):
                prev = net.inputs[i][0]
                if prev == INPUT:
                    raise InvalidInputError(
                        "branch and bound: a ReLU on the input itself is not a chain of "
                        "affine maps and ReLUs")
                weights.append(w)
                biases.append(b)
                lower.append(alpha.bounds(prev)[0][0].reshape(-1).clone())
                upper.append(alpha.bounds(prev)[1][0].reshape(-1).clone())
                w = torch.eye(w.shape[0], dtype=torch.float64)
                b = torch.zeros(w.shape[0], dtype=torch.float64)
            else:
                a, c = (t.detach().to(torch.float64) for t in layer.matrix(shape))
                w, b = a @ w, a @ b + c.reshape(-1)
            shape = net.shapes[i]
        weights.append(w)
        biases.append(b)
    return Chain(weights, biases, lower, upper)


class _Bounder:
    """Batched beta-CROWN bounds of ``rows . y - rhs`` for sub-domains of cases sharing
    one box (``rows`` ``[C, m, n_out]``, each sub-domain of case ``case[d]``)."""

    def __init__(self, ch: Chain, lo: Tensor, hi: Tensor, rows: Tensor, rhs: Tensor) -> None:
        self.ch, self.lo, self.hi = ch, lo.reshape(-1), hi.reshape(-1)
        self.top = rows @ ch.weights[-1]  # [C, m, n_{K-1}]
        self.top_const = rows @ ch.biases[-1] - rhs  # [C, m]

    def bound(self, case: Tensor, splits: list[Tensor], alpha: list[Tensor],
              beta: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor], Tensor]:
        """``(bound [D, m], x* [D, m, n_in], lambda per ReLU [D, m, n_k], scale [D, m])``:
        the lower bound per sub-domain and row, the input where its linear bound is least,
        the coefficients on each ReLU's output, and the terms' largest magnitude."""
        ch = self.ch
        lam = self.top[case]
        const = self.top_const[case]
        scale = const.abs()
        lambdas: list[Tensor] = []
        for k in range(len(ch.lower) - 1, -1, -1):
            lambdas.append(lam.detach())
            s = splits[k].to(torch.float64)
            lo = torch.where(s > 0, ch.lower[k].clamp(min=0), ch.lower[k])
            up = torch.where(s < 0, ch.upper[k].clamp(max=0), ch.upper[k])
            unstable = (lo < 0) & (up > 0)
            active = (lo >= 0).to(torch.float64)
            width = torch.where(unstable, up - lo, torch.ones_like(up))
            up_slope = torch.where(unstable, up / width, active).unsqueeze(1)
            up_const = torch.where(unstable, -up / width * lo, torch.zeros_like(lo)).unsqueeze(1)
            lo_slope = torch.where(unstable.unsqueeze(1), alpha[k], active.unsqueeze(1))
            pos, neg = lam.clamp(min=0), lam.clamp(max=0)
            coef = pos * lo_slope + neg * up_slope - beta[k] * s.unsqueeze(1)
            term = neg * up_const
            const = const + term.sum(-1) + coef @ ch.biases[k]
            scale = torch.maximum(scale, (term.abs().sum(-1) + (coef.abs() @ ch.biases[k].abs())))
            lam = coef @ ch.weights[k]
        lambdas.reverse()
        mid, rad = (self.hi + self.lo) / 2, (self.hi - self.lo) / 2
        bound = const + lam @ mid - lam.abs() @ rad
        point = torch.where(lam > 0, self.lo, self.hi)
        scale = torch.maximum(scale, lam.abs() @ torch.maximum(self.lo.abs(), self.hi.abs()))
        return bound, point.detach(), lambdas, scale.detach()

    def optimise(self, case: Tensor, splits: list[Tensor], alpha: list[Tensor],
                 beta: list[Tensor], steps: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Best sound bound ``[D]`` (max over rows, lowered by the slack) over ``steps``
        projected Adam steps on ``alpha``/``beta`` (updated in place), with ``x*`` and the
        lambdas of the best row of the last step."""
        params = [t.requires_grad_(True) for t in (*alpha, *beta)]
        opt = torch.optim.Adam([{"params": alpha, "lr": 0.1}, {"params": beta, "lr": 0.05}],
                               foreach=True)
        best = None
        with torch.enable_grad():
            for step in range(steps + 1):
                bound, point, lambdas, scale = self.bound(case, splits, alpha, beta)
                safe = (bound.detach() - SLACK * (1 + scale)).amax(1)
                best = safe if best is None else torch.maximum(best, safe)
                if step == steps or bool((best > 0).all()):
                    break
                opt.zero_grad()
                (-bound[best <= 0].sum()).backward()
                opt.step()
                with torch.no_grad():
                    for a in alpha:
                        a.clamp_(0, 1)
                    for b in beta:
                        b.clamp_(min=0)
        for p in params:
            p.requires_grad_(False)
        row = bound.detach().argmax(1)
        pick = torch.arange(row.shape[0])
        return best, point[pick, row], [lam[pick, row] for lam in lambdas]


def _branch(ch: Chain, splits: list[Tensor], lambdas: list[Tensor], k: int
            ) -> tuple[Tensor, Tensor]:
    """Per sub-domain the ``k`` (layer, neuron) pairs ``[D, k]`` to split: the free unstable
    neurons whose upper chord's intercept, times the weight the bound puts on it, costs the
    bound most (layer ``-1``: no free unstable neuron left)."""
    scores = []
    for i, lam in enumerate(lambdas):
        lo, up = ch.lower[i], ch.upper[i]
        free = (splits[i] == 0) & (lo < 0) & (up > 0)
        gap = (-lo * up / (up - lo).clamp(min=1e-30)).clamp(min=0)
        score = (lam.clamp(max=0).abs() + 1e-3 * lam.abs()) * gap + 1e-9 * gap
        scores.append(torch.where(free, score, torch.full_like(score, -1.0)))
    flat = torch.cat(scores, 1)
    value, best = flat.topk(min(k, flat.shape[1]), 1)
    sizes = torch.tensor([s.shape[1] for s in scores])
    ends = sizes.cumsum(0)
    layer = torch.bucketize(best, ends, right=True)
    neuron = best - (ends - sizes)[layer]
    return torch.where(value >= 0, layer, -1), neuron


def refute(net: Network, cases: list[Case], ch: Chain, deadline: float,
           progress: ProgressFn | None, check: Callable[[int, Tensor], bool]) -> BabResult:
    """Refute every one of ``cases`` (one shared box, the same number of rows) by ReLU-split
    branch and bound until ``deadline`` (monotonic s); their sub-domains share batches.

    ``check(k, x)`` says whether input ``x`` meets case ``k`` by a forward pass (the caller's
    own check, so a counterexample is never reported unchecked)."""
    lo = torch.as_tensor(cases[0].lo, dtype=torch.float64)
    hi = torch.as_tensor(cases[0].hi, dtype=torch.float64)
    rows = torch.as_tensor(np.stack([c.rows for c in cases]), dtype=torch.float64)
    rhs = torch.as_tensor(np.stack([c.rhs for c in cases]), dtype=torch.float64)
    bounder = _Bounder(ch, lo, hi, rows, rhs)
    net64 = float64(net)
    c, m = rows.shape[:2]
    sizes = [t.shape[0] for t in ch.lower]
    case = torch.arange(c)
    splits = [torch.zeros(c, n, dtype=torch.int8) for n in sizes]
    alpha = [(u > -low).to(torch.float64).expand(c, m, -1).clone()
             for low, u in zip(ch.lower, ch.upper, strict=True)]
    beta = [torch.zeros(c, m, n, dtype=torch.float64) for n in sizes]
    bound, point, lambdas = bounder.optimise(case, splits, alpha, beta, ROOT_STEPS)
    domains, leaves, rounds = c, 0, 0
    pool = None  # open sub-domains: (bound, case, splits, alpha, beta, layer, neuron)
    while True:
        found = _counterexample(net64, rows, rhs, lo, hi, case, point, bound, check,
                                pgd=rounds % 4 == 0, net_dtype=net.dtype)
        if found is not None:
            return BabResult("counterexample", "a sub-domain's point meets a case",
                             domains, leaves, *found)
        rounds += 1
        open_ = bound <= 0
        leaves += int((~open_).sum())
        keep = open_.nonzero()[:, 0]
        case, splits = case[keep], [s[keep] for s in splits]
        alpha, beta = [a[keep] for a in alpha], [b[keep] for b in beta]
        layer, neuron = _branch(ch, splits, [lam[keep] for lam in lambdas], MAX_SPLITS)
        batch = (bound[keep], case, splits, alpha, beta, layer, neuron)
        pool = batch if pool is None else _cat(pool, batch)
        n_open = pool[0].shape[0]
        if n_open == 0:
            return BabResult("refuted", f"all {leaves} leaves bounded above zero",
                             domains, leaves)
        if bool((pool[5][:, 0] < 0).any()):
            return BabResult("unknown", "a sub-domain with every unstable ReLU split is not "
                                        "bounded above zero", domains, leaves)
        if time.monotonic() > deadline:
            return BabResult("unknown", f"time limit reached with {n_open} open sub-domains",
                             domains, leaves)
        if n_open > MAX_DOMAINS:
            return BabResult("unknown", f"more than {MAX_DOMAINS} open sub-domains",
                             domains, leaves)
        report(progress, 0.5, f"ReLU branch and bound: {domains} sub-domains, {n_open} open")
        order = pool[0].argsort()  # the worst bounds first
        take, rest = order[:BATCH], order[BATCH:]
        parent = tuple(_index(t, take) for t in pool)
        pool = tuple(_index(t, rest) for t in pool)
        # several neurons at once while few sub-domains are open (fewer, fuller batches)
        k = max(1, min(MAX_SPLITS, int(math.log2(BATCH / take.numel()))))
        k = min(k, int((parent[5] >= 0).sum(1).min()))
        case, splits, alpha, beta = _children(parent, k)
        domains += splits[0].shape[0]
        bound, point, lambdas = bounder.optimise(case, splits, alpha, beta, STEPS)


def _children(parent, k: int) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """``2^k`` children per parent: its first ``k`` branching neurons fixed active or
    inactive in every combination (a neuron with layer ``-1`` is none: its copies repeat)."""
    _, case, splits, alpha, beta, layer, neuron = parent
    layer, neuron = layer[:, :k], neuron[:, :k]
    for j in range(k):
        n = splits[0].shape[0]
        case = torch.cat([case, case])
        splits = [torch.cat([s, s]) for s in splits]
        alpha, beta = [torch.cat([a, a]) for a in alpha], [torch.cat([b, b]) for b in beta]
        layer, neuron = torch.cat([layer, layer]), torch.cat([neuron, neuron])
        rows = torch.arange(2 * n)
        sign = torch.cat([torch.ones(n), -torch.ones(n)]).to(torch.int8)
        for i in range(len(splits)):
            here = layer[:, j] == i
            splits[i][rows[here], neuron[here, j]] = sign[here]
    return (case, splits, [a.detach().clone() for a in alpha],
            [b.detach().clone() for b in beta])


def _counterexample(net64: Network, rows: Tensor, rhs: Tensor, lo: Tensor, hi: Tensor,
                    case: Tensor, point: Tensor, bound: Tensor, check, pgd: bool,
                    net_dtype: torch.dtype) -> tuple[Tensor, int] | None:
    """A checked ``(input, case)`` among the sub-domains' points and (with ``pgd``) PGD
    from the worst few."""
    worst = bound.argsort()[:8]
    tries = [(point, case)]
    if pgd:
        tries.append((_pgd(net64, rows[case[worst]], rhs[case[worst]], lo, hi,
                           point[worst].clone()), case[worst]))
    for x, k in tries:
        x = inside(x, lo, hi, net_dtype)
        with torch.no_grad():
            viol = _violation(net64, rows[k], rhs[k], x)
        for i in (viol <= 0).nonzero()[:, 0].tolist()[:4]:
            if check(int(k[i]), x[i]):
                return x[i], int(k[i])
    return None


def inside(x: Tensor, lo: Tensor, hi: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to the network's precision, moved one ulp inward where rounding left
    the box (so the point checked and reported is the one in the box)."""
    r = x.to(dtype)
    r = torch.where(r.double() < lo, torch.nextafter(r, r.new_tensor(torch.inf)), r)
    r = torch.where(r.double() > hi, torch.nextafter(r, r.new_tensor(-torch.inf)), r)
    return r.double()


def _violation(net64: Network, rows: Tensor, rhs: Tensor, x: Tensor) -> Tensor:
    """``max_j (c_j y - d_j)`` per point, each with its own rows ``[D, m, n_out]``."""
    y = net64(x.reshape(-1, *net64.input_shape))
    return ((rows @ y.unsqueeze(-1)).squeeze(-1) - rhs).amax(1)


def _pgd(net64: Network, rows: Tensor, rhs: Tensor, lo: Tensor, hi: Tensor, x: Tensor,
         steps: int = 10) -> Tensor:
    """Projected sign-gradient descent on each point's violation inside the box."""
    step = (hi - lo) / 8
    for i in range(steps):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(_violation(net64, rows, rhs, x).sum(), x)
        x = torch.minimum(torch.maximum(x - step * (1 - i / steps) * grad.sign(), lo), hi)
    return x.detach()


def _index(t, idx: Tensor):
    return [s[idx] for s in t] if isinstance(t, list) else t[idx]


def _cat(a: tuple, b: tuple) -> tuple:
    return tuple([torch.cat([x, y]) for x, y in zip(p, q, strict=True)]
                 if isinstance(p, list) else torch.cat([p, q]) for p, q in zip(a, b, strict=True))


def supports(net: Network) -> bool:
    """Whether the dense chain view covers ``net``: affine layers and ReLUs, in sequence,
    with an affine layer before every ReLU, and at least one ReLU (else CROWN is exact)."""
    return (net.is_sequential and bool(net.relu_indices) and not isinstance(net.layers[0], ReLU)
            and all(isinstance(layer, AffineLayer | ReLU) for layer in net.layers))
