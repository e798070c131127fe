"""Input splitting (branch and bound) for rules on boxes too large for one MILP.

On a low-dimensional input (ACAS Xu's 5 inputs) the MILP over the whole box drowns in
unstable neurons, while CROWN on small sub-boxes is nearly exact. So the box is split along
the input with the largest influence (gradient of the worst rival's margin at the box centre
times the width), a batch of sub-boxes at a time. Each sub-box is

* dropped when CROWN shows no input of it satisfies the premise (a fixed-on neuron that
  cannot be positive, or a fixed-off one that cannot be negative),
* proven when CROWN, with the premise's neurons clamped to their phase, bounds every rival's
  margin,
* searched for a counterexample by sampling and a few projected gradient steps,
* handed to the exact MILP once it is small (``leaf_width`` of the domain), with a short
  time limit; a leaf the MILP leaves open is split further.

The rule is proven when every sub-box is dropped or proven; a counterexample is only
reported after forward passes confirm it. Progress is the fraction of the volume settled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from app.analyses.patterns.milp import Phases, satisfies
from app.bounds import fold_last_layer
from app.bounds.crown import CrownAnalysis
from app.layers import ReLU
from app.network import INPUT, Network
from app.progress import ProgressFn, report

ROUNDING = 1e-9  # CROWN margins below this share of the logits' size prove nothing (float64)
Found = tuple[Tensor, int]  # a confirmed counterexample and the class that wins on it
LeafCheck = Callable[[Tensor, Tensor, float], tuple[str, "Found | None"]]
Confirm = Callable[[np.ndarray, Tensor, Tensor], "Found | None"]


class PhasedCrown(CrownAnalysis):
    """CROWN over the inputs of the boxes whose ReLU phases are the fixed ``phases``.

    Pre-activation bounds of fixed-on neurons are clamped to ``>= 0`` and of fixed-off ones
    to ``<= 0`` before they relax anything: sound for every input satisfying the premise,
    which is all a rule is checked on, and it makes those neurons exact (linear) downstream.
    """

    def __init__(self, net: Network, lo: Tensor, hi: Tensor, phases: Phases) -> None:
        self.fixed = {net.inputs[node][0]: phase for node, phase in phases.items()
                      if isinstance(net.layers[node], ReLU) and net.inputs[node][0] != INPUT}
        super().__init__(net, lo, hi)

    def bounds(self, node: int) -> tuple[Tensor, Tensor]:
        return self._clamp(node, *super().bounds(node))

    def _relaxation_bounds(self, node: int) -> tuple[Tensor, Tensor]:
        return self._clamp(node, *super()._relaxation_bounds(node))

    def _clamp(self, node: int, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        if node not in self.fixed:
            return lo, hi
        on, off = self.fixed[node]
        b = lo.shape[0]
        lo, hi = lo.reshape(b, -1).clone(), hi.reshape(b, -1).clone()
        lo[:, on] = lo[:, on].clamp(min=0)
        hi[:, off] = hi[:, off].clamp(max=0)
        return lo.reshape(b, *self.shape(node)), hi.reshape(b, *self.shape(node))

    def premise_feasible(self) -> Tensor:
        """``[B]``: False where no input of the box can satisfy the premise."""
        ok = torch.ones(self.lo.shape[0], dtype=torch.bool)
        for node, (on, off) in self.fixed.items():
            lo, hi = (t.reshape(ok.shape[0], -1) for t in super().bounds(node))
            ok &= (hi[:, on] > 0).all(1) & (lo[:, off] <= 0).all(1)
        return ok


def rival_spec(net: Network, target: int, lowest: bool) -> Tensor:
    """Rows ``[n_out - 1, n_out]`` whose values are all positive exactly when ``target``
    wins: ``y_target - y_j`` (highest score) or ``y_j - y_target`` (lowest score)."""
    eye = torch.eye(net.num_outputs, dtype=torch.float64)
    rows = eye[target] - eye[[j for j in range(net.num_outputs) if j != target]]
    return -rows if lowest else rows


def split_check(
    net: Network,
    net64: Network,
    phases: Phases,
    lo: Tensor,
    hi: Tensor,
    target: int,
    lowest: bool,
    timeout: float,
    leaf_check: LeafCheck,
    confirm: Confirm,
    progress: ProgressFn | None = None,
    batch: int = 256,
    leaf_width: float = 1 / 16,
    leaf_timeout: float = 2.0,
) -> tuple[str, str, Found | None, float | None]:
    """Branch and bound over ``[lo, hi]``: ``(status, message, counterexample, worst)``.

    ``leaf_check(lo, hi, seconds)`` is the exact verifier for a small box, returning
    ``(status, found)``; ``confirm(x, lo, hi)`` re-checks a candidate by forward passes.
    ``worst`` is the largest rival margin bound when proven.
    """
    start = time.perf_counter()
    deadline = start + timeout
    spec = rival_spec(net, target, lowest)
    feat, folded, bias = fold_last_layer(net64, spec.unsqueeze(0))
    tol = ROUNDING * _logit_size(net64, lo, hi)
    shape = net.input_shape
    full_w = (hi - lo).reshape(-1).to(torch.float64)
    live = full_w > 0
    open_lo, open_hi = [lo.reshape(1, *shape).to(torch.float64)], [hi.reshape(1, *shape)
                                                                   .to(torch.float64)]
    settled, boxes, leaves, worst, gen = 0.0, 0, 0, -math.inf, torch.Generator().manual_seed(0)
    unsettled = False

    def rel_volume(b_lo: Tensor, b_hi: Tensor) -> Tensor:
        w = (b_hi - b_lo).reshape(b_lo.shape[0], full_w.numel())[:, live] / full_w[live]
        return w.prod(1)

    while open_lo:
        if time.perf_counter() >= deadline:
            return ("unknown", f"time-out after splitting into {boxes} boxes ({leaves} MILP "
                    f"leaves); {settled:.1%} of the domain settled", None, None)
        b_lo, b_hi = open_lo.pop(), open_hi.pop()
        if b_lo.shape[0] > batch:
            open_lo.append(b_lo[batch:])
            open_hi.append(b_hi[batch:])
            b_lo, b_hi = b_lo[:batch], b_hi[:batch]
        boxes += b_lo.shape[0]
        n = b_lo.shape[0]
        with torch.no_grad():
            crown = PhasedCrown(net64, b_lo, b_hi, phases)
            feasible = crown.premise_feasible()
            margins = crown.lower(feat, folded.expand(n, *folded.shape[1:]), bias.expand(n, -1))
        proven = feasible & (margins > tol).all(1)
        if proven.any():
            worst = max(worst, float(-margins[proven].min(1).values.max()))
        done = ~feasible | proven
        settled += float(rel_volume(b_lo[done], b_hi[done]).sum())
        b_lo, b_hi = b_lo[~done], b_hi[~done]
        if b_lo.shape[0] == 0:
            report(progress, settled, f"{settled:.0%} of the domain settled ({boxes} boxes)")
            continue
        found = _attack(net64, phases, b_lo, b_hi, spec, gen, confirm)
        if found is not None:
            return ("counterexample", f"found in a sub-box after {boxes} boxes", found, None)
        width = ((b_hi - b_lo).reshape(b_lo.shape[0], full_w.numel())[:, live]
                 / full_w[live]).amax(1)
        small = width <= leaf_width
        for k in torch.nonzero(small).reshape(-1).tolist():
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            leaves += 1
            status, found = leaf_check(b_lo[k], b_hi[k], min(leaf_timeout, left))
            if status == "counterexample":
                return ("counterexample", f"found by the MILP in a sub-box after {boxes} boxes",
                        found, None)
            if status == "proven":
                small[k] = False  # settled: neither split nor kept
                settled += float(rel_volume(b_lo[k:k + 1], b_hi[k:k + 1]).sum())
            elif width[k] <= leaf_width / 64:
                unsettled = True  # a tiny box the MILP cannot decide: stop refining it
                small[k] = False
            else:
                small[k] = False
                s_lo, s_hi = _split(net64, b_lo[k:k + 1], b_hi[k:k + 1], spec, live)
                open_lo.append(s_lo)
                open_hi.append(s_hi)
        rest = (width > leaf_width)
        if rest.any():
            s_lo, s_hi = _split(net64, b_lo[rest], b_hi[rest], spec, live)
            open_lo.append(s_lo)
            open_hi.append(s_hi)
        report(progress, settled, f"{settled:.0%} of the domain settled ({boxes} boxes, "
               f"{leaves} MILP leaves)")
    if unsettled:
        return ("unknown", f"some tiny sub-boxes stayed open after {boxes} boxes", None, None)
    return ("proven", f"holds on every input of the domain satisfying the premise "
            f"({boxes} boxes, {leaves} MILP leaves)", None, worst)


def _logit_size(net64: Network, lo: Tensor, hi: Tensor, samples: int = 64) -> float:
    """Largest |logit| over the box's centre and a few samples: what float rounding in the
    bounds is relative to."""
    gen = torch.Generator().manual_seed(1)
    lo64, hi64 = lo.to(torch.float64).reshape(1, -1), hi.to(torch.float64).reshape(1, -1)
    u = torch.rand((samples, lo64.shape[1]), generator=gen, dtype=torch.float64)
    xs = torch.cat([(lo64 + hi64) / 2, lo64 + (hi64 - lo64) * u]).reshape(-1, *net64.input_shape)
    with torch.no_grad():
        return float(net64(xs).abs().max())


def _worst_margin(net64: Network, x: Tensor, spec: Tensor) -> Tensor:
    """Largest ``-margin`` over the rivals (``> 0``: a rival beats the target)."""
    y = net64(x).reshape(x.shape[0], -1)
    return -(y @ spec.T).amin(1)


def _split(net64: Network, lo: Tensor, hi: Tensor, spec: Tensor,
           live: Tensor) -> tuple[Tensor, Tensor]:
    """Halve each box along the input with the largest |gradient| x width at its centre."""
    centre = ((lo + hi) / 2).requires_grad_(True)
    (grad,) = torch.autograd.grad(_worst_margin(net64, centre, spec).sum(), centre)
    n = lo.shape[0]
    width = (hi - lo).reshape(n, -1)
    score = width * (grad.detach().reshape(n, -1).abs() + 1e-9)
    score[:, ~live] = -1.0
    dim = score.argmax(1)
    rows = torch.arange(n)
    mid = ((lo + hi) / 2).reshape(n, -1)[rows, dim]
    left_hi, right_lo = hi.reshape(n, -1).clone(), lo.reshape(n, -1).clone()
    left_hi[rows, dim], right_lo[rows, dim] = mid, mid
    new_lo = torch.cat([lo, right_lo.reshape(lo.shape)])
    new_hi = torch.cat([left_hi.reshape(hi.shape), hi])
    return new_lo, new_hi


def _attack(net64, phases, lo, hi, spec, gen, confirm: Confirm, samples: int = 16,
            steps: int = 5):
    """A confirmed counterexample from samples of the boxes and gradient steps, if found."""
    box_lo, box_hi = lo.repeat_interleave(samples, 0), hi.repeat_interleave(samples, 0)
    u = torch.rand(box_lo.shape, generator=gen, dtype=torch.float64)
    x = box_lo + (box_hi - box_lo) * u
    width = box_hi - box_lo
    for step in range(steps + 1):
        x = x.detach().requires_grad_(step < steps)
        with torch.set_grad_enabled(step < steps):
            outs = net64.trace(x)
            y = outs[-1].reshape(x.shape[0], -1)
            gap = -(y @ spec.T).amin(1)
            ok = satisfies(net64, [o.detach() for o in outs], x.detach(), phases)
        hits = torch.nonzero(ok & (gap.detach() > 0)).reshape(-1)
        for k in hits[:5].tolist():
            found = confirm(x[k].detach().reshape(-1).numpy(), box_lo[k], box_hi[k])
            if found is not None:
                return found
        if step == steps:
            break
        # ascend the rival's margin while pulling violated premise neurons to their phase
        objective = gap - _premise_violation(net64, outs, x, phases)
        (grad,) = torch.autograd.grad(objective.sum(), x)
        x = torch.min(torch.max(x + 0.05 * width * grad.sign(), box_lo), box_hi)
    return None


def _premise_violation(net64: Network, outs: list[Tensor], x: Tensor, phases: Phases) -> Tensor:
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    for node, (on, off) in phases.items():
        if not isinstance(net64.layers[node], ReLU):
            continue
        pre = net64.node_inputs(outs, x, node)[0].reshape(x.shape[0], -1)
        total = total + (-pre[:, on]).clamp(min=0).sum(1) + pre[:, off].clamp(min=0).sum(1)
    return total
