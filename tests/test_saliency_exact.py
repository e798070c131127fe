"""Every SMT saliency status against independent oracles, for any baseline and threshold:
brute force over every group mask with the torch module's own forward pass (<= 16 groups:
single features, patches, superpixels), and on the digits sample models a second exact solver
(z3 against the default HiGHS, or the reverse) on a problem rebuilt from onnxruntime's
first-layer outputs, never from the engine's coefficients."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from app import load_network
from app.analyses.saliency import (
    INFEASIBLE,
    NO_MASK,
    OPTIMAL,
    SUPERPIXEL,
    TIMEOUT,
    smt_mask,
)
from app.analyses.saliency.solver import MaskProblem, greedy_mask, solve_mask
from tests.conftest import SAMPLE_MODELS
from tests.saliency_oracle import every_mask, first_pre, onnx_first_pre, slack

THRESHOLDS = (0.5, 1.0, 2.0)


def _baseline(kind: str, shape: tuple[int, ...]) -> float | str | np.ndarray:
    """The baselines the statuses must hold for: constants, blurred input, per-pixel random."""
    if kind == "random":
        return np.random.default_rng(42).uniform(-0.5, 1.0, shape)
    return {"zero": 0.0, "half": 0.5, "negative": -0.3, "blurred": "blurred"}[kind]


BASELINES = ("zero", "half", "negative", "blurred", "random")


def _check_brute_force(pre, x: torch.Tensor, res, timeout_s: float) -> None:
    """The status against every group mask: the mask holds, ``optimal`` is the smallest size
    (between the masks that surely hold and those that hold within float tolerance),
    ``infeasible`` means no mask holds even within tolerance."""
    groups = torch.from_numpy(res.groups)
    every = every_mask(res.num_groups)
    sure, maybe = slack(pre, x, every[:, groups], res)
    assert res.status != TIMEOUT or res.timings["solve_s"] >= timeout_s
    assert res.status != NO_MASK
    if res.status == INFEASIBLE:
        assert not maybe.any()
        assert res.threshold > 1  # the full mask is a known point below that
        return
    assert maybe[every.tolist().index(res.group_mask.tolist())]
    assert res.status == OPTIMAL
    smallest_maybe = int(every[maybe].sum(1).min())
    smallest_sure = int(every[sure].sum(1).min()) if sure.any() else res.num_groups + 1
    assert smallest_maybe <= res.mask_size <= smallest_sure
    assert res.lower_bound >= res.mask_size


@pytest.mark.parametrize("kind", BASELINES)
@pytest.mark.parametrize("solver", ["highs", "bisection", "optimize"])
def test_single_features_match_brute_force(kind: str, solver: str) -> None:
    statuses = set()
    for seed in range(3):
        torch.manual_seed(200 + seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(),
                              nn.Linear(10, 3)).double().eval()
        net = load_network(model, input_shape=(1, 3, 4))
        x = torch.rand(1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        for threshold in THRESHOLDS:
            res = smt_mask(net, x, top_k=5, threshold=threshold, solver=solver,
                           baseline=_baseline(kind, (1, 3, 4)), timeout_s=20)
            assert res.num_groups == 12
            _check_brute_force(partial(first_pre, model), x, res, 20)
            statuses.add(res.status)
    assert OPTIMAL in statuses


@pytest.mark.parametrize("kind", BASELINES)
def test_patches_and_superpixels_match_brute_force(kind: str) -> None:
    digits = np.load(SAMPLE_MODELS / "gallery" / "digits.npz")
    torch.manual_seed(13)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                          nn.Linear(16, 10)).double().eval()
    net = load_network(model, input_shape=(1, 8, 8))
    x = torch.from_numpy(digits["x"][3].astype(np.float64))
    for granularity in (3, SUPERPIXEL):  # 3x3 patches: 9 groups; superpixels: <= 16
        for threshold in THRESHOLDS:
            res = smt_mask(net, x, top_k=6, threshold=threshold, granularity=granularity,
                           baseline=_baseline(kind, (1, 8, 8)))
            assert res.num_groups <= 16
            _check_brute_force(partial(first_pre, model), x, res, 30)


def _onnx_problem(pre, x: torch.Tensor, res) -> MaskProblem:
    """The mask problem rebuilt from onnxruntime forward passes: each group's effect is the
    change of the selected neurons when that group alone is set from the baseline to ``x``."""
    idx = [n.index for n in res.neurons]
    base = torch.as_tensor(res.baseline).reshape(x.shape)
    groups = torch.from_numpy(res.groups)
    one_hot = torch.eye(res.num_groups, dtype=torch.bool)[:, groups]
    const = pre(base[None])[0, idx]
    coeff = pre(base + one_hot.double() * (x - base))[:, idx] - const
    rhs = res.threshold * pre(x[None])[0, idx]
    return MaskProblem(coeff.numpy(), const.numpy(), rhs.numpy())


def _shifted(problem: MaskProblem, margin: float) -> MaskProblem:
    """The same constraints with ``rhs`` moved by ``margin`` of each one's scale."""
    return MaskProblem(problem.coeff, problem.const, problem.rhs + margin * problem.scale)


def _z3_size(problem: MaskProblem) -> float:
    """z3's minimum mask size, ``inf`` when it proves that no mask exists."""
    sol = solve_mask(problem, timeout_s=30, solver="bisection")
    assert sol.status in (OPTIMAL, INFEASIBLE)
    return float(sol.mask.sum()) if sol.status == OPTIMAL else np.inf


@pytest.mark.parametrize("name", ["digits_fc_standard", "digits_conv_pgd"])
def test_highs_and_z3_agree_on_the_digit_sample_models(name: str) -> None:
    """HiGHS on the engine's float64 problem; z3 on onnxruntime's float32 one, relaxed and
    tightened by float32 rounding (1e-5 of each constraint's scale): the size lies between."""
    path = str(SAMPLE_MODELS / f"{name}.onnx")
    net, pre = load_network(path), onnx_first_pre(path)
    digits = np.load(SAMPLE_MODELS / "gallery" / "digits.npz")
    x = torch.from_numpy(digits["x"][7].astype(np.float64))
    seen = set()
    for kind in BASELINES:
        for threshold in THRESHOLDS:
            res = smt_mask(net, x, top_k=8, threshold=threshold, baseline=_baseline(kind, x.shape))
            assert res.status in (OPTIMAL, INFEASIBLE)
            seen.add((res.status, threshold))
            problem = _onnx_problem(pre, x, res)
            low, high = _z3_size(_shifted(problem, -1e-5)), _z3_size(_shifted(problem, 1e-5))
            if res.status == INFEASIBLE:
                assert threshold > 1 and low == np.inf
                continue
            assert slack(pre, x, torch.from_numpy(res.mask)[None], res, tol=1e-5)[1].item()
            assert low <= res.mask_size <= high
            if threshold != 1.0:  # away from the full mask's own value, no float borderline
                assert low == high
    assert (OPTIMAL, 2.0) in seen or (INFEASIBLE, 2.0) in seen


def test_z3_verdicts_checked_by_highs_on_a_sample_model() -> None:
    """The reverse direction: z3 (SMUG's solver) on the engine, HiGHS on onnxruntime's numbers."""
    path = str(SAMPLE_MODELS / "digits_fc_pgd.onnx")
    net, pre = load_network(path), onnx_first_pre(path)
    x = torch.from_numpy(np.load(SAMPLE_MODELS / "gallery" / "digits.npz")["x"][2]
                         .astype(np.float64))
    for kind, threshold in (("half", 0.5), ("blurred", 2.0), ("random", 0.5), ("zero", 1.0)):
        res = smt_mask(net, x, top_k=8, threshold=threshold, solver="bisection",
                       baseline=_baseline(kind, x.shape))
        problem = _onnx_problem(pre, x, res)
        low = solve_mask(_shifted(problem, -1e-5), timeout_s=30, solver="highs")
        high = solve_mask(_shifted(problem, 1e-5), timeout_s=30, solver="highs")
        if res.status == INFEASIBLE:
            assert low.status == INFEASIBLE
            continue
        assert res.status == low.status == OPTIMAL
        assert low.mask.sum() <= res.mask_size
        assert high.status == INFEASIBLE or res.mask_size <= high.mask.sum()


def test_greedy_mask_repeats_passes_until_no_group_can_be_dropped() -> None:
    # g1 blocks dropping g0 until g1 itself is dropped: one pass keeps g0, two drop both
    problem = MaskProblem(np.array([[1.0], [-1.0]]), np.zeros(1), np.zeros(1))
    assert greedy_mask(problem, np.array([0, 1])).sum() == 0
    rng = np.random.default_rng(0)
    for _ in range(30):
        coeff = rng.normal(size=(14, 4))
        problem = MaskProblem(coeff, np.zeros(4), coeff.sum(0) * rng.uniform(0.2, 1.0, 4))
        mask = greedy_mask(problem, rng.permutation(14))
        if mask is None:
            assert not problem.holds(np.ones(14, bool))
            continue
        assert problem.holds(mask)
        for g in np.flatnonzero(mask):
            drop = mask.copy()
            drop[g] = False
            assert not problem.holds(drop)


@pytest.mark.parametrize("solver", ["highs", "bisection", "optimize"])
def test_constraints_whose_cut_rounds_to_nothing_are_solved_not_timed_out(solver: str) -> None:
    # any single group meets the constraint: the LP dual gives s = 1, so every term of the
    # reduced-cost cut (s_g - 1) rounds to zero (z3.PbGe([], k) raised here)
    problem = MaskProblem(np.ones((3, 1)), np.zeros(1), np.ones(1))
    sol = solve_mask(problem, timeout_s=30, solver=solver)
    assert sol.status == OPTIMAL and sol.mask.sum() == 1 and sol.solve_s < 30


@pytest.mark.parametrize("solver", ["highs", "bisection"])
def test_infeasible_only_when_no_mask_exists(solver: str) -> None:
    # each group helps one constraint and hurts the other: keeping every positive group fails,
    # yet {0, 1} holds (the old rule "keep every positive group" called this infeasible)
    coeff = np.array([[3.0, -1.0], [-1.0, 3.0], [2.0, -3.0], [-3.0, 2.0]])
    problem = MaskProblem(coeff, np.zeros(2), np.array([1.5, 1.5]))
    sol = solve_mask(problem, solver=solver)
    every = every_mask(4).numpy()
    sizes = [m.sum() for m in every if problem.holds(m)]
    assert sol.status == OPTIMAL and sol.mask.sum() == min(sizes) == 2
    impossible = MaskProblem(coeff, np.zeros(2), np.array([2.5, 2.5]))
    assert not any(impossible.holds(m) for m in every)
    assert solve_mask(impossible, solver=solver).status == INFEASIBLE
