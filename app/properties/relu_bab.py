"""Branch and bound over ReLU splits (beta-CROWN style, Wang et al., NeurIPS 2021).

For inputs too large to split (MNIST: 784 dimensions) a case is refuted by splitting
unstable ReLUs instead: a sub-domain fixes some neurons active (``z >= 0``) or inactive
(``z <= 0``). Each sub-domain's lower bound of ``c y - d`` is a CROWN back-substitution in
float64 over the network's chain of dense affine maps, with

* the pre-activation bounds of the root (alpha-CROWN's, for this case) clamped by the splits,
  so a split neuron is relaxed exactly (identity or zero);
* the split constraints themselves added with Lagrange multipliers ``beta >= 0``
  (``f(x) - beta * s * z(x) <= f(x)`` wherever the split ``s z >= 0`` holds);
* optimised lower slopes ``alpha`` and ``beta`` (projected Adam on the bound, in float32;
  each sub-domain keeps its best step's slopes), warm-started from the parent.

Any ``alpha`` in ``[0, 1]`` and ``beta >= 0`` give a sound bound, so the search settings
(and its float32 arithmetic) only affect strength: the bound that counts is recomputed in
float64 from the slopes found. Many sub-domains are bounded in one batched pass; the branching
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
from app.bounds.crown import relu_lines
from app.errors import InvalidInputError
from app.layers import AffineLayer, ReLU
from app.network import INPUT, Network
from app.progress import ProgressFn, report
from app.properties.vnnlib import Case

BATCH = 256  # sub-domains taken per step (each gives two children)
MAX_DOMAINS = 200_000  # open sub-domains before giving up (unknown)
STEPS = 10  # alpha/beta steps per batch (warm-started from the parent; 5 took twice the
# time on mnistfc 256x4 prop_3_0.03, 20 no less than 10)
ROOT_STEPS = 60
MAX_SPLITS = 3  # neurons split at once per sub-domain
SLACK = 1e-9  # relative to the largest magnitude a bound's terms reach (float64)
SEARCH_DTYPE = torch.float32  # of the slope search; the bound that counts is float64
SEARCH_MARGIN = 1e-5  # relative: a float32 bound counts as closed only past it


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


@dataclass
class _Terms:
    """The chain and the cases' rows in one precision (``top`` folds the rows into the
    last affine map: ``[C, m, n_{K-1}]``)."""

    weights: list[Tensor]
    biases: list[Tensor]
    lower: list[Tensor]
    upper: list[Tensor]
    top: Tensor
    top_const: Tensor
    lo: Tensor
    hi: Tensor

    @classmethod
    def of(cls, ch: Chain, lo: Tensor, hi: Tensor, rows: Tensor, rhs: Tensor,
           dtype: torch.dtype) -> _Terms:
        def cast(ts: list[Tensor]) -> list[Tensor]:
            return [t.to(dtype) for t in ts]
        return cls(cast(ch.weights), cast(ch.biases), cast(ch.lower), cast(ch.upper),
                   (rows @ ch.weights[-1]).to(dtype), (rows @ ch.biases[-1] - rhs).to(dtype),
                   lo.reshape(-1).to(dtype), hi.reshape(-1).to(dtype))


def _relaxation(t: _Terms, splits: list[Tensor]) -> list[tuple[Tensor, ...]]:
    """Per ReLU, what the sub-domains' splits fix of its relaxation (the same for every
    slope step): ``(split sign, upper slope, upper intercept, unstable, active)``, each
    ``[D, 1, n_k]``."""
    out = []
    for k, split in enumerate(splits):
        s = split.to(t.lower[k].dtype)
        lo = torch.where(s > 0, t.lower[k].clamp(min=0), t.lower[k])
        up = torch.where(s < 0, t.upper[k].clamp(max=0), t.upper[k])
        unstable = (lo < 0) & (up > 0)
        active = (lo >= 0).to(s.dtype)
        _, up_slope, up_const = relu_lines(lo, up)
        out.append(tuple(x.unsqueeze(1) for x in (s, up_slope, up_const, unstable, active)))
    return out


def _bound(t: _Terms, relax: list[tuple[Tensor, ...]], case: Tensor, alpha: list[Tensor],
           beta: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor], Tensor]:
    """``(bound [D, m], input coefficients [D, m, n_in], lambda per ReLU [D, m, n_k],
    scale [D, m])``: the lower bound per sub-domain and row, its linear function's
    coefficients on the input and on each ReLU's output, and the terms' largest magnitude."""
    lam = t.top[case]
    const = t.top_const[case]
    scale = const.abs()
    lambdas: list[Tensor] = []
    for k in range(len(t.lower) - 1, -1, -1):
        lambdas.append(lam.detach())
        s, up_slope, up_const, unstable, active = relax[k]
        lo_slope = torch.where(unstable, alpha[k], active)
        pos, neg = lam.clamp(min=0), lam.clamp(max=0)
        coef = pos * lo_slope + neg * up_slope - beta[k] * s
        term = neg * up_const
        const = const + term.sum(-1) + coef @ t.biases[k]
        scale = torch.maximum(scale, (term.abs().sum(-1) + (coef.abs() @ t.biases[k].abs())))
        lam = coef @ t.weights[k]
    lambdas.reverse()
    mid, rad = (t.hi + t.lo) / 2, (t.hi - t.lo) / 2
    bound = const + lam @ mid - lam.abs() @ rad
    scale = torch.maximum(scale, lam.abs() @ torch.maximum(t.lo.abs(), t.hi.abs()))
    return bound, lam.detach(), lambdas, scale.detach()


class _Bounder:
    """Batched beta-CROWN bounds of ``rows . y - rhs`` for sub-domains of cases sharing
    one box (``rows`` ``[C, m, n_out]``, each sub-domain of case ``case[d]``).

    The slopes are searched in float32 (twice the sub-domains per second of a float64
    search); the bound that counts is the float64 one of the slopes found."""

    def __init__(self, ch: Chain, lo: Tensor, hi: Tensor, rows: Tensor, rhs: Tensor) -> None:
        self.fast = _Terms.of(ch, lo, hi, rows, rhs, SEARCH_DTYPE)
        self.exact = _Terms.of(ch, lo, hi, rows, rhs, torch.float64)

    def optimise(self, case: Tensor, splits: list[Tensor], alpha: list[Tensor],
                 beta: list[Tensor], steps: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Each sub-domain's bound ``[D]`` (max over rows) from its best slopes in up to
        ``steps`` projected Adam steps on ``alpha``/``beta`` (``SEARCH_DTYPE``, updated in
        place; stopped once every float32 bound clears a margin), with ``x*`` and the lambdas
        of the last step's best row. A positive bound is the sound float64 one, lowered by
        the slack; a sub-domain the search left open keeps its float32 bound (<= 0)."""
        params = [t.requires_grad_(True) for t in (*alpha, *beta)]
        opt = torch.optim.Adam([{"params": alpha, "lr": 0.1}, {"params": beta, "lr": 0.05}],
                               fused=True)
        n, best, kept = len(alpha), None, [p.detach().clone() for p in params]
        relax = _relaxation(self.fast, splits)
        with torch.enable_grad():
            for step in range(steps + 1):
                bound, coef, lambdas, scale = _bound(self.fast, relax, case, alpha, beta)
                guess = (bound.detach() - SEARCH_MARGIN * (1 + scale)).amax(1)
                better = torch.ones_like(guess, dtype=torch.bool) if best is None else guess > best
                best = guess if best is None else torch.maximum(best, guess)
                with torch.no_grad():
                    for p, k in zip(params, kept, strict=True):
                        k.copy_(torch.where(better[:, None, None], p, k))
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
        # the bound that counts: float64 from each sub-domain's best slopes, for those the
        # search closed (the others stay open; their float32 bound only orders the pool)
        result = best.double()
        closed = (best > 0).nonzero()[:, 0]
        if closed.numel():
            with torch.no_grad():
                sub = [s[closed] for s in splits]
                exact, _, _, scale = _bound(self.exact, _relaxation(self.exact, sub),
                                            case[closed], [a[closed].double() for a in kept[:n]],
                                            [b[closed].double() for b in kept[n:]])
            result[closed] = (exact - SLACK * (1 + scale)).amax(1)
        # the last step's point and lambdas: branching on those of a best step (often the
        # parent's own slopes) took ten times the sub-domains on mnistfc 256x4
        row = bound.detach().argmax(1)
        pick = torch.arange(row.shape[0])
        point = torch.where(coef[pick, row] > 0, self.exact.lo, self.exact.hi)
        return result, point, [lam[pick, row].double() for lam in lambdas]


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
    alpha = [(u > -low).to(SEARCH_DTYPE).expand(c, m, -1).clone()
             for low, u in zip(ch.lower, ch.upper, strict=True)]
    beta = [torch.zeros(c, m, n, dtype=SEARCH_DTYPE) for n in sizes]
    bound, point, lambdas = bounder.optimise(case, splits, alpha, beta, ROOT_STEPS)
    domains, leaves, rounds = c, 0, 0
    pool = _Pool()  # open sub-domains
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
        if bool((layer[:, 0] < 0).any()):
            return BabResult("unknown", "a sub-domain with every unstable ReLU split is not "
                                        "bounded above zero", domains, leaves)
        pool.add((bound[keep], case, splits, alpha, beta, layer, neuron))
        n_open = pool.size
        if n_open == 0:
            return BabResult("refuted", f"all {leaves} leaves bounded above zero",
                             domains, leaves)
        if time.monotonic() > deadline:
            return BabResult("unknown", f"time limit reached with {n_open} open sub-domains",
                             domains, leaves)
        if n_open > MAX_DOMAINS:
            return BabResult("unknown", f"more than {MAX_DOMAINS} open sub-domains",
                             domains, leaves)
        report(progress, 0.5, f"ReLU branch and bound: {domains} sub-domains, {n_open} open")
        parent = pool.take(BATCH)  # the worst bounds first
        # several neurons at once while few sub-domains are open (fewer, fuller batches)
        k = max(1, min(MAX_SPLITS, int(math.log2(BATCH / parent[0].numel()))))
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


class _Pool:
    """Open sub-domains ``(bound, case, splits, alpha, beta, layer, neuron)`` in slots that
    grow by doubling: taking the worst few leaves the others where they are (a pool of tens
    of thousands is not copied every batch)."""

    def __init__(self) -> None:
        self.slots: list[Tensor] = []
        self.used = torch.zeros(0, dtype=torch.bool)
        self.layers = 0
        self.size = 0

    def add(self, batch: tuple) -> None:
        bound, case, splits, alpha, beta, layer, neuron = batch
        fields = [bound, case, *splits, *alpha, *beta, layer, neuron]
        n = bound.shape[0]
        if not self.slots:
            self.layers = len(splits)
            self.slots = [f.new_zeros(0, *f.shape[1:]) for f in fields]
        free = (~self.used).nonzero()[:, 0]
        if free.numel() < n:
            grow = max(n - free.numel(), self.used.numel())
            self.slots = [torch.cat([s, s.new_zeros(grow, *s.shape[1:])]) for s in self.slots]
            self.used = torch.cat([self.used, torch.zeros(grow, dtype=torch.bool)])
            free = (~self.used).nonzero()[:, 0]
        idx = free[:n]
        for slot, f in zip(self.slots, fields, strict=True):
            slot[idx] = f
        self.used[idx] = True
        self.size += n

    def take(self, n: int) -> tuple:
        """The ``n`` sub-domains of lowest bound, removed from the pool."""
        key = torch.where(self.used, self.slots[0], torch.inf)
        idx = key.topk(min(n, self.size), largest=False).indices
        self.used[idx] = False
        self.size -= idx.numel()
        f = [slot[idx] for slot in self.slots]
        k = self.layers
        return f[0], f[1], f[2:2 + k], f[2 + k:2 + 2 * k], f[2 + 2 * k:2 + 3 * k], f[-2], f[-1]


def supports(net: Network) -> bool:
    """Whether the dense chain view covers ``net``: affine layers and ReLUs, in sequence,
    with an affine layer before every ReLU, and at least one ReLU (else CROWN is exact)."""
    return (net.is_sequential and bool(net.relu_indices) and not isinstance(net.layers[0], ReLU)
            and all(isinstance(layer, AffineLayer | ReLU) for layer in net.layers))
