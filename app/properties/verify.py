"""Verify a VNN-LIB property: proven, counterexample (checked by a forward pass) or unknown.

Each case of the property (an input box and output rows ``C y <= d`` that together make a
counterexample) is first attacked (random points and projected gradient steps on
``max_k (c_k y - d_k)``), then bounded: a case is refuted when some row's float-safe lower
bound of ``c_k y - d_k`` is positive on its whole box. Method ``"bab"`` goes on where that
fails: on inputs of at most ``MAX_SPLIT_INPUTS`` dimensions, branch and bound over input
splits (CROWN set up for many small boxes on batches of sub-boxes; the split dimension is
the one of largest width times slope, the slope being CROWN's coefficient on the input at
even depths and the gradient at the centre at odd ones), checking every sub-box's centre by
a forward pass, until every sub-box is refuted, a counterexample is found, or the time limit.
A sub-box is refuted by a row, or by the mean of two or all of a case's rows (positive where
different rows are positive on different parts of it).
On larger inputs ``"bab"`` runs CROWN, then on chains of affine layers and ReLUs branch and
bound over ReLU splits (beta-CROWN style, alpha-CROWN at its root, ``app.properties.relu_bab``)
and, where that search splits every unstable ReLU of a sub-domain without closing it, a MILP
per open case (HiGHS, exact ReLU encoding, ``app.properties.milp``), its points checked as
counterexamples by a forward pass. Other networks get CROWN, then alpha-CROWN.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from app.bounds import (
    METHODS,
    analyze,
    box_lower,
    float64,
    float_safe,
    fold_last_layer,
    spec_lower_bounds,
)
from app.errors import InvalidInputError
from app.network import Network
from app.progress import ProgressFn, report
from app.properties import milp, relu_bab
from app.properties.vnnlib import Case, VnnProperty

BATCH = 512  # sub-boxes bounded together
MAX_BOXES = 500_000  # open sub-boxes before giving up (unknown)
MAX_SPLIT_INPUTS = 16  # input splitting only for low-dimensional inputs (ACAS Xu: 5)


@dataclass
class Verdict:
    """The answer for one property; ``counterexample`` is an input meeting a whole case."""

    status: str  # "proven" | "counterexample" | "unknown"
    method: str
    seconds: float
    message: str
    counterexample: np.ndarray | None = None  # [*input_shape]
    output: np.ndarray | None = None  # the network's output on it
    case: int | None = None  # index of the case the counterexample meets
    boxes: int = 0  # sub-boxes bounded (branch and bound)
    case_status: list[str] = field(default_factory=list)


def verify(net: Network, prop: VnnProperty, method: str = "bab", time_limit: float = 60.0,
           progress: ProgressFn | None = None, seed: int = 0) -> Verdict:
    """Decide ``prop`` on ``net`` with a bound ``method`` or ``"bab"``, within ``time_limit`` s."""
    start = time.monotonic()
    n_in = int(np.prod(net.input_shape))
    if prop.n_inputs != n_in or prop.n_outputs != net.num_outputs:
        raise InvalidInputError(f"the property has {prop.n_inputs} inputs and {prop.n_outputs} "
                                f"outputs; the network {n_in} and {net.num_outputs}")
    if method != "bab" and method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; use one of {[*METHODS, 'bab']}")
    if not (np.isfinite(time_limit) and time_limit > 0):
        raise InvalidInputError("time_limit must be a positive number of seconds")
    deadline = start + time_limit
    gen = torch.Generator().manual_seed(seed)
    status = ["open"] * len(prop.cases)

    def done(word: str, msg: str, **kw) -> Verdict:
        return Verdict(word, method, time.monotonic() - start, msg, case_status=status, **kw)

    for k, case in enumerate(prop.cases):
        report(progress, 0.1 * k / max(1, len(prop.cases)), f"attacking case {k + 1}")
        found = _attack(net, case, gen)
        if found is not None:
            status[k] = "counterexample"
            return done("counterexample", f"case {k + 1} is met by a point (forward pass)",
                        counterexample=found[0], output=found[1], case=k)
    high_dim = prop.n_inputs > MAX_SPLIT_INPUTS
    by_relu_splits = high_dim and relu_bab.supports(net)
    passes = [method]
    if method == "bab":  # input splitting starts from CROWN; alpha-CROWN where it cannot split
        # (ReLU-split branch and bound runs alpha-CROWN at its root: no separate pass)
        passes = ["crown"] + (["alpha-crown"] if high_dim and not by_relu_splits else [])
    for name in passes:
        for group in _same_box(prop.cases, status):
            left = deadline - time.monotonic()
            if left <= 0:
                return done("unknown", "time limit reached")
            report(progress, 0.2, f"bounding {len(group)} cases with {name}")
            options = {"time_limit": left} if name == "alpha-crown" else {}
            for k in _refuted(net, [prop.cases[i] for i in group], name, options):
                status[group[k]] = "refuted"
    refuted = status.count("refuted")
    if refuted == len(status):
        return done("proven", f"all {len(status)} cases refuted by {' then '.join(passes)}")
    if method != "bab":
        return done("unknown", f"{refuted} of {len(status)} cases refuted by {method}")
    if high_dim:
        if by_relu_splits:
            return _by_relu_splits(net, prop, status, deadline, done, progress)
        return _by_milp(net, prop, status, deadline, done)
    boxes = 0
    for k, case in enumerate(prop.cases):
        if status[k] == "refuted":
            continue
        if time.monotonic() > deadline:
            return done("unknown", "time limit reached", boxes=boxes)
        report(progress, 0.3 + 0.7 * k / len(prop.cases), f"branch and bound on case {k + 1}")
        word, found, n = _input_bab(net, case, deadline, progress)
        boxes += n
        status[k] = word
        if word == "counterexample":
            return done("counterexample", f"case {k + 1} is met by a point (forward pass)",
                        counterexample=found[0], output=found[1], case=k, boxes=boxes)
        if word != "refuted":
            return done("unknown", f"case {k + 1}: {word}", boxes=boxes)
    return done("proven", f"all {len(status)} cases refuted ({boxes} sub-boxes)", boxes=boxes)


def _by_relu_splits(net: Network, prop: VnnProperty, status: list[str], deadline: float,
                    done, progress: ProgressFn | None) -> Verdict:
    """The open cases of a high-dimensional property by ReLU-split branch and bound: cases
    sharing a box (and row count) share root bounds (alpha-CROWN for all their rows) and
    batches. A search that cannot close (every unstable ReLU split) goes to the MILP."""
    domains = leaves = 0
    for group in _same_box(prop.cases, status):
        for same in _by_row_count(prop.cases, group):
            cases = [prop.cases[k] for k in same]
            left = deadline - time.monotonic()
            if left <= 0:
                return done("unknown", "time limit reached", boxes=domains)
            report(progress, 0.3, f"ReLU branch and bound on {len(cases)} cases")
            lo, hi = _box(net, cases[0])
            spec = torch.as_tensor(np.concatenate([c.rows for c in cases]))[None].double()
            offset = -torch.as_tensor(np.concatenate([c.rhs for c in cases]))[None].double()
            ch = relu_bab.chain(net, lo, hi, spec, offset, min(10.0, left / 6))
            res = relu_bab.refute(net, cases, ch, deadline, progress,
                                  lambda j, x, cs=cases: check_counterexample(net, cs[j], x))
            domains, leaves = domains + res.domains, leaves + res.leaves
            if res.status == "counterexample":
                k = same[res.case]
                status[k] = "counterexample"
                found = _found(net, prop.cases[k], res.point)
                return done("counterexample", f"case {k + 1} is met by a point of ReLU branch "
                                              "and bound (forward pass)",
                            counterexample=found[0], output=found[1], case=k, boxes=domains)
            if res.status == "unknown":
                if time.monotonic() < deadline - 1 and "split" in res.reason:
                    return _by_milp(net, prop, status, deadline, done)
                return done("unknown", res.reason, boxes=domains)
            for k in same:
                status[k] = "refuted"
    return done("proven", f"all {len(status)} cases refuted: bounds, then ReLU-split branch "
                          f"and bound over {domains} sub-domains; each of the {leaves} leaves "
                          "(a set of ReLUs fixed active/inactive) has a positive beta-CROWN "
                          "lower bound of some row", boxes=domains)


def _by_row_count(cases: list[Case], group: list[int]) -> list[list[int]]:
    """``group`` split by the cases' number of output rows (batched together)."""
    out: dict[int, list[int]] = {}
    for k in group:
        out.setdefault(cases[k].rows.shape[0], []).append(k)
    return list(out.values())


def _by_milp(net: Network, prop: VnnProperty, status: list[str], deadline: float,
             done) -> Verdict:
    """The open cases of a high-dimensional property, each by a time-limited MILP."""
    if not milp.supports(net):
        return done("unknown", f"{status.count('refuted')} of {len(status)} cases refuted; "
                               "input splitting is for low-dimensional inputs and the MILP "
                               "encoding only covers chains of affine layers and ReLUs")
    # one open case left unrefuted leaves the property unknown: each may use all the time
    for k in [k for k, s in enumerate(status) if s == "open"]:
        left = deadline - time.monotonic()
        if left < 1:
            break
        ok, bound, point = milp.refute(net, prop.cases[k], left)
        if point is not None and check_counterexample(net, prop.cases[k], torch.as_tensor(point)):
            status[k] = "counterexample"
            found = _found(net, prop.cases[k], torch.as_tensor(point))
            return done("counterexample", f"case {k + 1} is met by the MILP's point "
                                          "(forward pass)", counterexample=found[0],
                        output=found[1], case=k)
        if not ok:
            return done("unknown", f"case {k + 1}: MILP lower bound {bound:.3g} within the "
                                   "time limit")
        status[k] = "refuted"
    if all(s == "refuted" for s in status):
        return done("proven", f"all {len(status)} cases refuted (bounds, then MILP)")
    return done("unknown", "time limit reached")


def check_counterexample(net: Network, case: Case, x: Tensor) -> bool:
    """Whether ``x``, in the network's precision (rounded inward, as it is evaluated and
    reported), lies in the case's box and meets every output row by a forward pass."""
    x = _in_precision(net, case, x)
    flat = x.reshape(-1).double()
    if (flat < torch.as_tensor(case.lo)).any() or (flat > torch.as_tensor(case.hi)).any():
        return False
    with torch.no_grad():
        y = net(x.reshape(1, *net.input_shape).to(net.dtype))[0].double()
    return bool((torch.as_tensor(case.rows) @ y <= torch.as_tensor(case.rhs)).all())


def _box(net: Network, case: Case) -> tuple[Tensor, Tensor]:
    shape = (1, *net.input_shape)
    return (torch.as_tensor(case.lo, dtype=torch.float64).reshape(shape),
            torch.as_tensor(case.hi, dtype=torch.float64).reshape(shape))


def _same_box(cases: list[Case], status: list[str]) -> list[list[int]]:
    """Indices of the open cases, grouped by identical input boxes (bounded together)."""
    groups: dict[bytes, list[int]] = {}
    for k, case in enumerate(cases):
        if status[k] == "open":
            groups.setdefault(case.lo.tobytes() + case.hi.tobytes(), []).append(k)
    return list(groups.values())


def _refuted(net: Network, cases: list[Case], method: str, options: dict) -> list[int]:
    """Which of ``cases`` (one shared box) have a row bounded above zero on the whole box."""
    sizes = [c.rows.shape[0] for c in cases]
    if sum(sizes) == 0:
        return []
    lo, hi = _box(net, cases[0])
    spec = torch.as_tensor(np.concatenate([c.rows for c in cases]), dtype=torch.float64)[None]
    offset = -torch.as_tensor(np.concatenate([c.rhs for c in cases]), dtype=torch.float64)[None]
    with torch.no_grad():
        low = spec_lower_bounds(net, lo, hi, spec, offset, method, **options)[0]
    return [k for k, part in enumerate(low.split(sizes)) if part.numel() and bool((part > 0).any())]


def _case_linear(net: Network, lo: Tensor, hi: Tensor, rows: np.ndarray, rhs: np.ndarray
                 ) -> tuple[Tensor, Tensor]:
    """Per box ``[B]`` the best float-safe CROWN lower bound of ``c_k y - d_k`` over
    ``rows`` (a case's rows and their means, ``_with_mixtures``; CROWN set up for input
    splitting's many small boxes), and that row's coefficients on the input
    ``[B, *input_shape]``."""
    b = lo.shape[0]
    if rows.shape[0] == 0:
        return torch.full((b,), -torch.inf, dtype=torch.float64), torch.zeros_like(lo)
    spec = torch.as_tensor(rows, dtype=torch.float64).expand(b, -1, -1)
    offset = -torch.as_tensor(rhs, dtype=torch.float64).expand(b, -1)
    with torch.no_grad():
        node, folded, bias = fold_last_layer(net, spec.to(net.dtype))
        crown = analyze(net, lo, hi, "crown", splitting=True)
        a, const = crown.linear_lower(node, folded, bias + offset.to(net.dtype))
        safe = float_safe(net, lo, hi, spec, offset, "crown", const + box_lower(lo, hi, a))
    return safe.amax(1), a[torch.arange(b), safe.argmax(1)]


def _with_mixtures(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """The case's rows and, for several rows, the mean of every pair and of all: where
    ``c_j y - d_j`` is positive for different ``j`` on different parts of a box, a mean
    of rows may be positive on all of it, and a positive mean refutes the box as well."""
    rows, rhs = case.rows, case.rhs
    m = rows.shape[0]
    if m < 2:
        return rows, rhs
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    mix = [np.eye(m)[list(p)].mean(0) for p in pairs] + ([np.full(m, 1 / m)] if m > 2 else [])
    weights = np.concatenate([np.eye(m), np.stack(mix)])
    return weights @ rows, weights @ rhs


def _violation(net: Network, case: Case, x: Tensor) -> Tensor:
    """``max_k (c_k y - d_k)`` per point: ``<= 0`` means the point meets the case."""
    rows = torch.as_tensor(case.rows, dtype=x.dtype)
    rhs = torch.as_tensor(case.rhs, dtype=x.dtype)
    return (net(x) @ rows.T - rhs).amax(1)


def _attack(net: Network, case: Case, gen: torch.Generator, starts: int = 64,
            steps: int = 50) -> tuple[np.ndarray, np.ndarray] | None:
    """A checked counterexample from random points and projected sign-gradient steps."""
    if case.rows.shape[0] == 0:
        return _found(net, case, torch.as_tensor(case.lo))
    lo, hi = (t.to(net.dtype) for t in _box(net, case))
    z = lo + (hi - lo) * torch.rand(starts, *net.input_shape, generator=gen, dtype=net.dtype)
    z[0] = (lo + hi)[0] / 2
    step = (hi - lo) / 10
    for i in range(steps):
        z.requires_grad_(True)
        loss = _violation(net, case, z)
        best = int(loss.argmin())
        if float(loss[best].detach()) <= 0 and check_counterexample(net, case, z[best].detach()):
            return _found(net, case, z[best].detach())
        (grad,) = torch.autograd.grad(loss.sum(), z)
        size = step * (1 - i / steps)
        z = torch.minimum(torch.maximum(z.detach() - size * grad.sign(), lo), hi)
    with torch.no_grad():
        loss = _violation(net, case, z)
    best = int(loss.argmin())
    if check_counterexample(net, case, z[best]):
        return _found(net, case, z[best])
    return None


def _in_precision(net: Network, case: Case, x: Tensor) -> Tensor:
    """``x`` in the network's precision, one ulp inward where the rounding left the box."""
    lo, hi = (torch.as_tensor(t, dtype=torch.float64) for t in (case.lo, case.hi))
    return relu_bab.inside(x.reshape(-1).double(), lo, hi, net.dtype).to(net.dtype)


def _found(net: Network, case: Case, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = _in_precision(net, case, x.detach()).reshape(net.input_shape)
    with torch.no_grad():
        y = net(x[None])[0]
    return x.detach().numpy(), y.detach().numpy()


def _input_bab(net: Network, case: Case, deadline: float, progress: ProgressFn | None = None
               ) -> tuple[str, tuple[np.ndarray, np.ndarray] | None, int]:
    """Branch and bound over input splits for one case: refuted, counterexample or why not.

    ``progress`` hears of every batch (so a cancelled job stops within one batch)."""
    lo, hi = _box(net, case)
    net64 = float64(net)  # float64 from the start: a float32 screen is bounded again where it proves
    width0 = (hi - lo).clamp(min=1e-12)
    rows = torch.as_tensor(case.rows, dtype=torch.float64)
    mixed = _with_mixtures(case)  # the rows that may refute a sub-box, built once
    depth = torch.zeros(1, dtype=torch.long)  # splits from the case's box
    bounded = 0
    while lo.shape[0]:
        if time.monotonic() > deadline:
            return "time limit reached", None, bounded
        if lo.shape[0] > MAX_BOXES:
            return f"more than {MAX_BOXES} open sub-boxes", None, bounded
        report(progress, 0.5, f"{bounded} sub-boxes bounded, {lo.shape[0]} open")
        blo, bhi, bdepth = lo[:BATCH], hi[:BATCH], depth[:BATCH]
        lo, hi, depth = lo[BATCH:], hi[BATCH:], depth[BATCH:]
        bounded += blo.shape[0]
        low, coef = _case_linear(net64, blo, bhi, *mixed)
        keep = low <= 0
        blo, bhi, bdepth, coef = blo[keep], bhi[keep], bdepth[keep], coef[keep]
        if not blo.shape[0]:
            continue
        mid = ((blo + bhi) / 2).requires_grad_(True)
        y = net(mid.to(net.dtype)).double()
        viol = (y @ rows.T - torch.as_tensor(case.rhs)).detach()
        for i in (viol.amax(1) <= 0).nonzero().flatten().tolist():
            if check_counterexample(net, case, mid[i].detach()):
                return "counterexample", _found(net, case, mid[i].detach()), bounded
        # split the dimension where width times slope is largest, the slope taken in turn
        # down each path (either alone stalls on some properties): CROWN's coefficients on
        # the input at even depths, the gradient of the easiest row at the centre at odd ones
        (grad,) = torch.autograd.grad((y * rows[viol.argmax(1)]).sum(), mid)
        even = (bdepth % 2 == 0).reshape(-1, *[1] * (grad.dim() - 1))
        slope = torch.where(even, coef, grad).abs()
        dim = ((bhi - blo) * (slope + 1e-12 * (bhi - blo) / width0)).flatten(1).argmax(1)
        centre = mid.detach().flatten(1).gather(1, dim[:, None])
        left_hi, right_lo = bhi.flatten(1).clone(), blo.flatten(1).clone()
        left_hi.scatter_(1, dim[:, None], centre)
        right_lo.scatter_(1, dim[:, None], centre)
        shape = blo.shape
        lo = torch.cat([blo, right_lo.reshape(shape), lo])
        hi = torch.cat([left_hi.reshape(shape), bhi, hi])
        depth = torch.cat([bdepth + 1, bdepth + 1, depth])
    return "refuted", None, bounded
