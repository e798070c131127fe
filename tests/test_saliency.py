"""SMT saliency masks against independent oracles: plain forward passes of the torch modules
(or of the ONNX file's own weights), brute-force enumeration of every mask, and the network's
output for IG's completeness."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from app import Cancelled, load_network
from app.analyses.saliency import INFEASIBLE, OPTIMAL, TIMEOUT, smt_mask
from tests.conftest import shared_path
from tests.saliency_oracle import TOL, first_pre, holds


def _fc(seed: int, n_in: int = 64, hidden: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(),
                         nn.Linear(hidden, 3)).double().eval()


def _conv(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 7 * 7, 3)).double().eval()


def _check_mask(model: nn.Sequential, x: torch.Tensor, res) -> None:
    """Thresholds hold on the mask; an optimal mask loses a constraint without any kept group."""
    mask = torch.from_numpy(res.mask)
    assert holds(model, x, mask[None], res).item()
    if res.status == OPTIMAL:
        groups = torch.from_numpy(res.groups)
        kept = np.flatnonzero(res.group_mask)
        drops = torch.stack([mask & (groups != g) for g in kept]) if len(kept) else mask[:0]
        assert not holds(model, x, drops, res).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("solver", ["bisection", "optimize"])
def test_minimal_mask_size_equals_brute_force(seed: int, solver: str) -> None:
    torch.manual_seed(100 + seed)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).double().eval()
    net = load_network(model, input_shape=(12,))
    x = torch.rand(12, dtype=torch.float64)
    every = torch.tensor(list(itertools.product([0, 1], repeat=12)), dtype=torch.bool)
    for top_k, threshold in [(3, 0.5), (6, 0.9)]:
        res = smt_mask(net, x, top_k=top_k, threshold=threshold, solver=solver)
        assert res.status == OPTIMAL
        ok = holds(model, x, every, res)
        assert res.mask_size == int(every[ok].sum(1).min())
        assert res.mask.shape == (12,)
        _check_mask(model, x, res)


def test_masks_on_digit_sized_inputs_keep_thresholds_and_are_minimal() -> None:
    for seed in range(3):
        model = _fc(seed)
        net = load_network(model, input_shape=(1, 8, 8))
        x = torch.rand(1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        res = smt_mask(net, x, top_k=5, threshold=0.6)
        assert res.status == OPTIMAL and res.patch == 1 and res.num_groups == 64
        assert 0 < len(res.neurons) <= 5
        orig = first_pre(model, x[None])[0]
        assert all(orig[n.index] > 0 for n in res.neurons)
        _check_mask(model, x, res)
        # the ranked map is positive exactly on the mask, largest on the first-ranked group
        assert ((res.saliency > 0) == res.mask).all()
        assert res.saliency[res.groups == res.ranking[0]].max() == res.saliency.max()


def test_patches_on_a_cifar_shaped_input() -> None:
    model = _conv(3)
    net = load_network(model, input_shape=(3, 16, 16))
    x = torch.rand(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for patch in (2, 4):
        res = smt_mask(net, x, top_k=6, threshold=0.5, granularity=patch)
        assert res.num_groups == (16 // patch) ** 2
        assert res.status == OPTIMAL
        # all channels of a patch share one mask bit
        m = res.mask.reshape(3, 16 // patch, patch, 16 // patch, patch)
        assert (m == m[:1, :, :1, :, :1]).all()
        _check_mask(model, x, res)


def test_infeasible_threshold_is_reported_and_confirmed_by_brute_force() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.zero_()
    net = load_network(model, input_shape=(10,))
    x = torch.rand(10, dtype=torch.float64) + 0.1
    res = smt_mask(net, x, top_k=3, threshold=1.5)
    assert res.status == INFEASIBLE
    every = torch.tensor(list(itertools.product([0, 1], repeat=10)), dtype=torch.bool)
    assert not holds(model, x, every, res).any()
    assert res.grades == {}


def _mnist(rows: int) -> tuple[str, np.ndarray]:
    path = shared_path("vnncomp2021", "mnistfc", "mnist-net_256x2.onnx")
    data = np.loadtxt(shared_path("eran", "mnist_test.csv"), delimiter=",", max_rows=rows, ndmin=2)
    return str(path), data


def test_mnist_masks_hold_under_the_onnx_weights_and_are_minimal() -> None:
    path, data = _mnist(2)
    net = load_network(path)
    graph = onnx.load(path).graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in graph.initializer}
    w, b = inits[gemm.input[1]], inits[gemm.input[2]]
    w = w.T if any(a.name == "transB" and a.i == 0 for a in gemm.attribute) else w
    for row in data:
        x = row[1:] / 255.0
        res = smt_mask(net, x.reshape(784, 1), top_k=10, threshold=0.5, timeout_s=60)
        assert res.target == int(row[0]) and res.status == OPTIMAL
        idx = [n.index for n in res.neurons]
        orig = w @ x + b
        kept = res.mask.reshape(-1)
        assert np.all(w[idx] @ (x * kept) + b[idx] >= 0.5 * orig[idx] - TOL)
        for g in np.flatnonzero(kept):
            drop = kept.copy()
            drop[g] = False
            assert np.any(w[idx] @ (x * drop) + b[idx] < 0.5 * orig[idx] - TOL)
        assert set(res.grades) == {"smt", "ig", "smoothgrad"}
        assert all(g.kept == res.mask_size for g in res.grades.values())


def test_time_out_returns_the_best_mask_found_so_far() -> None:
    path, data = _mnist(1)
    model_net = load_network(path)
    x = data[0, 1:] / 255.0
    res = smt_mask(model_net, x.reshape(784, 1), top_k=10, threshold=0.5, timeout_s=1e-4)
    assert res.status == TIMEOUT
    assert res.lower_bound < res.mask_size
    # the returned mask still keeps every selected neuron (engine forward pass, float64)
    net64 = model_net.with_dtype(torch.float64)
    masked = torch.from_numpy(x * res.mask.reshape(-1)).reshape(1, 784, 1)
    pre = net64.pre_activations(masked)[2].reshape(-1)
    for n in res.neurons:
        assert pre[n.index] >= 0.5 * n.pre_activation - TOL


def test_progress_reports_solver_state_and_cancel_stops_the_solve() -> None:
    net = load_network(_fc(4), input_shape=(1, 8, 8))
    x = torch.rand(1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    messages: list[str] = []
    smt_mask(net, x, top_k=5, progress=lambda f, m: messages.append(m))
    assert any("neurons selected" in m for m in messages)
    assert any("solver iteration" in m and "best mask size" in m for m in messages)

    def cancel(frac: float, msg: str) -> None:
        if "solver iteration" in msg:
            raise Cancelled("user cancelled")

    with pytest.raises(Cancelled):
        smt_mask(net, x, top_k=5, progress=cancel)


def test_grades_agree_with_direct_forward_passes() -> None:
    model = _fc(5)
    with torch.no_grad():
        model[1].bias.zero_()  # the baseline alone then keeps no neuron
    net = load_network(model, input_shape=(1, 8, 8))
    x = torch.rand(1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    res = smt_mask(net, x, top_k=8, threshold=0.9)
    assert res.mask_size > 0
    with torch.no_grad():
        logits = model(x[None])[0]
        probs = lambda z: torch.softmax(model(z[None]), 1)[0, res.target].item()  # noqa: E731
        # IG completeness: attributions sum to the logit difference from the baseline
        base_logit = model(torch.zeros(1, 1, 8, 8, dtype=torch.float64))[0, res.target]
        assert abs(res.ig.sum() - (logits[res.target] - base_logit).item()) < 1e-2
        smt = res.grades["smt"]
        masked = x * torch.from_numpy(res.mask)
        assert smt.survives == (int(model(masked[None]).argmax()) == res.target)
        assert smt.insertion_curve[0] == pytest.approx(probs(torch.zeros_like(x)))
        assert smt.insertion_curve[-1] == pytest.approx(probs(masked))
        assert smt.deletion_curve[0] == pytest.approx(probs(x))
        # Dabkowski & Gal: tight box around the mask, input kept inside it only
        rows, cols = np.nonzero(res.mask[0])
        box = np.zeros((8, 8), bool)
        box[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1] = True
        crop = x * torch.from_numpy(box)
        expect = np.log(max(box.mean(), 0.05)) - np.log(probs(crop))
        assert smt.saliency_metric == pytest.approx(expect)
        assert smt.sparsity == pytest.approx(1 - res.mask_size / 64)
