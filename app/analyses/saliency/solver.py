"""The minimal-mask problem: a 0/1 integer program, solved by HiGHS (default) or z3 (SMUG).

Because the first layer is affine, the selected neurons' pre-activations on the masked input
``mask ? x : baseline`` are *linear* in the mask bits::

    pre_k(m) = const_k + sum_g m_g * coeff[g, k]      and we ask   pre_k(m) >= rhs_k,

with ``const = pre(baseline)`` and ``coeff[g] = A (x - baseline)`` restricted to group ``g``.
Minimising ``sum_g m_g`` under these constraints is a 0/1 program. Coefficients may have
either sign (a group can raise one selected neuron and lower another), so feasibility is part
of the problem: it is decided by the exact solver, never assumed.

Float safety: each constraint is divided by its scale ``max(|rhs_k|, |const_k|, max_g
|coeff[g, k]|)`` and a mask *holds* when every scaled slack is ``>= -TOL`` (``TOL = 1e-9``: the
rounding of evaluating a constraint, far below any real effect). HiGHS works up to its own
feasibility tolerance (1e-6), so

* ``infeasible`` means HiGHS found no mask (or no fractional one: the LP relaxation) even with
  that tolerance, and no known candidate (the full mask, the mask of every group with a
  positive coefficient) holds; with z3, that z3 proved the rounded-up relaxation unsat;
* a HiGHS mask is returned only after :meth:`MaskProblem.holds` re-checks it in float64; when
  it fails (a constraint met only within HiGHS's tolerance) the problem is re-solved with a
  margin of ``MARGIN`` and, if that changes the size, z3 settles the sizes in between;
* ``optimal`` means the returned mask holds and HiGHS (or z3) proved no smaller mask does.

z3 encodes each constraint as a pseudo-boolean one with coefficients rounded *up* (a
relaxation, so ``unsat`` is a proof; every ``sat`` model is re-checked in float64 and blocked
if it only satisfies the rounded form), plus the LP relaxation's reduced-cost cut
``sum_g (s_g - 1) m_g >= Y - size`` with ``s = A y``, ``Y = b @ y`` from the LP duals ``y >= 0``.
Only groups with some positive coefficient get a variable: a group whose coefficients are all
``<= 0`` can be dropped from any mask without breaking a constraint.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial

import numpy as np
import z3
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from app.errors import InvalidInputError

OPTIMAL, TIMEOUT, INFEASIBLE = "optimal", "best found at time-out", "infeasible"
NO_MASK = "time-out before any mask was found"
UNPROVEN = "best found; the solver gave up before proving optimality"
SOLVERS = ("highs", "bisection", "optimize")
TOL = 1e-9  # a constraint holds when its scaled slack is >= -TOL (float rounding only)
MARGIN = 1e-5  # above HiGHS's 1e-6 feasibility tolerance: a re-solve's mask then holds
SCALE = 2**20

Poll = Callable[[int, int, int], None]
"""``poll(iterations, best_size, lower_bound)``; may raise :class:`app.Cancelled`."""


@dataclass(frozen=True)
class MaskProblem:
    """``const + mask @ coeff >= rhs`` over boolean ``mask`` (one entry per feature group)."""

    coeff: np.ndarray  # [groups, constraints] float64
    const: np.ndarray  # [constraints]
    rhs: np.ndarray  # [constraints]

    @cached_property
    def scale(self) -> np.ndarray:
        """Each constraint's magnitude: its largest term (1 for an all-zero row)."""
        terms = np.vstack([np.abs(self.rhs), np.abs(self.const), np.abs(self.coeff)])
        top = terms.max(axis=0) if terms.size else np.ones(0)
        return np.where(top > 0, top, 1.0)

    @cached_property
    def scaled(self) -> tuple[np.ndarray, np.ndarray]:
        """``(a [groups, constraints], b [constraints])`` with ``a.T @ m >= b`` the scaled form."""
        return self.coeff / self.scale, (self.rhs - self.const) / self.scale

    def slack(self, mask: np.ndarray) -> np.ndarray:
        """Scaled slack (left side minus right side) of each constraint for a boolean mask."""
        a, b = self.scaled
        return mask.astype(np.float64) @ a - b

    def holds(self, mask: np.ndarray) -> bool:
        return bool(np.all(self.slack(mask) >= -TOL))

    @property
    def groups(self) -> int:
        return self.coeff.shape[0]


@dataclass
class MaskSolution:
    mask: np.ndarray  # [groups] bool; all False when no mask is known
    status: str  # OPTIMAL, TIMEOUT, INFEASIBLE, NO_MASK or UNPROVEN
    iterations: int  # exact-solver calls (HiGHS solves or z3 checks)
    lower_bound: int  # proven: no smaller mask satisfies the constraints
    solve_s: float


def greedy_mask(problem: MaskProblem, order: np.ndarray,
                start: np.ndarray | None = None) -> np.ndarray | None:
    """An inclusion-minimal mask inside ``start`` (default: the full mask): groups are dropped
    in ``order`` wherever :meth:`MaskProblem.holds` still holds without them, in passes until
    a pass drops none, so no single kept group can be dropped. ``None`` when ``start`` itself
    does not hold."""
    mask = np.ones(problem.groups, bool) if start is None else start.copy()
    if not problem.holds(mask):
        return None
    dropped = True
    while dropped:
        dropped = False
        for g in order:
            if mask[g]:
                mask[g] = False
                if problem.holds(mask):
                    dropped = True
                else:
                    mask[g] = True
    return mask


def rounded_mask(problem: MaskProblem, lp_values: np.ndarray,
                 order: np.ndarray) -> np.ndarray | None:
    """LP rounding: add groups by LP value until the constraints hold, then drop extras."""
    mask = np.zeros(problem.groups, bool)
    for g in np.lexsort((np.argsort(order), -lp_values)):
        if problem.holds(mask):
            break
        mask[g] = True
    return greedy_mask(problem, order, mask)


def known_masks(problem: MaskProblem) -> list[np.ndarray]:
    """Masks to cross-check an ``infeasible`` verdict against: every group, and every group
    with a positive coefficient (feasible whenever the threshold is at most 1)."""
    return [np.ones(problem.groups, bool), problem.coeff.max(axis=1, initial=0) > 0]


def solve_mask(
    problem: MaskProblem,
    timeout_s: float = 30.0,
    solver: str = "highs",
    drop_order: np.ndarray | None = None,
    poll: Poll | None = None,
) -> MaskSolution:
    """The smallest mask satisfying ``problem``, or the best one when time runs out.

    ``drop_order`` (least useful group first) steers the greedy upper bound.
    """
    if solver not in SOLVERS:
        raise InvalidInputError(f"solver must be one of {SOLVERS}, got {solver!r}")
    start = time.monotonic()
    deadline = start + timeout_s
    order = drop_order if drop_order is not None else np.arange(problem.groups)
    enc = _Encoding(problem)
    # HiGHS may stop at an infeasible LP relaxation; z3 decides feasibility itself, so that
    # the two solvers cross-check each other's verdicts
    if (solver == "highs" and enc.lp_status == 2
            and not any(problem.holds(m) for m in known_masks(problem))):
        return MaskSolution(np.zeros(problem.groups, bool), INFEASIBLE, 0, problem.groups + 1,
                            time.monotonic() - start)
    best = _best(problem, [greedy_mask(problem, order, m) for m in known_masks(problem)]
                 + [rounded_mask(problem, enc.full(enc.lp_values), order)])
    if solver == "highs":
        return _highs(enc, best, order, deadline, poll, start)
    if best is None:
        best, verdict = _z3_feasible(enc, deadline, poll)
        if best is None:
            return MaskSolution(np.zeros(problem.groups, bool), verdict, 1,
                                problem.groups + 1 if verdict == INFEASIBLE else 0,
                                time.monotonic() - start)
        best = greedy_mask(problem, order, best)
    run = _bisect if solver == "bisection" else _optimize
    best, lower, iterations, timed_out = run(enc, best, enc.lower, deadline, poll)
    return MaskSolution(best, _status(best, lower, timed_out), iterations, lower,
                        time.monotonic() - start)


def _status(best: np.ndarray, lower: int, timed_out: bool) -> str:
    if lower >= int(best.sum()):
        return OPTIMAL
    return TIMEOUT if timed_out else UNPROVEN


def _best(problem: MaskProblem, masks: list[np.ndarray | None]) -> np.ndarray | None:
    """The smallest of ``masks`` that holds (``None`` if none does)."""
    good = [m for m in masks if m is not None and problem.holds(m)]
    return min(good, key=lambda m: int(m.sum())) if good else None


def _highs(enc: _Encoding, best: np.ndarray | None, order: np.ndarray, deadline: float,
           poll: Poll | None, start: float) -> MaskSolution:
    """HiGHS branch and bound on the 0/1 program; z3 only for float-borderline sizes."""
    problem = enc.problem
    lower = enc.lower
    tick = partial(_poll, poll, 0, problem.groups if best is None else int(best.sum()), lower)
    tick()
    status, found, bound = enc.milp(0.0, deadline, tick)
    iterations = 1
    if status == 2:  # infeasible even within HiGHS's tolerance
        if best is None:
            return MaskSolution(np.zeros(problem.groups, bool), INFEASIBLE, iterations,
                                problem.groups + 1, time.monotonic() - start)
        # a known mask holds: HiGHS was numerically wrong; z3 decides from here
        best, lower, more, timed_out = _bisect(enc, best, lower, deadline, poll)
        return MaskSolution(best, _status(best, lower, timed_out), iterations + more, lower,
                            time.monotonic() - start)
    lower = max(lower, bound)
    best = _best(problem, [best, found])
    if status == 0 and (best is None or int(best.sum()) > lower):
        # HiGHS's optimum meets some constraint only within its tolerance: add a margin
        _, tight, _ = enc.milp(MARGIN, deadline, tick)
        iterations += 1
        best = _best(problem, [best, tight])
    timed_out = status == 1 or time.monotonic() >= deadline
    if best is None:
        best, verdict = _z3_feasible(enc, deadline, poll)
        iterations += 1
        if best is None:
            return MaskSolution(np.zeros(problem.groups, bool), verdict, iterations,
                                problem.groups + 1 if verdict == INFEASIBLE else lower,
                                time.monotonic() - start)
    best = greedy_mask(problem, order, best)
    if int(best.sum()) > lower and not timed_out:
        best, lower, more, timed_out = _bisect(enc, best, lower, deadline, poll)
        iterations += more
    _poll(poll, iterations, int(best.sum()), lower)
    return MaskSolution(best, _status(best, lower, timed_out), iterations, lower,
                        time.monotonic() - start)


class _Encoding:
    """The scaled constraints, their LP relaxation, HiGHS's 0/1 program, and the same
    constraints in a private z3 context (so a cancel interrupts only this solve)."""

    def __init__(self, problem: MaskProblem) -> None:
        self.problem = problem
        a, b = problem.scaled
        self.variables = np.flatnonzero(a.max(axis=1, initial=0) > 0)
        a = a[self.variables]
        b = b - TOL
        # rows that hold even with every negative coefficient's group kept need no encoding
        live = np.minimum(a, 0).sum(axis=0) < b
        self.a, self.b = a[:, live], b[live]
        self.ctx = z3.Context()
        self.bits = [z3.Bool(f"m{g}", self.ctx) for g in self.variables]
        self._constraints: list[z3.BoolRef] | None = None
        self.interrupted = False
        self.lp_values = np.zeros(len(self.variables))
        self.lower, self.surrogate, self.total, self.lp_status = 0, np.zeros(len(self.bits)), 0., 0
        if self.a.shape[1]:
            if not len(self.variables):
                self.lp_status = 2
                return
            lp = linprog(np.ones(len(self.variables)), A_ub=-self.a.T, b_ub=-self.b,
                         bounds=(0, 1), method="highs")
            self.lp_status = lp.status
            if lp.status == 0:
                duals = np.clip(-lp.ineqlin.marginals, 0, None)
                self.lp_values = lp.x
                self.lower = max(0, math.ceil(lp.fun - 1e-6))
                self.surrogate, self.total = self.a @ duals, float(self.b @ duals)

    def full(self, values: np.ndarray) -> np.ndarray:
        """Per-variable ``values`` spread onto every group (0 elsewhere)."""
        out = np.zeros(self.problem.groups)
        out[self.variables] = values
        return out

    def milp(self, margin: float, deadline: float,
             tick: Callable[[], None]) -> tuple[int, np.ndarray | None, int]:
        """HiGHS on ``a.T m >= b + margin``: ``(scipy status, mask or None, lower bound)``;
        status 0 optimal, 1 time limit, 2 infeasible."""
        groups = self.problem.groups
        left = deadline - time.monotonic()
        if left <= 0:
            return 1, None, 0
        if not self.a.shape[1]:
            return 0, np.zeros(groups, bool), 0
        n = len(self.variables)
        res = _in_thread(partial(
            milp, np.ones(n), integrality=np.ones(n), bounds=Bounds(0, 1),
            constraints=LinearConstraint(self.a.T, self.b + margin, np.inf),
            options={"time_limit": left, "mip_rel_gap": 0.0, "disp": False}), tick)
        mask = None
        if res.x is not None:
            mask = self.full(np.round(res.x)) > 0.5
        dual = getattr(res, "mip_dual_bound", None)
        if res.status == 0:
            bound = math.ceil(res.fun - 1e-6)
        elif dual is not None and np.isfinite(dual):
            bound = max(0, math.ceil(dual - 1e-6))
        else:
            bound = 0
        return int(res.status), mask, bound

    @property
    def constraints(self) -> list[z3.BoolRef]:
        if self._constraints is None:
            self._constraints = [self._pb_at_least(self.a[:, k], self.b[k])
                                 for k in range(self.a.shape[1])]
        return self._constraints

    def _pb_at_least(self, weights: np.ndarray, bound: float) -> z3.BoolRef:
        """``weights @ m >= bound`` scaled and rounded so that it is implied by the original."""
        scaled = np.ceil(weights * SCALE + 1e-6 * SCALE * np.abs(weights)).astype(np.int64)
        terms = [(b, int(w)) for b, w in zip(self.bits, scaled, strict=True) if w != 0]
        floor = math.floor(bound * SCALE - 1e-6 * SCALE * abs(bound))
        if not terms:
            return z3.BoolVal(floor <= 0, self.ctx)
        return z3.PbGe(terms, floor)

    def reduced_cost_cut(self, size: int) -> z3.BoolRef:
        """``sum (s_g - 1) m_g >= Y - size``: implied for masks of at most ``size`` groups."""
        return self._pb_at_least(self.surrogate - 1.0, self.total - size)

    def at_most(self, size: int) -> z3.BoolRef:
        if not self.bits:
            return z3.BoolVal(size >= 0, self.ctx)
        return z3.AtMost(*self.bits, size)

    def size(self) -> z3.ArithRef:
        return z3.Sum([z3.If(b, 1, 0) for b in self.bits]) if self.bits else z3.IntVal(0,
                                                                                        self.ctx)

    def mask(self, model: z3.ModelRef) -> np.ndarray:
        return self.full(np.array([z3.is_true(model.eval(b, model_completion=True))
                                   for b in self.bits], float)) > 0.5

    def block(self, mask: np.ndarray) -> z3.BoolRef:
        """Excludes one model that satisfied only the rounded constraints."""
        return z3.Or([z3.Not(b) if mask[g] else b
                      for g, b in zip(self.variables, self.bits, strict=True)])

    def check(self, solver: z3.Solver | z3.Optimize, deadline: float, poll: Callable[[], None],
              *assumptions: z3.BoolRef) -> z3.CheckSatResult:
        """``solver.check()`` in a thread so that ``poll`` (cancel) and the deadline can
        interrupt it; z3 releases the GIL while it searches. An error that is not our own
        interrupt is raised, never taken for a time-out."""
        left = deadline - time.monotonic()
        if left <= 0:
            return z3.unknown
        solver.set("timeout", max(1, int(left * 1000)))
        box: dict[str, object] = {}

        def work() -> None:
            try:
                box["result"] = solver.check(*assumptions)
            except z3.Z3Exception as exc:
                box["error"] = exc

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.25)
                poll()
                if time.monotonic() > deadline + 0.5:
                    self.interrupted = True
                    self.ctx.interrupt()
        except BaseException:
            self.interrupted = True
            self.ctx.interrupt()
            thread.join()
            raise
        if "error" in box and not self.interrupted:
            raise box["error"]  # type: ignore[misc]
        return box.get("result", z3.unknown)  # type: ignore[return-value]


def _in_thread(fn: Callable[[], object], tick: Callable[[], None]) -> object:
    """Run ``fn`` in a thread, calling ``tick`` (which may raise to cancel) every quarter
    second while it works; a cancelled HiGHS run ends at its own time limit."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.25)
        if thread.is_alive():
            tick()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]


def _z3_feasible(enc: _Encoding, deadline: float,
                 poll: Poll | None) -> tuple[np.ndarray | None, str]:
    """Some mask that holds, or ``None`` with INFEASIBLE (proven) or NO_MASK (time ran out)."""
    solver = z3.Solver(ctx=enc.ctx)
    solver.add(*enc.constraints)
    while True:
        result = enc.check(solver, deadline, partial(_poll, poll, 0, enc.problem.groups, 0))
        if result == z3.unsat:
            return None, INFEASIBLE
        if result != z3.sat:
            return None, NO_MASK
        found = enc.mask(solver.model())
        if enc.problem.holds(found):
            return found, OPTIMAL
        solver.add(enc.block(found))


def _bisect(enc: _Encoding, best: np.ndarray, lower: int, deadline: float,
            poll: Poll | None) -> tuple[np.ndarray, int, int, bool]:
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
    return best, lower, iterations, time.monotonic() >= deadline - 0.01


def _optimize(enc: _Encoding, best: np.ndarray, lower: int, deadline: float,
              poll: Poll | None) -> tuple[np.ndarray, int, int, bool]:
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
    return best, lower, iterations, time.monotonic() >= deadline - 0.01


def _poll(poll: Poll | None, iterations: int, best: int, lower: int) -> None:
    if poll is not None:
        poll(iterations, best, lower)


__all__ = ["INFEASIBLE", "MaskProblem", "MaskSolution", "NO_MASK", "OPTIMAL", "SOLVERS",
           "TIMEOUT", "TOL", "UNPROVEN", "greedy_mask", "solve_mask"]
