"""Verified explanations (VeriX: Wu, Wu & Barrett, NeurIPS 2023; VeriX+ 2024): a set ``E`` of
input features such that *every* input equal to ``x`` on ``E`` and within ``eps`` of ``x``
elsewhere (inside the input range) keeps the predicted class.

Features are freed one at a time, least sensitive first (sensitivity: how far the class
margin drops when that feature alone moves to either end of its interval). A feature is freed
when the box "current free set plus it" is proven robust; otherwise it stays in ``E``.

* Proofs: the engine's float-safe CROWN bounds first (:func:`app.bounds.property_lower_bounds`)
  on a group of the next features, doubling while it proves and halving when it does not
  (VeriX+-style binary search), then where they are
  inconclusive a MILP (HiGHS, big-M from CROWN bounds; :mod:`.robust_milp`, sequential
  affine/ReLU networks) on a group of the next features (doubling while it proves, halving
  when it does not), and for a single feature a complete check: a box-constrained PGD attack,
  then the MILP. A MILP proof: no input with a rival margin below ``1e-5`` of the logits' scale.
* Soundness: the free set only ever grows by proven steps, so the final one is proven.
* Irreducibility: a kept feature comes with a counterexample (forward pass checked: another
  class) inside the box "free set at that time plus that feature", which lies inside the
  final free set's box plus that feature. Where the complete check cannot decide (time limit,
  or an unsupported layer), the feature is kept and marked "sound, not proven irreducible".
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
FIRST_BATCH, MAX_BATCH = 8, 512
MAX_GROUP = 64  # features one MILP may try to free together
ATTACK_STEPS, ATTACK_RESTARTS = 40, 8


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
    most ``eps`` (L-inf) inside ``input_range``. After ``timeout_s`` the features not yet
    tried are kept unchecked (still sound); each complete check stops at ``check_timeout_s``.
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
    order = _sensitivity_order(net, x, lo_all, hi_all, target)
    n = order.numel()
    free = torch.zeros(n, dtype=torch.bool, device=x.device)
    freed: list[int] = []
    kept: dict[int, str] = {}
    examples: dict[int, np.ndarray] = {}
    checks = {"bound_batches": 0, "attack_counterexamples": 0, "milp_robust": 0,
              "milp_counterexamples": 0, "undecided": 0, "unchecked": 0,
              "milp_robust_groups": 0, "milp_failed_groups": 0}
    deadline = start + timeout_s
    pos, batch, group, bounds_failed = 0, FIRST_BATCH, 2, False
    milp = robust_milp.supported(net)
    while pos < n:
        if time.monotonic() >= deadline:
            for i in order[pos:].tolist():
                kept[i] = UNPROVEN
            checks["unchecked"] = n - pos
            break
        report(progress, pos / n, f"feature {pos} of {n}: {len(freed)} freed, {len(kept)} kept")
        if not bounds_failed:
            cand = order[pos: pos + batch]
            mask = free.clone()
            mask[cand] = True
            checks["bound_batches"] += 1
            if bool(_proven(net, x, lo_all, hi_all, mask[None], target)[0]):
                free[cand] = True
                freed += cand.tolist()
                pos += len(cand)
                batch = min(MAX_BATCH, batch * 2)
                continue
            if len(cand) > 1:  # binary search for the first feature the bounds cannot free
                batch = len(cand) // 2
                continue
        bounds_failed = False
        several = order[pos: pos + group]
        if milp and len(several) > 1:  # VeriX+-style: one MILP may free a whole group
            mask = free.clone()
            mask[several] = True
            box_lo, box_hi = (t[0] for t in _box(x, lo_all, hi_all, mask[None]))
            outcome = robust_milp.check(net, box_lo, box_hi, target, min(
                deadline, time.monotonic() + check_timeout_s), prove_only=True)
            if outcome.verdict == robust_milp.ROBUST:
                checks["milp_robust_groups"] += 1
                free[several] = True
                freed += several.tolist()
                pos += len(several)
                group = min(MAX_GROUP, group * 2)
                batch = 1
                continue
            checks["milp_failed_groups"] += 1
            group, bounds_failed = group // 2, True
            continue
        i = int(order[pos])
        verdict, point, how = _complete(net, x, lo_all, hi_all, free, i, target,
                                        min(deadline, time.monotonic() + check_timeout_s))
        checks[how] += 1
        if verdict == robust_milp.ROBUST:
            free[i] = True
            freed.append(i)
        elif verdict == robust_milp.COUNTEREXAMPLE:
            kept[i] = WITNESSED
            examples[i] = point.cpu().numpy()
        else:
            kept[i] = UNPROVEN
        pos += 1
        batch, group = 1, 2
    report(progress, 1.0, f"done: {n - len(freed)} features kept")
    return VerixResult(
        target=target, eps=float(eps), input_range=(lo_r, hi_r),
        explanation=(~free).reshape(x.shape).cpu().numpy(), order=order.tolist(), freed=freed,
        kept=kept, counterexamples=examples, checks=checks,
        timings={"total_s": time.monotonic() - start})


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


def _complete(net: Network, x: Tensor, lo: Tensor, hi: Tensor, free: Tensor, i: int,
              target: int, deadline: float) -> tuple[str, Tensor | None, str]:
    """Decide the box "free plus feature ``i``": attack, then MILP where supported."""
    mask = free.clone()
    mask[i] = True
    box_lo, box_hi = (t[0] for t in _box(x, lo, hi, mask[None]))
    point = attack(net, box_lo, box_hi, target)
    if point is not None:
        return robust_milp.COUNTEREXAMPLE, point, "attack_counterexamples"
    if not robust_milp.supported(net):
        return robust_milp.UNKNOWN, None, "undecided"
    outcome = robust_milp.check(net, box_lo, box_hi, target, deadline)
    how = {robust_milp.ROBUST: "milp_robust", robust_milp.COUNTEREXAMPLE: "milp_counterexamples",
           robust_milp.UNKNOWN: "undecided"}[outcome.verdict]
    return outcome.verdict, outcome.point, how


def attack(net: Network, lo: Tensor, hi: Tensor, target: int, seed: int = 0) -> Tensor | None:
    """Box-constrained PGD on the class margin (random starts, signed steps that shrink);
    an input in ``[lo, hi]`` the network classifies otherwise, or ``None``."""
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same starts on any device
    z = lo + (hi - lo) * torch.rand((ATTACK_RESTARTS, *lo.shape), generator=gen,
                                    dtype=lo.dtype).to(lo.device)
    step = (hi - lo) / 2
    for _ in range(ATTACK_STEPS):
        z.requires_grad_(True)
        margin = _margin(net, z, target)
        if (margin < 0).any():
            break
        grad = torch.autograd.grad(margin.sum(), z)[0]
        z = torch.minimum(torch.maximum(z.detach() - step * grad.sign(), lo), hi)
        step = step * 0.85
    with torch.no_grad():
        z = z.detach()
        wrong = torch.nonzero(net(z).argmax(1) != target).reshape(-1)
    return z[wrong[0]] if wrong.numel() else None


__all__ = ["UNPROVEN", "WITNESSED", "VerixResult", "attack", "verified_explanation"]
