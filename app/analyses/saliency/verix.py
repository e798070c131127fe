"""Verified explanations (VeriX: Wu, Wu & Barrett, NeurIPS 2023; VeriX+ 2024): a set ``E`` of
input features such that *every* input equal to ``x`` on ``E`` and within ``eps`` of ``x``
elsewhere (inside the input range) keeps the predicted class.

Features are tried least sensitive first (sensitivity: how far the class margin drops when
that feature alone moves to either end of its interval). A feature is freed only when a box
containing "current free set plus it" is proven robust; it is kept with a witness when the
box "current free set plus it" holds an input of another class (the ``order`` field is
the sensitivity order, ``freed`` the order of proofs). The search, cheapest
evidence first:

1. Bounds: the longest prefix of the order that the engine's float-safe CROWN bounds
   (:func:`app.bounds.property_lower_bounds`) prove, found by doubling then bisection.
2. Complete checks on groups in order (VeriX+'s binary search): the next group of undecided
   features is first attacked (PGD from the known counterexamples and random starts), then
   bounded by float-safe CROWN per rival class, and the rivals CROWN leaves open go to
   ReLU-split branch and bound (:mod:`app.properties.relu_bab`: alpha-CROWN root bounds,
   batched beta-CROWN sub-domains, over CROWN's bounds of each ReLU's input); a proof frees
   the group and doubles the next one, a failure halves it. A group of one is decided by the
   check itself (in the second pass the MILP of :mod:`.robust_milp` backs the branch and
   bound).
3. Sweeps: every counterexample found is projected onto the free set's box, a point near
   the decision boundary; from there each undecided feature is moved to the end of its
   interval the margin's gradient points to and attacked briefly inside the box "free set
   plus that feature". Every feature where the forward pass gives another class is kept
   with that witness, many at once. Whenever the free set grows, the most sensitive
   undecided features (the likeliest to break it) are attacked for such a counterexample.
4. Two passes: the first gives each check part of ``check_timeout_s`` (more after checks that
   ran out of time) and puts a feature it cannot decide aside; the second tries those again,
   against the larger free set, with the whole ``check_timeout_s``. At ``timeout_s`` the
   untried features get sweeps from the known counterexamples and one batched PGD search;
   the rest are kept as "sound, not proven irreducible".

* Soundness: the free set only ever grows by proven steps, so the final one is proven.
* Irreducibility: a kept feature comes with a counterexample (forward pass checked: another
  class) inside the box "free set at that time plus that feature", which lies inside the
  final free set's box plus that feature. Where no witness was found (time limit, an
  unsupported layer, or a complete check that could not decide), the feature is kept and
  marked "sound, not proven irreducible".
* Order: groups are freed in the sensitivity order and a witness stays valid as the free set
  grows, so without deferred features the result is sequential VeriX's; a deferred feature
  is decided against a larger free set than sequential VeriX would use (still sound, and
  irreducible where witnessed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from app.analyses.saliency import robust_milp
from app.bounds import analyze, float_safe, fold_last_layer, property_lower_bounds
from app.errors import InvalidInputError
from app.layers import ReLU
from app.network import Network
from app.progress import ProgressFn, report
from app.properties import relu_bab
from app.properties.vnnlib import Case

WITNESSED = "counterexample"
UNPROVEN = "sound, not proven irreducible"
MAX_GROUP = 64  # features one complete check may try to free together
QUICK_SHARE = 0.5  # of check_timeout_s for each check of the first pass at first
QUICK_GROWTH = 1.25  # that limit's factor after each check of that pass that ran out of time
FALSIFY_STARTS = 4  # random starts of the falsifier before each complete check
PROBE_LAST = 4  # most sensitive undecided features attacked whenever the free set grows
START_GROUP = 4  # group size after the bounds' prefix and after each single feature
BAB_SHARE = 0.5  # of a single feature's check time for branch and bound (the rest: MILP)
LEARN_STEPS, LEARN_STEP = 10, 0.05  # sweep attack: steps, first step (of a box's width)
SWEEP_ATTACK = 96  # boxes a sweep attacks (those whose start is nearest the boundary)
SWEEP_NEAR = 0.1  # ... whose start's margin is below this share of x's
DESCEND_DECAY = 0.85  # step factor per descent step
ATTACK_STEPS, ATTACK_RESTARTS = 40, 8
POOL = 8  # most recent counterexamples projected onto undecided features' boxes
FINAL_SHARE = 0.1  # of timeout_s kept for the last batched witness search
FINAL_CHUNK = 32  # boxes per batched attack in that search


@dataclass
class VerixResult:
    target: int
    eps: float
    input_range: tuple[float, float]
    explanation: np.ndarray  # bool shaped like x: the features fixed at x
    order: list[int]  # flat feature ids in the order they were tried
    freed: list[int]  # flat feature ids, in the order they were freed
    kept: dict[int, str]  # kept feature -> WITNESSED or UNPROVEN
    counterexamples: dict[int, np.ndarray]  # kept feature -> input shaped like x
    checks: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.explanation.sum())

    @property
    def irreducible(self) -> bool:
        """Every kept feature has a counterexample."""
        return all(v == WITNESSED for v in self.kept.values())


def verified_explanation(
    net: Network,
    x: Tensor | np.ndarray,
    eps: float,
    input_range: tuple[float, float] = (0.0, 1.0),
    timeout_s: float = 60.0,
    check_timeout_s: float = 5.0,
    progress: ProgressFn | None = None,
) -> VerixResult:
    """The VeriX explanation of ``net``'s predicted class at ``x`` for perturbations of at
    most ``eps`` (L-inf) inside ``input_range``. Near ``timeout_s`` the features not yet
    tried get one batched attack and are otherwise kept unproven (still sound); each complete
    check stops at ``check_timeout_s``.
    """
    start = time.monotonic()
    lo_r, hi_r = (float(v) for v in input_range)
    if not (np.isfinite(eps) and eps > 0 and np.isfinite(lo_r) and np.isfinite(hi_r)
            and lo_r < hi_r and timeout_s > 0 and check_timeout_s > 0):
        raise InvalidInputError("need eps > 0, a finite input range lo < hi and time-outs > 0")
    net = net.with_dtype(torch.float64).eval().requires_grad_(False)
    x = torch.as_tensor(x, dtype=torch.float64, device=net.device).reshape(net.input_shape)
    if not torch.isfinite(x).all():
        raise InvalidInputError("the input must be finite")
    with torch.no_grad():
        target = int(net(x[None])[0].argmax())
    lo_all = torch.minimum(x, (x - eps).clamp(lo_r, hi_r))
    hi_all = torch.maximum(x, (x + eps).clamp(lo_r, hi_r))
    search = _Search(net, x, lo_all, hi_all, target, progress)
    search.bounds_prefix()
    timings = {"bounds_s": time.monotonic() - start}
    search.complete(start + timeout_s * (1 - FINAL_SHARE), check_timeout_s)
    timings["complete_s"] = time.monotonic() - start - timings["bounds_s"]
    search.finish(start + timeout_s)
    timings["total_s"] = time.monotonic() - start
    report(progress, 1.0, f"done: {len(search.kept)} features kept")
    return VerixResult(
        target=target, eps=float(eps), input_range=(lo_r, hi_r),
        explanation=(~search.free).reshape(x.shape).cpu().numpy(),
        order=search.order.tolist(), freed=search.freed, kept=search.kept,
        counterexamples={i: p.cpu().numpy() for i, p in search.examples.items()},
        checks=search.checks, timings=timings)


class _Search:
    """The free set, the decisions so far and the counterexamples found."""

    def __init__(self, net: Network, x: Tensor, lo: Tensor, hi: Tensor, target: int,
                 progress: ProgressFn | None) -> None:
        self.net, self.x, self.lo, self.hi, self.target = net, x, lo, hi, target
        self.progress = progress
        self.order = _sensitivity_order(net, x, lo, hi, target)
        with torch.no_grad():
            self.margin = float(_margin(net, x[None], target)[0])
        self.n = self.order.numel()
        self.free = torch.zeros(self.n, dtype=torch.bool, device=x.device)
        self.freed: list[int] = []
        self.kept: dict[int, str] = {}
        self.examples: dict[int, Tensor] = {}
        self.pool: list[Tensor] = []
        self.deferred: set[int] = set()  # features the quick pass could not decide
        self.milp = robust_milp.supported(net)
        self.bab = relu_bab.supports(net) and x.device.type == "cpu"
        self.dense = _Dense.of(net) if self.bab else None
        self.checks = {"bound_checks": 0, "robust_groups": 0, "failed_groups": 0,
                       "complete_robust": 0, "complete_counterexamples": 0,
                       "attack_counterexamples": 0, "reused_counterexamples": 0,
                       "attack_falsified": 0, "sweep_counterexamples": 0,
                       "probe_counterexamples": 0, "undecided": 0, "unchecked": 0}

    def undecided(self) -> Tensor:
        """Undecided feature ids in the search order."""
        done = self.free.clone()
        if self.kept:
            done[torch.tensor(list(self.kept), device=done.device)] = True
        return self.order[~done[self.order]]

    def _with(self, features: Tensor) -> Tensor:
        mask = self.free.clone()
        mask[features] = True
        return mask

    def _free(self, features: Tensor) -> None:
        self.free[features] = True
        self.freed += features.tolist()

    def _keep(self, i: int, point: Tensor, how: str) -> None:
        self.kept[i] = WITNESSED
        self.examples[i] = point
        self.checks[how] += 1

    def bounds_prefix(self) -> None:
        """Free the longest order prefix CROWN proves (doubling, then bisection): each
        freed prefix is proven itself, nothing is inferred from a neighbour."""
        good, bad, k = 0, self.n + 1, min(8, self.n)
        while good < k < bad:
            if self._proven(self.order[:k]):
                good = k
            else:
                bad = k
            k = min(2 * good, self.n) if bad > self.n else (good + bad) // 2
        if good:
            self._free(self.order[:good])

    def _proven(self, features: Tensor) -> bool:
        self.checks["bound_checks"] += 1
        return bool(_proven(self.net, self.x, self.lo, self.hi, self._with(features)[None],
                            self.target)[0])

    def complete(self, deadline: float, check_timeout_s: float) -> None:
        """VeriX+ groups: a complete check frees the next ``group`` undecided features (the
        group doubles) or gives a counterexample, which witnesses every undecided feature it
        can (:meth:`_learn`); the group then halves unless that kept one of its own features.
        A group of one is decided by the check itself: freed, or kept with the check's
        counterexample. Two passes: the first gives each check ``QUICK_SHARE`` of
        ``check_timeout_s`` (longer after each check that ran out of time, up to all of it)
        and puts a feature it cannot decide aside; the second tries those
        again (against the larger free set) with the whole ``check_timeout_s`` and the MILP,
        and keeps what it cannot decide as "sound, not proven irreducible"."""
        for quick in (True, False):
            limit = check_timeout_s * (QUICK_SHARE if quick else 1.0)
            group = START_GROUP
            while time.monotonic() < deadline:
                rest = self.undecided()
                if quick and self.deferred:
                    rest = rest[~torch.isin(rest, torch.tensor(sorted(self.deferred),
                                                             device=rest.device))]
                if not rest.numel():
                    break
                report(self.progress, 1 - rest.numel() / self.n, f"{len(self.freed)} freed, "
                       f"{len(self.kept)} kept, {rest.numel()} to decide")
                several = rest[:group]
                single = several.numel() == 1
                until = min(deadline, time.monotonic() + limit)
                verdict, point = self._check(self._with(several), until, single, milp=not quick)
                if verdict == robust_milp.ROBUST:
                    self.checks["robust_groups" if not single else "complete_robust"] += 1
                    self._free(several)
                    group = min(MAX_GROUP, 2 * group)
                    self._probe_attack()
                    continue
                if verdict == robust_milp.UNKNOWN and quick:
                    # checks running out of time: a slow (or busy) machine, longer ones
                    limit = min(check_timeout_s, limit * QUICK_GROWTH)
                if single:
                    i = int(several[0])
                    if verdict == robust_milp.COUNTEREXAMPLE:
                        self._keep(i, point, "complete_counterexamples")
                        self._learn(point)
                    elif quick:
                        self.deferred.add(i)
                    else:
                        self.kept[i] = UNPROVEN
                        self.checks["undecided"] += 1
                    group = START_GROUP
                    continue
                self.checks["failed_groups"] += 1
                hit = self._learn(point) if point is not None else set()
                if not hit.intersection(several.tolist()):
                    group = max(1, group // 2)

    def _probe_attack(self) -> None:
        """After the free set grew: attack the boxes "free plus one of the ``PROBE_LAST`` most
        sensitive undecided features" (random starts and the known counterexamples); the
        first counterexample found is kept as a witness and swept from."""
        rest = self.undecided()[-PROBE_LAST:]
        if not rest.numel():
            return
        starts = [torch.stack(self.pool)] if self.pool else []
        gen = torch.Generator(device="cpu").manual_seed(len(self.freed))
        for r in range(rest.numel()):
            box_lo, box_hi = (t[0] for t in _box(self.x, self.lo, self.hi,
                                                 self._with(rest[r: r + 1])[None]))
            noise = torch.rand((2, *self.x.shape), generator=gen, dtype=self.x.dtype,
                               device="cpu")
            z = torch.cat(starts + [box_lo + (box_hi - box_lo) * noise.to(self.x.device)])
            found = _descend(self.net, box_lo.expand_as(z), box_hi.expand_as(z), z, self.target)
            point = next((p for p in found if p is not None), None)
            if point is not None:
                self._keep(int(rest[r]), point, "probe_counterexamples")
                self._learn(point)
                return

    def _check(self, mask: Tensor, deadline: float, single: bool,
               milp: bool = True) -> tuple[str, Tensor | None]:
        """The box "free set ``mask``": ReLU-split branch and bound (alpha-CROWN root bounds,
        then beta-CROWN sub-domains), then, for a single feature still undecided, the MILP;
        ``(verdict, point)`` with a forward-checked point for COUNTEREXAMPLE (and possibly for
        UNKNOWN: an input of another class in the box found on the way)."""
        box_lo, box_hi = (t[0] for t in _box(self.x, self.lo, self.hi, mask[None]))
        # a cheap falsifier first: descend from the known counterexamples and random starts
        gen = torch.Generator(device="cpu").manual_seed(len(self.freed) + len(self.kept))
        noise = torch.rand((FALSIFY_STARTS, *self.x.shape), generator=gen, dtype=self.x.dtype,
                           device="cpu")
        starts = torch.cat(([torch.stack(self.pool)] if self.pool else [])
                           + [box_lo + (box_hi - box_lo) * noise.to(self.x.device)])
        found = _descend(self.net, box_lo.expand_as(starts), box_hi.expand_as(starts), starts,
                         self.target)
        point = next((p for p in found if p is not None), None)
        if point is not None:
            self.checks["attack_falsified"] += 1
            return robust_milp.COUNTEREXAMPLE, point
        verdict, point = robust_milp.UNKNOWN, None
        if self.bab:
            use_milp = milp and single and self.milp
            share = deadline if not use_milp else \
                time.monotonic() + BAB_SHARE * (deadline - time.monotonic())
            if torch.get_default_device().type == "cpu":
                verdict, point = _bab(self.net, self.dense, box_lo, box_hi, self.target,
                                      share)
            else:  # relu_bab allocates on the default device (a device mode slows every
                # torch call, so it is entered only where needed)
                with torch.device("cpu"):
                    verdict, point = _bab(self.net, self.dense, box_lo, box_hi,
                                          self.target, share)
        if verdict == robust_milp.UNKNOWN and self.milp and (single and milp or not self.bab):
            outcome = robust_milp.check(self.net, box_lo, box_hi, self.target, deadline)
            verdict, point = outcome.verdict, outcome.point
        return verdict, point

    def _learn(self, point: Tensor) -> set[int]:
        """Remember a counterexample ``point`` and sweep the undecided features with it: its
        projection ``z`` onto the box of the free set (a point near the decision boundary)
        with one feature moved to the end of its interval the margin's gradient at ``z``
        points to, then a short attack from there; every undecided feature whose box "free
        plus it" so holds an input of another class (forward pass) is kept with that witness.
        Returns the features so kept."""
        self.pool = (self.pool + [point])[-POOL:]
        return self._sweep(point)

    def _sweep(self, point: Tensor) -> set[int]:
        rest = self.undecided()
        hit: set[int] = set()
        if not rest.numel():
            return hit
        z = torch.where(self.free.reshape(self.x.shape), point, self.x).requires_grad_(True)
        grad = torch.autograd.grad(_margin(self.net, z[None], self.target).sum(), z)[0]
        z = z.detach()
        rows = torch.arange(rest.numel(), device=rest.device)
        masks = self.free.repeat(rest.numel(), 1)
        masks[rows, rest] = True
        box_lo, box_hi = _box(self.x, self.lo, self.hi, masks)
        starts = z.expand_as(box_lo).clone()
        ends = torch.where(grad.reshape(-1)[rest] > 0, self.lo.reshape(-1)[rest],
                           self.hi.reshape(-1)[rest])
        starts.reshape(rest.numel(), -1)[rows, rest] = ends
        with torch.no_grad():
            margin = _margin(self.net, starts, self.target)
        # the attack only from the SWEEP_ATTACK starts nearest the boundary, and only where
        # their margin is below SWEEP_NEAR times x's (the others are checked as they are)
        near = margin.argsort()[:SWEEP_ATTACK]
        near = near[margin[near] < SWEEP_NEAR * self.margin]
        points = [None] * rest.numel()
        if near.numel():
            for r, p in zip(near.tolist(), _descend(self.net, box_lo[near], box_hi[near],
                                                    starts[near], self.target, LEARN_STEPS,
                                                    first_step=LEARN_STEP), strict=True):
                points[r] = p
        for r in torch.nonzero(margin < 0).reshape(-1).tolist():
            if points[r] is None and int(self.net(starts[r][None]).argmax()) != self.target:
                points[r] = starts[r]
        for r, p in enumerate(points):
            if p is not None:
                self._keep(int(rest[r]), p, "sweep_counterexamples")
                hit.add(int(rest[r]))
        return hit

    def finish(self, deadline: float) -> None:
        """Untried features: sweeps from the known counterexamples (newest first, projected
        onto the final free set's box), then batched attacks for witnesses until ``deadline``;
        the rest are kept unproven."""
        for point in reversed(list(self.pool)):
            if time.monotonic() >= deadline or not self.undecided().numel():
                break
            self._sweep(point)
        rest = self.undecided().tolist()
        for chunk in range(0, len(rest), FINAL_CHUNK):
            if time.monotonic() >= deadline:
                break
            part = torch.tensor(rest[chunk: chunk + FINAL_CHUNK], device=self.free.device)
            masks = self.free.repeat(part.numel(), 1)
            masks[torch.arange(part.numel(), device=masks.device), part] = True
            box_lo, box_hi = _box(self.x, self.lo, self.hi, masks)
            points = attack_batch(self.net, box_lo, box_hi, self.target, restarts=2)
            for r, i in enumerate(part.tolist()):
                if points[r] is not None:
                    self._keep(i, points[r], "attack_counterexamples")
        for i in self.undecided().tolist():
            self.kept[i] = UNPROVEN
            self.checks["unchecked"] += 1


def _sensitivity_order(net: Network, x: Tensor, lo: Tensor, hi: Tensor, target: int) -> Tensor:
    """Flat feature ids, least sensitive first: the class margin's drop when a feature alone
    moves to the end of its interval that hurts most (ties by id)."""
    n = x.numel()
    flat = x.reshape(1, -1).repeat(2 * n, 1)
    idx = torch.arange(n, device=x.device)
    flat[idx, idx] = lo.reshape(-1)
    flat[n + idx, idx] = hi.reshape(-1)
    with torch.no_grad():
        base = _margin(net, x[None], target)
        moved = torch.cat([_margin(net, part.reshape(-1, *x.shape), target)
                           for part in flat.split(512)])
    drop = base - torch.minimum(moved[:n], moved[n:])
    return torch.from_numpy(np.lexsort((np.arange(n), drop.cpu().numpy()))).to(x.device)


def _margin(net: Network, batch: Tensor, target: int) -> Tensor:
    """``logit_target - max_{j != target} logit_j`` per input (negative: another class)."""
    out = net(batch)
    others = out.clone()
    others[:, target] = -torch.inf
    return out[:, target] - others.max(1).values


def _box(x: Tensor, lo: Tensor, hi: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    shape = (masks.shape[0], *x.shape)
    m = masks.reshape(shape)
    return torch.where(m, lo, x), torch.where(m, hi, x)


def _proven(net: Network, x: Tensor, lo: Tensor, hi: Tensor, masks: Tensor,
            target: int) -> Tensor:
    """Per free-set mask: do float-safe CROWN bounds prove the class on its box?"""
    box_lo, box_hi = _box(x, lo, hi, masks)
    labels = torch.full((masks.shape[0],), target, dtype=torch.long, device=x.device)
    return (property_lower_bounds(net, box_lo, box_hi, labels, "crown") > 0).all(1)


@dataclass
class _Dense:
    """A chain of affine layers and ReLUs as dense float64 maps (``relu_bab.Chain`` without
    its bounds) and the nodes feeding each ReLU."""

    weights: list[Tensor]
    biases: list[Tensor]
    pre_relu: list[int]

    @classmethod
    def of(cls, net: Network) -> _Dense:
        weights, biases, pre = [], [], []
        cpu = {"dtype": torch.float64, "device": "cpu"}
        w = torch.eye(int(np.prod(net.input_shape)), **cpu)
        b = torch.zeros(w.shape[0], **cpu)
        shape = net.input_shape
        for i, layer in enumerate(net.layers):
            if isinstance(layer, ReLU):
                weights.append(w)
                biases.append(b)
                pre.append(i - 1)
                w = torch.eye(w.shape[0], **cpu)
                b = torch.zeros(w.shape[0], **cpu)
            else:
                a, c = (t.detach().to(torch.float64).cpu() for t in layer.matrix(shape))
                w, b = a @ w, a @ b + c.reshape(-1)
            shape = net.shapes[i]
        return cls(weights + [w], biases + [b], pre)


def _bab(net: Network, dense: _Dense, lo: Tensor, hi: Tensor, target: int,
         deadline: float) -> tuple[str, Tensor | None]:
    """Is every input in ``[lo, hi]`` classified ``target``? Float-safe CROWN bounds first,
    then ReLU-split branch and bound (:mod:`app.properties.relu_bab`: alpha-CROWN root bounds,
    batched beta-CROWN sub-domains, over CROWN's bounds of each ReLU's input) on one case per
    rival class CROWN does not exclude; a counterexample only once the forward pass
    classifies it otherwise."""
    left = deadline - time.monotonic()
    if left <= 0:
        return robust_milp.UNKNOWN, None
    n_out = net.num_outputs
    rivals = [j for j in range(n_out) if j != target]
    spec = torch.zeros((1, n_out - 1, n_out), dtype=torch.float64)
    spec[0, :, target] = 1.0
    spec[0, torch.arange(n_out - 1), rivals] = -1.0
    offset = spec.new_zeros((1, n_out - 1))
    with torch.no_grad():  # CROWN's bounds of each ReLU's input (computed on demand)
        crown = analyze(net, lo[None], hi[None], "crown")
        lower, upper = zip(*((b[0].reshape(-1), c[0].reshape(-1))
                             for b, c in (crown.bounds(k) for k in dense.pre_relu)), strict=True)
        # bounds first: rivals CROWN already excludes (float-safe) need no branching
        node, folded, bias = fold_last_layer(net, spec)
        safe = float_safe(net, lo[None], hi[None], spec, offset, "crown",
                          crown.lower(node, folded, bias))[0]
    open_ = torch.nonzero(safe <= 0).reshape(-1).tolist()
    if not open_:
        return robust_milp.ROBUST, None
    flat_lo, flat_hi = lo.reshape(-1).numpy(), hi.reshape(-1).numpy()
    cases = [Case(flat_lo, flat_hi, spec[0, k: k + 1].numpy(), np.zeros(1)) for k in open_]
    ch = relu_bab.Chain(dense.weights, dense.biases, list(lower), list(upper))

    def other_class(_k: int, point: Tensor) -> bool:
        with torch.no_grad():
            return int(net(point.reshape(1, *lo.shape)).argmax()) != target

    res = relu_bab.refute(net, cases, ch, deadline, None, other_class)
    if res.status == "refuted":
        return robust_milp.ROBUST, None
    if res.status == "counterexample" and other_class(0, res.point):
        return robust_milp.COUNTEREXAMPLE, res.point.reshape(lo.shape).clone()
    return robust_milp.UNKNOWN, None


def _descend(net: Network, lo: Tensor, hi: Tensor, start: Tensor, target: int,
             steps: int = LEARN_STEPS, first_step: float = 0.5) -> list[Tensor | None]:
    """Signed-gradient descent on the class margin from one start per box ``[B, *shape]``
    (steps of ``first_step`` times the box's width, shrinking); per box a point inside it
    of another class (forward pass) or ``None``. Boxes done leave the batch."""
    z, step = torch.minimum(torch.maximum(start, lo), hi).detach().clone(), (hi - lo) * first_step
    best = z.detach().clone()
    with torch.no_grad():
        found = net(z).argmax(1) != target
    for _ in range(steps):
        todo = torch.nonzero(~found).reshape(-1)
        if not todo.numel():
            break
        part = z[todo].detach().requires_grad_(True)
        grad = torch.autograd.grad(_margin(net, part, target).sum(), part)[0]
        part = torch.minimum(torch.maximum(part.detach() - step[todo] * grad.sign(), lo[todo]),
                             hi[todo])
        z[todo] = part
        step = step * DESCEND_DECAY
        with torch.no_grad():
            wrong = net(part).argmax(1) != target
        best[todo[wrong]] = part[wrong]
        found[todo[wrong]] = True
    return [best[k] if bool(found[k]) else None for k in range(lo.shape[0])]


def attack(net: Network, lo: Tensor, hi: Tensor, target: int, seed: int = 0,
           starts: list[Tensor] | None = None) -> Tensor | None:
    """Box-constrained PGD on the class margin (random starts plus ``starts``, signed steps
    that shrink); an input in ``[lo, hi]`` the network classifies otherwise, or ``None``."""
    return attack_batch(net, lo[None], hi[None], target, seed, starts)[0]


def attack_batch(net: Network, lo: Tensor, hi: Tensor, target: int, seed: int = 0,
                 starts: list[Tensor] | None = None,
                 restarts: int = ATTACK_RESTARTS) -> list[Tensor | None]:
    """:func:`attack` on a batch of boxes ``[B, *shape]`` at once (``starts``: points
    projected onto every box)."""
    b, shape = lo.shape[0], lo.shape[1:]
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same starts on any device
    noise = torch.rand((restarts, b, *shape), generator=gen, dtype=lo.dtype)
    z = lo + (hi - lo) * noise.to(lo.device)
    if starts:
        z = torch.cat([z, torch.stack([torch.minimum(torch.maximum(p, lo), hi)
                                       for p in starts])])
    box_lo, box_hi = lo.expand_as(z).reshape(-1, *shape), hi.expand_as(z).reshape(-1, *shape)
    z = z.reshape(-1, *shape)
    step = (box_hi - box_lo) / 2
    for _ in range(ATTACK_STEPS):
        z.requires_grad_(True)
        margin = _margin(net, z, target)
        if (margin < 0).reshape(-1, b).any(0).all():
            break
        grad = torch.autograd.grad(margin.sum(), z)[0]
        z = torch.minimum(torch.maximum(z.detach() - step * grad.sign(), box_lo), box_hi)
        step = step * 0.85
    with torch.no_grad():
        z = z.detach().reshape(-1, b, *shape)
        wrong = (net(z.reshape(-1, *shape)).argmax(1) != target).reshape(-1, b)
    first = wrong.to(torch.int8).argmax(0).tolist()
    hit = wrong.any(0).tolist()
    return [z[first[k], k] if hit[k] else None for k in range(b)]


__all__ = ["UNPROVEN", "WITNESSED", "VerixResult", "attack", "attack_batch",
           "verified_explanation"]
