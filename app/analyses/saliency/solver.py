"""The minimal-mask problem and its z3 solvers.

Because the first layer is affine, the selected neurons' pre-activations on the masked input
``mask ? x : baseline`` are *linear* in the mask booleans::

    pre_k(m) = const_k + sum_g m_g * coeff[g, k]      and we ask   pre_k(m) >= rhs_k.

Minimising ``sum_g m_g`` under these constraints is a 0-1 program (a multi-knapsack cover).
z3 on its own cannot prove such bounds in reasonable time (minutes on MNIST), so the encoding
gives it the LP relaxation's reasoning as implied constraints:

* scipy's LP relaxation gives a lower bound ``ceil(LP)`` and duals ``y >= 0``;
* the surrogate ``sum_g (s_g - 1) m_g >= Y - size`` with ``s = A y``, ``Y = sum(y)`` is implied
  by the constraints (``A`` = coefficients divided by each constraint's need) and lets z3's
  pseudo-boolean propagation do reduced-cost fixing.

Each constraint is scaled by ``2**20 / need`` and its coefficients rounded *up* (a
relaxation), so an ``unsat`` answer is a proof; every ``sat`` model is re-checked in float64 and
blocked if it only satisfies the rounded form. Two more facts keep the encoding small:

* Raising every mask bit with a positive coefficient raises every constraint's left side at
  once, so the problem is feasible iff the mask of all such groups satisfies it.
* A group whose coefficients are all ``<= 0`` never appears in a minimum mask (dropping it
  keeps every constraint), so only groups with some positive coefficient get a variable.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import z3
from scipy.optimize import linprog

OPTIMAL, TIMEOUT, INFEASIBLE = "optimal", "best found at time-out", "infeasible"
SOLVERS = ("bisection", "optimize")
SCALE = 2**20

Poll = Callable[[int, int, int], None]
"""``poll(iterations, best_size, lower_bound)``; may raise :class:`app.Cancelled`."""


@dataclass(frozen=True)
class MaskProblem:
    """``const + mask @ coeff >= rhs`` over boolean ``mask`` (one entry per feature group)."""

    coeff: np.ndarray  # [groups, constraints] float64
    const: np.ndarray  # [constraints]
    rhs: np.ndarray  # [constraints]

    def slack(self, mask: np.ndarray) -> np.ndarray:
        """Left side minus right side of each constraint for a boolean ``mask``."""
        return self.const + mask.astype(np.float64) @ self.coeff - self.rhs

    def holds(self, mask: np.ndarray) -> bool:
        return bool(np.all(self.slack(mask) >= 0))


@dataclass
class MaskSolution:
    mask: np.ndarray  # [groups] bool
    status: str  # OPTIMAL, TIMEOUT or INFEASIBLE
    iterations: int  # z3 check() calls
    lower_bound: int  # proven: no smaller mask satisfies the constraints
    solve_s: float


def greedy_mask(problem: MaskProblem, order: np.ndarray) -> np.ndarray:
    """An inclusion-minimal mask: start from every useful group, drop them in ``order``.

    Returns the drop order's survivors; every remaining group is needed by some constraint.
    """
    return _drop_in_order(problem, problem.coeff.max(axis=1) > 0, order)


def _drop_in_order(problem: MaskProblem, mask: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Drop ``mask``'s groups in ``order`` wherever every constraint keeps non-negative slack."""
    slack = problem.slack(mask)
    for g in order:
        if mask[g] and np.all(slack - problem.coeff[g] >= 0):
            mask[g] = False
            slack = slack - problem.coeff[g]
    return mask


def rounded_mask(problem: MaskProblem, lp_values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """LP rounding: add groups by LP value until the constraints hold, then drop extras."""
    mask = np.zeros(problem.coeff.shape[0], bool)
    for g in np.lexsort((np.argsort(order), -lp_values)):
        if problem.holds(mask):
            break
        mask[g] = True
    return _drop_in_order(problem, mask, order)


def solve_mask(
    problem: MaskProblem,
    timeout_s: float = 30.0,
    solver: str = "bisection",
    drop_order: np.ndarray | None = None,
    poll: Poll | None = None,
) -> MaskSolution:
    """The smallest mask satisfying ``problem``, or the best one when time runs out.

    ``drop_order`` (least useful group first) steers the greedy upper bound.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    start = time.monotonic()
    groups = problem.coeff.shape[0]
    useful = problem.coeff.max(axis=1) > 0
    if not problem.holds(useful):
        return MaskSolution(np.zeros(groups, bool), INFEASIBLE, 0, groups + 1,
                            time.monotonic() - start)
    order = drop_order if drop_order is not None else np.arange(groups)
    encoding = _Encoding(problem, np.flatnonzero(useful))
    best = greedy_mask(problem, order)
    full_lp = np.zeros(groups)
    full_lp[encoding.variables] = encoding.lp_values
    rounded = rounded_mask(problem, full_lp, order)
    if rounded.sum() < best.sum():
        best = rounded
    run = _bisect if solver == "bisection" else _optimize
    best, lower, iterations = run(encoding, best, encoding.lower, start + timeout_s, poll)
    status = OPTIMAL if lower >= int(best.sum()) else TIMEOUT
    return MaskSolution(best, status, iterations, lower, time.monotonic() - start)


class _Encoding:
    """The scaled constraints in a private z3 context (so a cancel interrupts only this solve),
    with the LP relaxation's bound and surrogate."""

    def __init__(self, problem: MaskProblem, variables: np.ndarray) -> None:
        self.problem = problem
        self.ctx = z3.Context()
        self.groups = problem.coeff.shape[0]
        self.variables = variables
        self.bits = [z3.Bool(f"m{g}", self.ctx) for g in variables]
        need = problem.rhs - problem.const
        active = need > 0
        a = problem.coeff[variables][:, active] / need[active]  # each constraint: a @ m >= 1
        self.constraints = [self._pb_at_least(a[:, k], 1.0) for k in range(a.shape[1])]
        self.lp_values = np.zeros(len(variables))
        self.lower, self.surrogate, self.total = 0, np.zeros(len(variables)), 0.0
        if a.shape[1] and len(variables):
            lp = linprog(np.ones(len(variables)), A_ub=-a.T, b_ub=-np.ones(a.shape[1]),
                         bounds=(0, 1), method="highs")
            if lp.status == 0:
                duals = np.clip(-lp.ineqlin.marginals, 0, None)
                self.lp_values = lp.x
                self.lower = math.ceil(lp.fun - 1e-6)
                self.surrogate, self.total = a @ duals, float(duals.sum())

    def _pb_at_least(self, weights: np.ndarray, bound: float) -> z3.BoolRef:
        """``weights @ m >= bound`` scaled and rounded so that it is implied by the original."""
        scaled = np.ceil(weights * SCALE + 1e-6 * SCALE * np.abs(weights)).astype(np.int64)
        terms = [(b, int(w)) for b, w in zip(self.bits, scaled, strict=True) if w != 0]
        return z3.PbGe(terms, math.floor(bound * SCALE - 1e-6 * SCALE * abs(bound)))

    def reduced_cost_cut(self, size: int) -> z3.BoolRef:
        """``sum (s_g - 1) m_g >= Y - size``: implied for masks of at most ``size`` groups."""
        return self._pb_at_least(self.surrogate - 1.0, self.total - size)

    def at_most(self, size: int) -> z3.BoolRef:
        return z3.AtMost(*self.bits, size)

    def size(self) -> z3.ArithRef:
        return z3.Sum([z3.If(b, 1, 0) for b in self.bits])

    def mask(self, model: z3.ModelRef) -> np.ndarray:
        mask = np.zeros(self.groups, bool)
        for g, bit in zip(self.variables, self.bits, strict=True):
            mask[g] = z3.is_true(model.eval(bit, model_completion=True))
        return mask

    def block(self, mask: np.ndarray) -> z3.BoolRef:
        """Excludes one model that satisfied only the rounded constraints."""
        return z3.Or([z3.Not(b) if mask[g] else b
                      for g, b in zip(self.variables, self.bits, strict=True)])

    def check(self, solver: z3.Solver | z3.Optimize, deadline: float, poll: Callable[[], None],
              *assumptions: z3.BoolRef) -> z3.CheckSatResult:
        """``solver.check()`` in a thread so that ``poll`` (cancel) and the deadline can
        interrupt it; z3 releases the GIL while it searches."""
        left = deadline - time.monotonic()
        if left <= 0:
            return z3.unknown
        solver.set("timeout", max(1, int(left * 1000)))
        box: dict[str, object] = {}

        def work() -> None:
            try:
                box["result"] = solver.check(*assumptions)
            except z3.Z3Exception as exc:  # raised when interrupted mid-search
                box["error"] = exc

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.25)
                poll()
                if time.monotonic() > deadline + 0.5:
                    self.ctx.interrupt()
        except BaseException:
            self.ctx.interrupt()
            thread.join()
            raise
        return box.get("result", z3.unknown)  # type: ignore[return-value]


def _bisect(enc: _Encoding, best: np.ndarray, lower: int, deadline: float,
            poll: Poll | None) -> tuple[np.ndarray, int, int]:
    solver = z3.Solver(ctx=enc.ctx)
    solver.add(*enc.constraints)
    iterations, step = 0, 1
    while lower < int(best.sum()):
        # galloping up from the LP bound (usually tight), halving the gap once it is passed
        mid = min(lower + step - 1, (lower + int(best.sum()) - 1) // 2)
        status = partial(_poll, poll, iterations, int(best.sum()), lower)
        status()
        result = enc.check(solver, deadline, status, enc.at_most(mid), enc.reduced_cost_cut(mid))
        iterations += 1
        if result == z3.sat:
            found = enc.mask(solver.model())
            if enc.problem.holds(found):
                best = found
            else:
                solver.add(enc.block(found))
        elif result == z3.unsat:
            lower, step = mid + 1, step * 2
        else:
            break
    _poll(poll, iterations, int(best.sum()), lower)
    return best, lower, iterations


def _optimize(enc: _Encoding, best: np.ndarray, lower: int, deadline: float,
              poll: Poll | None) -> tuple[np.ndarray, int, int]:
    opt = z3.Optimize(ctx=enc.ctx)
    opt.add(*enc.constraints)
    opt.add(enc.at_most(int(best.sum())), enc.reduced_cost_cut(int(best.sum())))
    opt.minimize(enc.size())
    iterations = 0
    while lower < int(best.sum()):
        result = enc.check(opt, deadline, partial(_poll, poll, iterations, int(best.sum()), lower))
        iterations += 1
        if result != z3.sat:
            break
        found = enc.mask(opt.model())
        if enc.problem.holds(found):
            best, lower = found, int(found.sum())
        else:
            opt.add(enc.block(found))
    _poll(poll, iterations, int(best.sum()), lower)
    return best, lower, iterations


def _poll(poll: Poll | None, iterations: int, best: int, lower: int) -> None:
    if poll is not None:
        poll(iterations, best, lower)


__all__ = ["INFEASIBLE", "MaskProblem", "MaskSolution", "OPTIMAL", "SOLVERS", "TIMEOUT",
           "greedy_mask", "solve_mask"]
