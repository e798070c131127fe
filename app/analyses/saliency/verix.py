"""Verified explanations (VeriX: Wu, Wu & Barrett, NeurIPS 2023; VeriX+ 2024): a set ``E`` of
input features such that *every* input equal to ``x`` on ``E`` and within ``eps`` of ``x``
elsewhere (inside the input range) keeps the predicted class.

Features are tried least sensitive first (sensitivity: how far the class margin drops when
that feature alone moves to either end of its interval). A feature is freed only when the box
"current free set plus it" is proven robust; otherwise it stays in ``E``. The search, cheapest
evidence first:

1. Bounds: the longest prefix of the order that the engine's float-safe CROWN bounds
   (:func:`app.bounds.property_lower_bounds`) prove, found by doubling then bisection.
2. Complete checks on groups (VeriX+'s binary search): a MILP (HiGHS, :mod:`.robust_milp`,
   sequential affine/ReLU networks) on the next group of undecided features, each call
   stopped at ``check_timeout_s``; a proof frees the group and doubles the next one, anything
   else halves it. A group of one is decided by PGD (random starts and the known
   counterexamples projected onto its box), then CROWN, then the MILP.
3. Counterexamples are reused: every counterexample found is projected onto each undecided
   feature's box "free set plus that feature"; where the forward pass gives another class,
   the feature is kept with that witness without any solver.
4. At ``timeout_s`` the untried features get one batched PGD search for witnesses; the rest
   are kept as "sound, not proven irreducible".

* Soundness: the free set only ever grows by proven steps, so the final one is proven.
* Irreducibility: a kept feature comes with a counterexample (forward pass checked: another
  class) inside the box "free set at that time plus that feature", which lies inside the
  final free set's box plus that feature. Where no witness was found (time limit, an
  unsupported layer, or a complete check that could not decide), the feature is kept and
  marked "sound, not proven irreducible".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from app.analyses.saliency import robust_milp
from app.bounds import property_lower_bounds
from app.errors import InvalidInputError
from app.network import Network
from app.progress import ProgressFn, report

WITNESSED = "counterexample"
UNPROVEN = "sound, not proven irreducible"
MAX_GROUP = 64  # features one MILP may try to free together
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
        self.n = self.order.numel()
        self.free = torch.zeros(self.n, dtype=torch.bool, device=x.device)
        self.freed: list[int] = []
        self.kept: dict[int, str] = {}
        self.examples: dict[int, Tensor] = {}
        self.pool: list[Tensor] = []
        self.milp = robust_milp.supported(net)
        self.checks = {"bound_checks": 0, "milp_robust_groups": 0, "milp_failed_groups": 0,
                       "attack_counterexamples": 0, "reused_counterexamples": 0,
                       "bound_robust": 0, "milp_robust": 0, "milp_counterexamples": 0,
                       "undecided": 0, "unchecked": 0}

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
        """VeriX+ groups: a MILP frees the next ``group`` undecided features or halves it."""
        group = 2
        while (rest := self.undecided()).numel() and time.monotonic() < deadline:
            report(self.progress, 1 - rest.numel() / self.n,
                   f"{len(self.freed)} freed, {len(self.kept)} kept, {rest.numel()} to decide")
            until = min(deadline, time.monotonic() + check_timeout_s)
            if self.milp and group > 1 and rest.numel() > 1:
                several = rest[:group]
                box_lo, box_hi = (t[0] for t in _box(self.x, self.lo, self.hi,
                                                     self._with(several)[None]))
                outcome = robust_milp.check(self.net, box_lo, box_hi, self.target, until)
                if outcome.verdict == robust_milp.ROBUST:
                    self.checks["milp_robust_groups"] += 1
                    self._free(several)
                    group = min(MAX_GROUP, 2 * group)
                    continue
                self.checks["milp_failed_groups"] += 1
                if outcome.point is not None:
                    self._learn(outcome.point)
                group //= 2
                continue
            self._single(int(rest[0]), until)
            group = 2

    def _single(self, i: int, deadline: float) -> None:
        """Decide the box "free plus ``i``": attack, CROWN, then the MILP where supported."""
        mask = self._with(torch.tensor([i], device=self.free.device))
        box_lo, box_hi = (t[0] for t in _box(self.x, self.lo, self.hi, mask[None]))
        starts = [torch.minimum(torch.maximum(p, box_lo), box_hi) for p in self.pool]
        point = attack(self.net, box_lo, box_hi, self.target, starts=starts)
        if point is not None:
            self._keep(i, point, "attack_counterexamples")
            self._learn(point)
            return
        if self._proven(torch.tensor([i], device=self.free.device)):
            self.checks["bound_robust"] += 1
            self._free(torch.tensor([i], device=self.free.device))
            return
        if not self.milp:
            self.kept[i] = UNPROVEN
            self.checks["undecided"] += 1
            return
        outcome = robust_milp.check(self.net, box_lo, box_hi, self.target, deadline)
        if outcome.verdict == robust_milp.ROBUST:
            self.checks["milp_robust"] += 1
            self._free(torch.tensor([i], device=self.free.device))
        elif outcome.verdict == robust_milp.COUNTEREXAMPLE:
            self._keep(i, outcome.point, "milp_counterexamples")
            self._learn(outcome.point)
        else:
            self.kept[i] = UNPROVEN
            self.checks["undecided"] += 1

    def _learn(self, point: Tensor) -> None:
        """Remember a counterexample and keep, with a witness, every undecided feature whose
        box "free plus it" holds the point's projection of another class."""
        self.pool = (self.pool + [point])[-POOL:]
        rest = self.undecided()
        if not rest.numel():
            return
        masks = self.free.repeat(rest.numel(), 1)
        masks[torch.arange(rest.numel(), device=masks.device), rest] = True
        box_lo, box_hi = _box(self.x, self.lo, self.hi, masks)
        for p in self.pool:
            proj = torch.minimum(torch.maximum(p, box_lo), box_hi)
            with torch.no_grad():
                wrong = self.net(proj).argmax(1) != self.target
            for r in torch.nonzero(wrong).reshape(-1).tolist():
                if int(rest[r]) not in self.kept:
                    self._keep(int(rest[r]), proj[r], "reused_counterexamples")

    def finish(self, deadline: float) -> None:
        """Untried features: batched attacks for witnesses until ``deadline``, the rest kept
        unproven."""
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
