"""Verify a layer property: every input in a domain whose pattern satisfies a rule gets its class.

For each rival class ``j`` one MILP maximises ``y_j - y_target`` (``y_target - y_j`` for
lowest-score properties) over inputs in the domain satisfying the rule's premise. All maxima
below ``-TOLERANCE`` (relative to the logits' scale: the encoding is scaled) prove the rule; a
positive one gives a candidate that float64 forward passes must confirm before it is reported
as a counterexample; a time-out, or a maximum within the tolerance of 0, leaves it unknown.
The solver's "no input satisfies the premise" is only believed when no known input (the
caller's, the domain's centre, uniform samples) satisfies it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from app.analyses.patterns.milp import Phases, encode, satisfies
from app.analyses.patterns.rules import Rule
from app.analyses.patterns.split import split_check
from app.errors import InvalidInputError
from app.network import Network
from app.progress import ProgressFn, report

Status = Literal["proven", "counterexample", "unknown"]
Method = Literal["auto", "milp", "split"]
SPLIT_MAX_INPUTS = 16  # "auto" splits the input box up to this many input dimensions
TOLERANCE = 1e-6  # score gaps, relative to the logits' scale, that the solver cannot tell from 0
MARGIN = 1e-4  # distance (relative) from pattern and decision boundaries of a repaired candidate


@dataclass(frozen=True)
class InputDomain:
    """A box of inputs ``lo <= x <= hi`` (shape ``input_shape``): a pixel range or an eps-ball."""

    lo: Tensor
    hi: Tensor

    @classmethod
    def of(cls, net: Network, domain: InputDomain | tuple[float | Tensor, float | Tensor]
           ) -> InputDomain:
        """``domain`` itself, or the box ``(lo, hi)`` it names (what the verbs accept)."""
        if isinstance(domain, InputDomain):
            return domain
        lo, hi = domain
        return cls.box(net, lo, hi)

    @classmethod
    def box(cls, net: Network, lo: float | Tensor, hi: float | Tensor) -> InputDomain:
        shape = net.input_shape
        lo_t = torch.as_tensor(lo, dtype=torch.float64).expand(shape).clone()
        hi_t = torch.as_tensor(hi, dtype=torch.float64).expand(shape).clone()
        if bool((lo_t > hi_t).any()):
            raise InvalidInputError("input domain is empty: some lower bound exceeds its upper")
        return cls(lo_t, hi_t)

    @classmethod
    def linf_ball(
        cls, net: Network, x: Tensor, eps: float, clip: tuple[float, float] | None = (0.0, 1.0)
    ) -> InputDomain:
        x = x.to(torch.float64).reshape(net.input_shape)
        lo, hi = x - eps, x + eps
        if clip is not None:
            lo, hi = lo.clamp(*clip), hi.clamp(*clip)
        return cls.box(net, lo, hi)

    def contains(self, x: Tensor) -> Tensor:
        """Which inputs of the batch ``x`` lie in the domain (float tolerance 1e-9)."""
        flat = x.to(torch.float64).reshape(x.shape[0], -1)
        lo, hi = self.lo.reshape(1, -1), self.hi.reshape(1, -1)
        return ((flat >= lo - 1e-9) & (flat <= hi + 1e-9)).all(1)


@dataclass
class Verdict:
    """Outcome of one verification, with the forward-pass-confirmed counterexample if any."""

    status: Status
    seconds: float
    message: str
    counterexample: Tensor | None = None
    counterexample_class: int | None = None
    worst_margin: float | None = None  # max over rivals of the score gap (<= 0 when proven)


def verify_rule(
    net: Network,
    rule: Rule,
    input_domain: InputDomain | tuple[float | Tensor, float | Tensor],
    timeout: float = 30.0,
    method: Method = "auto",
    progress: ProgressFn | None = None,
    known: Tensor | None = None,
) -> Verdict:
    """Prove ``rule`` on ``input_domain``, refute it with a confirmed input, or say unknown.

    ``method``: ``"milp"`` solves one MILP over the whole domain; ``"split"`` splits the
    input box (branch and bound, MILP on small leaves), which wins on few inputs such as
    ACAS Xu's; ``"auto"`` splits up to :data:`SPLIT_MAX_INPUTS` input dimensions.
    ``known``: inputs (e.g. the covered input a ball is centred on) that the solver's
    verdicts are cross-checked against.
    """
    domain = InputDomain.of(net, input_domain)
    _check_pattern_rule(rule)
    return check_property(net, {rule.node: (rule.on, rule.off)}, domain, rule.target,
                          rule.lowest, timeout, method=method, progress=progress, known=known)


def verify_rules(
    net: Network,
    rules: list[Rule],
    input_domain: InputDomain | tuple[float | Tensor, float | Tensor],
    timeout: float = 30.0,
    progress: ProgressFn | None = None,
    method: Method = "auto",
) -> list[Verdict]:
    """:func:`verify_rule` for each rule in turn, reporting progress between rules."""
    domain = InputDomain.of(net, input_domain)
    net64 = net.with_dtype(torch.float64)
    verdicts = []
    for k, rule in enumerate(rules):
        _check_pattern_rule(rule)
        report(progress, k / max(1, len(rules)), f"verifying rule {k + 1} of {len(rules)}")
        verdicts.append(check_property(net, {rule.node: (rule.on, rule.off)}, domain,
                                       rule.target, rule.lowest, timeout, net64=net64,
                                       method=method))
    report(progress, 1.0, f"verified {len(rules)} rules")
    return verdicts


def check_property(
    net: Network,
    phases: Phases,
    domain: InputDomain,
    target: int,
    lowest: bool,
    timeout: float,
    net64: Network | None = None,
    method: Method = "milp",
    progress: ProgressFn | None = None,
    known: Tensor | None = None,
) -> Verdict:
    """Does every input of ``domain`` with the fixed ``phases`` get decision ``target``?

    ``known``: inputs to cross-check the solver against (those outside the domain are
    ignored); the domain's centre and uniform samples are always used too.
    """
    start = time.perf_counter()
    if not 0 <= target < net.num_outputs:
        raise InvalidInputError(f"target {target} is not a class of this {net.num_outputs}-way model")
    net64 = net64 if net64 is not None else net.with_dtype(torch.float64)
    if method == "split" or (method == "auto" and math.prod(net.input_shape) <= SPLIT_MAX_INPUTS):
        return _check_by_splitting(net, net64, phases, domain, target, lowest, timeout, progress,
                                   known)
    found, witness = _falsify(net, net64, phases, domain, target, lowest, known)
    if found is not None:
        return Verdict("counterexample", time.perf_counter() - start,
                       f"class {found[1]} wins instead of {target} (found by sampling)", *found)
    enc = encode(net64, domain.lo, domain.hi, phases, deadline=start + timeout / 2)
    out_lo, out_hi = enc.output_bounds
    scale = enc.output_scale
    rivals = [j for j in range(net.num_outputs) if j != target]
    # rivals whose interval gap is clearly < 0 need no MILP; hardest rivals first
    gap = {j: (out_hi[j] - out_lo[target]) if not lowest else (out_hi[target] - out_lo[j])
           for j in rivals}
    open_rivals = sorted((j for j in rivals if gap[j] > -TOLERANCE * scale), key=lambda j: -gap[j])
    worst = max((gap[j] for j in rivals if j not in open_rivals), default=-math.inf)
    timed_out = unconfirmed = tie = False
    for j in open_rivals:
        left = timeout - (time.perf_counter() - start)
        if left <= 0:
            timed_out = True
            break
        res = enc.program.solve(_objective(enc, j, target, lowest), left)
        if res.status == 2:
            return _infeasible(start, witness)
        bound = _upper_bound(res)  # of the gap over the output scale
        if res.x is not None and res.fun is not None and res.fun > TOLERANCE:
            found = confirm_counterexample(net, net64, enc.inputs(res.x), phases, target,
                                           lowest, domain, toward=witness)
            if found is None:
                found = _repair(net, net64, phases, domain, j, target, lowest, left, witness)
            if found is not None:
                x, cls = found
                return Verdict("counterexample", time.perf_counter() - start,
                               f"class {cls} wins instead of {target}", x, cls,
                               float(res.fun) * scale)
            unconfirmed = True
        if res.status != 0 or bound is None or bound > TOLERANCE:
            timed_out = True
            continue
        if bound > -TOLERANCE:
            tie = True  # optimal, but too close to 0 to tell which class wins
            continue
        worst = max(worst, bound * scale)
    seconds = time.perf_counter() - start
    if unconfirmed:
        return Verdict("unknown", seconds, "the solver's candidate counterexample did not survive "
                       "a forward pass (numerically on a boundary)")
    if timed_out:
        return Verdict("unknown", seconds, f"solver stopped after {seconds:.1f}s without an answer")
    if tie:
        return Verdict("unknown", seconds, "the largest score gap of a rival is within the "
                       f"solver's tolerance ({TOLERANCE:g} of the logits' scale {scale:.3g}) of 0")
    return Verdict("proven", seconds, "holds on every input of the domain satisfying the premise",
                   worst_margin=float(worst))


def _infeasible(start: float, witness: Tensor | None) -> Verdict:
    """The solver found no input satisfying the premise: a proof only if none is known."""
    seconds = time.perf_counter() - start
    if witness is not None:
        return Verdict("unknown", seconds, "the solver reports that no input of the domain "
                       "satisfies the premise, but a known input does (numerical trouble)")
    return Verdict("proven", seconds, "no input in the domain satisfies the premise (solver; "
                   "no known or sampled input does either)", worst_margin=None)


def _check_by_splitting(net, net64, phases, domain, target, lowest, timeout, progress,
                        known) -> Verdict:
    start = time.perf_counter()

    def leaf_check(lo: Tensor, hi: Tensor, seconds: float):
        leaf = InputDomain(lo.reshape(net.input_shape), hi.reshape(net.input_shape))
        v = check_property(net, phases, leaf, target, lowest, seconds, net64=net64, known=known)
        found = None if v.counterexample is None else (v.counterexample, v.counterexample_class)
        return v.status, found

    def confirm(x: np.ndarray, lo: Tensor, hi: Tensor):
        box = InputDomain(lo.reshape(net.input_shape), hi.reshape(net.input_shape))
        return confirm_counterexample(net, net64, x, phases, target, lowest, box)

    status, message, found, worst = split_check(
        net, net64, phases, domain.lo, domain.hi, target, lowest, timeout, leaf_check, confirm,
        progress)
    seconds = time.perf_counter() - start
    if found is not None:
        x, cls = found
        return Verdict("counterexample", seconds, f"class {cls} wins instead of {target} "
                       f"({message})", x, cls)
    margin = None if worst is None or not math.isfinite(worst) else worst
    return Verdict(status, seconds, message, worst_margin=margin)


def _falsify(net, net64, phases, domain, target, lowest, known=None, samples: int = 2048):
    """``(counterexample, witness)`` from the known inputs in the domain, its centre and
    uniform samples: a confirmed counterexample if one is that easy to find, and an input
    that satisfies the premise (``None`` when none does)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.rand((samples, *net.input_shape), generator=gen, dtype=torch.float64)
    xs = torch.cat([((domain.lo + domain.hi) / 2).unsqueeze(0),
                    domain.lo + (domain.hi - domain.lo) * u])
    if known is not None:
        given = known.to(torch.float64).reshape(-1, *net.input_shape)
        xs = torch.cat([given[domain.contains(given)], xs])
    with torch.no_grad():
        outs = net64.trace(xs)
    premise = satisfies(net64, outs, xs, phases)
    witness = xs[premise][:1] if bool(premise.any()) else None
    y = outs[-1].reshape(xs.shape[0], -1)
    ok = premise & ((y.argmin(1) if lowest else y.argmax(1)) != target)
    for k in torch.nonzero(ok).reshape(-1)[:5].tolist():
        found = confirm_counterexample(net, net64, xs[k].reshape(-1).numpy(), phases, target,
                                       lowest, domain)
        if found is not None:
            return found, witness
    return None, witness


def _upper_bound(res) -> float | None:
    """Proven upper bound of the maximised objective (HiGHS' dual bound; LP: the optimum)."""
    dual = getattr(res, "mip_dual_bound", None)
    if dual is not None and np.isfinite(dual):
        return float(-dual)
    return float(res.fun) if res.status == 0 and res.fun is not None else None


def _objective(enc, rival: int, target: int, lowest: bool) -> np.ndarray:
    """How far ``rival`` beats ``target`` (the reverse when the lowest score decides)."""
    sign = -1.0 if lowest else 1.0
    objective = np.zeros(enc.program.size)
    objective[enc.nodes[-1][rival]] += sign
    objective[enc.nodes[-1][target]] -= sign
    return objective


def _repair(net, net64, phases, domain, rival, target, lowest, left, witness=None):
    """Re-solve with margins so the candidate sits strictly inside the pattern and the flip.

    The margin encoding has its own variables, so the objective is built on it afresh.
    """
    enc = encode(net64, domain.lo, domain.hi, phases, margin=MARGIN, tighten=False)
    res = enc.program.solve(_objective(enc, rival, target, lowest), max(0.5, left))
    if res.x is None or res.fun is None or res.fun <= MARGIN:
        return None
    return confirm_counterexample(net, net64, enc.inputs(res.x), phases, target, lowest,
                                  domain, toward=witness)


def confirm_counterexample(net: Network, net64: Network, x_flat: np.ndarray | Tensor,
                           phases: Phases, target: int, lowest: bool, domain: InputDomain,
                           toward: Tensor | None = None) -> tuple[Tensor, int] | None:
    """``(x, class)``: ``x`` projected into the domain, in float64, when forward passes (float64
    and the model's dtype) confirm that it satisfies the premise and changes the decision.

    A solver's optimum lies on the boundary of the premise (a tie in a max-pool window, a
    pre-activation at 0); when ``toward`` (an input satisfying the premise) is given, points
    slightly towards it are tried too: inside a convex premise they leave the boundary.
    """
    x64 = torch.as_tensor(x_flat, dtype=torch.float64).reshape(1, *net.input_shape)
    x64 = torch.min(torch.max(x64, domain.lo.unsqueeze(0)), domain.hi.unsqueeze(0))
    found = _confirm_point(net, net64, x64, phases, target, lowest)
    if found is None and toward is not None:
        w = toward.to(torch.float64).reshape(1, *net.input_shape)
        for t in (1e-9, 1e-7, 1e-5, 1e-3):
            found = _confirm_point(net, net64, x64 + t * (w - x64), phases, target, lowest)
            if found is not None:
                break
    return found


def _confirm_point(net, net64, x64, phases, target, lowest) -> tuple[Tensor, int] | None:
    classes = []
    for model in (net64, net):
        x = x64.to(model.dtype)
        with torch.no_grad():
            outs = model.trace(x)
        if not bool(satisfies(model, outs, x, phases)[0]):
            return None
        y = outs[-1].reshape(-1)
        classes.append(int(y.argmin() if lowest else y.argmax()))
        if classes[-1] == target:
            return None
    return x64.reshape(net.input_shape), classes[0]


def _check_pattern_rule(rule: Rule) -> None:
    if not rule.is_pattern:
        raise InvalidInputError("only on/off pattern rules can be verified, not rules with "
                                "thresholds (those come from a distilled rule list)")


__all__ = ["InputDomain", "Verdict", "check_property", "verify_rule", "verify_rules"]
