"""SMT saliency masks (SMUG: Sahoo et al., ICLR 2021): gradients pick the neurons, an exact
0/1 solver finds the smallest mask that keeps them.

1. Layer Integrated Gradients (Captum, from the same baseline) ranks the first-layer neurons
   (the first ReLU's inputs) for the target class; the ``top_k`` positive ones with positive
   pre-activation are selected.
2. HiGHS (default; or z3, SMUG's solver) finds the smallest set of feature groups such that,
   with every other group replaced by the baseline, each selected neuron keeps ``>= threshold``
   times its original pre-activation (see :mod:`.solver` for what each status proves). A group
   is one feature, a square patch, or a SLIC superpixel of ``x`` (scikit-image;
   ``granularity="superpixel"``) so that the mask follows the image's edges. The baseline is a
   constant, ``"blurred"`` (``x`` blurred) or one value per element.

   What a mask guarantees: those first-layer pre-activations, nothing about the later layers.
   It does *not* guarantee the decision; whether the masked input keeps the class is measured
   (``grades["smt"].survives``), not promised.
3. Ranking inside the mask: each group is scored by its *share of the selected neurons'
   change* from the baseline to ``x``, ``sum_k coeff[g, k] / |pre_k(x) - pre_k(baseline)|``;
   highest first. The same score orders the groups outside the mask (after it) for the
   grading curves.
4. Input IG and SmoothGrad (absolute gradients; Captum) are computed as baselines and every
   method is graded at the same number of kept groups with the same baseline
   (:mod:`.grading`); ``winners`` names the best method per measure, ties as ties.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from app.analyses.saliency.attribution import input_ig, neuron_ig, smoothgrad
from app.analyses.saliency.first_layer import (
    BLURRED,
    SUPERPIXEL,
    auto_patch,
    feature_groups,
    first_relu,
    group_sum,
    make_baseline,
    mask_coefficients,
    masked_input,
    pre_activations,
    superpixel_groups,
)
from app.analyses.saliency.grading import Grade, grade, ranking, winners
from app.analyses.saliency.solver import (
    INFEASIBLE,
    NO_MASK,
    OPTIMAL,
    SOLVERS,
    TIMEOUT,
    UNPROVEN,
    MaskProblem,
    solve_mask,
)
from app.errors import InvalidInputError
from app.network import Network
from app.progress import ProgressFn, report

DEFAULT_SOLVER = "highs"


@dataclass(frozen=True)
class Neuron:
    """A selected first-layer neuron (flat index into the first ReLU's input)."""

    index: int
    ig: float
    pre_activation: float
    masked_pre_activation: float


@dataclass
class SaliencyResult:
    target: int
    threshold: float
    top_k: int
    patch: int | None  # side of the square groups; None for superpixels
    status: str  # OPTIMAL, TIMEOUT, INFEASIBLE, NO_MASK or UNPROVEN (see .solver)
    solver: str
    iterations: int
    lower_bound: int
    groups: np.ndarray  # group id of every input element, shaped like x
    group_mask: np.ndarray  # [num_groups] bool
    mask: np.ndarray  # bool, shaped like x
    ranking: list[int]  # kept group ids, most important first
    saliency: np.ndarray  # ranked SMT map shaped like x: (n - rank) / n on kept groups, else 0
    neurons: list[Neuron]
    ig: np.ndarray  # input IG, shaped like x
    smoothgrad: np.ndarray  # SmoothGrad, shaped like x
    baseline: np.ndarray  # value of masked-out features, shaped like x
    grades: dict[str, Grade] = field(default_factory=dict)  # "smt", "ig", "smoothgrad"
    winners: dict[str, list[str]] = field(default_factory=dict)  # best per measure (ties)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def mask_size(self) -> int:
        return int(self.group_mask.sum())

    @property
    def num_groups(self) -> int:
        return int(self.group_mask.size)


def smt_mask(
    net: Network,
    x: Tensor | np.ndarray,
    target: int | None = None,
    top_k: int = 10,
    threshold: float = 0.5,
    granularity: int | str | None = None,
    timeout_s: float = 30.0,
    baseline: float | str | np.ndarray | Tensor = 0.0,
    solver: str = DEFAULT_SOLVER,
    progress: ProgressFn | None = None,
) -> SaliencyResult:
    """The smallest input mask keeping the top-``k`` first-layer neurons (by IG) at
    ``>= threshold`` of their value, ranked and graded against IG and SmoothGrad.

    The guarantee is about those first-layer neurons only, not the decision.
    ``baseline``: a number, ``"blurred"`` or one value per element of ``x``.

    ``granularity`` is the side of the square patches that share one mask bit (``None``:
    single features up to MNIST size, patches giving at most 256 groups above it), or
    ``"superpixel"``: SLIC superpixels of ``x``, so the mask follows the image's edges.
    """
    start = time.monotonic()
    if top_k < 1 or not 0 < threshold <= 2 or timeout_s <= 0 or solver not in SOLVERS:
        raise InvalidInputError(
            f"need top_k >= 1, 0 < threshold <= 2, timeout_s > 0 and solver in {SOLVERS}")
    net = net.with_dtype(torch.float64).eval().requires_grad_(False)
    x = torch.as_tensor(x, dtype=torch.float64, device=net.device).reshape(net.input_shape)
    base = make_baseline(x, baseline)
    relu = first_relu(net)
    with torch.no_grad():
        logits = net(x[None])[0]
        pre = pre_activations(net, relu, x[None])[0]
    target = int(logits.argmax()) if target is None else int(target)
    if not 0 <= target < logits.numel():
        raise InvalidInputError(f"target {target} is not one of the {logits.numel()} classes")

    report(progress, 0.02, "selecting first-layer neurons by integrated gradients")
    scores = neuron_ig(net, relu, x, base, target)
    useful = torch.nonzero((pre > 0) & (scores > 0)).reshape(-1)
    chosen = useful[scores[useful].argsort(descending=True)[:top_k]]
    timings = {"select_s": time.monotonic() - start}
    report(progress, 0.1, f"neurons selected: {chosen.numel()}")

    if granularity == SUPERPIXEL:
        patch, groups = None, superpixel_groups(x)
    elif isinstance(granularity, str):
        raise InvalidInputError(f"granularity must be a patch side or {SUPERPIXEL!r}")
    else:
        patch = auto_patch(net.input_shape) if granularity is None else int(granularity)
        groups = feature_groups(net.input_shape, patch, x.device)
    coeff, const = mask_coefficients(net, relu, x, base, groups, chosen)
    problem = MaskProblem(*(t.cpu().numpy() for t in (coeff, const, threshold * pre[chosen])))
    change = np.abs(problem.coeff.sum(axis=0))
    share = (problem.coeff / np.where(change > 0, change, 1.0)).sum(axis=1)
    inert = (group_sum((x - base).abs(), groups) == 0).cpu().numpy()

    def poll(iterations: int, best: int, lower: int) -> None:
        gap = 1.0 if best <= lower else lower / best
        report(progress, 0.15 + 0.6 * gap,
               f"solver iteration {iterations}: best mask size {best}, lower bound {lower}")

    solution = solve_mask(problem, timeout_s, solver, np.argsort(share), poll)
    timings["solve_s"] = solution.solve_s
    report(progress, 0.8, f"mask: {int(solution.mask.sum())} features ({solution.status}); "
                          "grading against IG and SmoothGrad")

    group_mask = torch.from_numpy(solution.mask).to(x.device)
    by_share = ranking(share, inert, x.device)
    order = torch.cat([by_share[group_mask[by_share]], by_share[~group_mask[by_share]]])
    kept = int(group_mask.sum())
    top = order[:kept]
    rank_value = torch.zeros(group_mask.numel(), dtype=torch.float64, device=x.device)
    rank_value[top] = (kept - torch.arange(kept, dtype=torch.float64, device=x.device)) / max(
        kept, 1)
    with torch.no_grad():
        masked_pre = pre_activations(
            net, relu, masked_input(x, base, groups, group_mask[None]))[0, chosen]
    ig_map = input_ig(net, x, base, target)
    sg_map = smoothgrad(net, x, target)
    grades = {}
    if solution.status not in (INFEASIBLE, NO_MASK):
        for name, ranked in (("smt", order),
                             ("ig", ranking(_np(group_sum(ig_map, groups)), inert, x.device)),
                             ("smoothgrad", ranking(_np(group_sum(sg_map, groups)), inert,
                                                    x.device))):
            grades[name] = grade(net, x, base, groups, ranked, kept, target)
    timings["total_s"] = time.monotonic() - start
    report(progress, 1.0, f"done: {kept} features, {solution.status}")
    return SaliencyResult(
        target=target, threshold=threshold, top_k=top_k, patch=patch, status=solution.status,
        solver=solver, iterations=solution.iterations, lower_bound=solution.lower_bound,
        groups=_np(groups), group_mask=solution.mask, mask=solution.mask[_np(groups)],
        ranking=[int(g) for g in top], saliency=_np(rank_value[groups]),
        neurons=[Neuron(int(i), float(scores[i]), float(pre[i]), float(m))
                 for i, m in zip(chosen, masked_pre, strict=True)],
        ig=_np(ig_map), smoothgrad=_np(sg_map), baseline=_np(base), grades=grades,
        winners=winners(grades), timings=timings,
    )


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


__all__ = ["BLURRED", "INFEASIBLE", "NO_MASK", "OPTIMAL", "SUPERPIXEL", "TIMEOUT", "UNPROVEN",
           "Grade", "Neuron", "SaliencyResult", "smt_mask"]
