"""ReLU-split branch and bound (``verify(..., "bab")`` on inputs too large to split) against
an exact MILP (HiGHS), sampling and PGD with the torch model the network was loaded from,
onnxruntime and the VNN-COMP 2021 results: it proves what CROWN and alpha-CROWN cannot,
never proves a property with a point that breaks it, and every counterexample meets its
case under an independent forward pass."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from app import load_network
from app.properties import milp, relu_bab
from app.properties.verify import _box, check_counterexample, verify
from app.properties.vnnlib import Case, VnnProperty, read_vnnlib
from tests.conftest import shared_path
from tests.test_bounds import _known_outcomes
from tests.test_vnnlib import _meets, _onnx_output


def _mlp(seed: int, n_in: int = 20, width: int = 24) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 3)).eval()
    return model, load_network(model, input_shape=(n_in,))


def _robustness(x: np.ndarray, eps: float, label: int) -> VnnProperty:
    """"``label`` wins on the L-inf ball": one case per rival ``j`` (``y_label - y_j <= 0``)."""
    cases = []
    for j in range(3):
        if j != label:
            row = np.zeros((1, 3))
            row[0, label], row[0, j] = 1.0, -1.0
            cases.append(Case(x - eps, x + eps, row, np.zeros(1)))
    return VnnProperty(len(x), 3, cases)


def _worst_violation(model: nn.Module, case: Case, seed: int) -> float:
    """Least ``max_k (c_k y - d_k)`` over 4000 samples and 100 PGD runs with the torch model."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (torch.as_tensor(t, dtype=torch.float32) for t in (case.lo, case.hi))
    rows, rhs = (torch.as_tensor(t, dtype=torch.float32) for t in (case.rows, case.rhs))
    x = lo + (hi - lo) * torch.rand(4000, lo.numel(), generator=gen)
    with torch.no_grad():
        worst = float((model(x) @ rows.T - rhs).amax(1).min())
    z = x[:100].clone()
    for i in range(60):
        z.requires_grad_(True)
        viol = (model(z) @ rows.T - rhs).amax(1)
        worst = min(worst, float(viol.detach().min()))
        (grad,) = torch.autograd.grad(viol.sum(), z)
        z = torch.minimum(torch.maximum(z.detach() - (hi - lo) / 10 * (1 - i / 60) * grad.sign(),
                                        lo), hi)
    return worst


@pytest.mark.parametrize("seed,radii", [(0, (0.14, 0.2, 0.26)), (1, (0.1, 0.12, 0.16))])
def test_relu_splits_prove_what_crown_cannot_and_agree_with_an_exact_milp(
        seed: int, radii: tuple[float, ...]) -> None:
    model, net = _mlp(seed)
    x = np.random.default_rng(seed).uniform(0, 1, 20)
    with torch.no_grad():
        label = int(model(torch.tensor(x, dtype=torch.float32)[None]).argmax())
    beyond_crown = 0
    for eps in radii:
        prop = _robustness(x, eps, label)
        exact = [milp.refute(net, case, 30) for case in prop.cases]
        holds = all(ok for ok, _, _ in exact)
        # the MILP's answer is exact: refuted everywhere, or some case's minimum is <= ~0
        assert holds or min(bound for _, bound, _ in exact) <= 1e-5
        verdict = verify(net, prop, "bab", time_limit=20)
        bounds_only = [verify(net, prop, m, time_limit=10).status for m in ("crown", "alpha-crown")]
        if verdict.status == "proven":
            assert holds
            assert all(_worst_violation(model, c, seed) > 0 for c in prop.cases)
            if "proven" not in bounds_only:
                assert "ReLU-split" in verdict.message
                beyond_crown += 1
        else:
            assert not holds, f"eps {eps}: {verdict.message}"
        if verdict.status == "counterexample":
            case = prop.cases[verdict.case]
            with torch.no_grad():
                y = model(torch.as_tensor(verdict.counterexample)[None])[0].double().numpy()
            assert ((case.lo <= verdict.counterexample) & (verdict.counterexample <= case.hi)).all()
            assert (case.rows @ y <= case.rhs).all()
    assert beyond_crown >= 1


def test_refute_finds_or_leaves_open_a_violated_case_on_a_small_net() -> None:
    """Straight into the search (no attack first) on a case an exact MILP shows violated:
    never refuted, and a point it returns meets the case under the torch model."""
    model, net = _mlp(1)
    x = np.random.default_rng(1).uniform(0, 1, 20)
    with torch.no_grad():
        label = int(model(torch.tensor(x, dtype=torch.float32)[None]).argmax())
    prop = _robustness(x, 0.3, label)
    violated = [c for c in prop.cases if not milp.refute(net, c, 30)[0]]
    assert violated
    case = violated[0]
    lo, hi = _box(net, case)
    ch = relu_bab.chain(net, lo, hi, torch.as_tensor(case.rows)[None].double(),
                        -torch.as_tensor(case.rhs)[None].double(), 5)
    res = relu_bab.refute(net, [case], ch, time.monotonic() + 10, None,
                          lambda _, z: check_counterexample(net, case, z))
    assert res.status != "refuted"
    if res.status == "counterexample":
        with torch.no_grad():
            y = model(res.point.float()[None])[0].double().numpy()
        assert (case.rows @ y <= case.rhs + 1e-6).all()


@pytest.mark.parametrize("prop_name", ["prop_7_0.03.vnnlib", "prop_0_0.05.vnnlib"])
def test_violated_mnistfc_instances_are_never_proven_by_relu_splits(prop_name: str) -> None:
    """Known-violated mnistfc instances: ``verify`` answers a counterexample that onnxruntime
    confirms, and the branch and bound run directly on that case (no attack) never refutes
    it."""
    folder = shared_path("vnncomp2021", "mnistfc")
    onnx = folder / "mnist-net_256x2.onnx"
    assert _known_outcomes(shared_path("vnncomp2021", "results_csv"))[
        ("mnist-net_256x2.onnx", prop_name)] == "violated"
    net = load_network(str(onnx))
    prop = read_vnnlib(folder / prop_name)
    verdict = verify(net, prop, "bab", time_limit=20)
    assert verdict.status != "proven"
    if verdict.status != "counterexample":
        return
    x = verdict.counterexample.reshape(-1).astype(np.float64)
    assert _meets(prop, x, _onnx_output(onnx, x).astype(np.float64))
    case = prop.cases[verdict.case]
    lo, hi = _box(net, case)
    ch = relu_bab.chain(net, lo, hi, torch.as_tensor(case.rows)[None].double(),
                        -torch.as_tensor(case.rhs)[None].double(), 2)
    res = relu_bab.refute(net, [case], ch, time.monotonic() + 5, None,
                          lambda _, z: check_counterexample(net, case, z))
    assert res.status != "refuted"
    if res.status == "counterexample":
        z = res.point.numpy()
        assert _meets(prop, z, _onnx_output(onnx, z).astype(np.float64))


def test_a_safe_mnistfc_instance_beyond_alpha_crown_is_proven() -> None:
    """mnist-net_256x2 prop_13_0.03 (proven by the 2021 tools): alpha-CROWN alone leaves it
    open, ReLU splits prove it; onnxruntime on samples of each case's box agrees."""
    folder = shared_path("vnncomp2021", "mnistfc")
    onnx = folder / "mnist-net_256x2.onnx"
    prop_name = "prop_13_0.03.vnnlib"
    assert _known_outcomes(shared_path("vnncomp2021", "results_csv"))[
        ("mnist-net_256x2.onnx", prop_name)] == "holds"
    net = load_network(str(onnx))
    prop = read_vnnlib(folder / prop_name)
    verdict = verify(net, prop, "bab", time_limit=60)
    assert verdict.status == "proven", verdict.message
    assert "ReLU-split" in verdict.message
    gen = np.random.default_rng(0)
    case = prop.cases[0]
    for x in gen.uniform(case.lo, case.hi, size=(50, prop.n_inputs)):
        assert not _meets(prop, x, _onnx_output(onnx, x).astype(np.float64))


@pytest.mark.parametrize("seed,scale", [(2, 1e-3), (3, 1.0), (4, 1e4)])
def test_a_case_met_by_a_known_point_is_never_refuted_at_any_logit_scale(
        seed: int, scale: float) -> None:
    """The slopes are searched in float32: a case that a known point meets by a margin far
    below float32's resolution of the logits (``1e-8`` of them) must still never be refuted.
    The point is PGD's best on the case, then the case's right-hand side is moved so that
    the point meets it, checked in float64 with the torch model. (Taking the float32 bound
    as it is refutes the seed-3 case.)"""
    model, _ = _mlp(seed)
    with torch.no_grad():
        model[-1].weight.mul_(scale)
        model[-1].bias.mul_(scale)
    net = load_network(model, input_shape=(20,))
    x = np.random.default_rng(seed).uniform(0, 1, 20)
    with torch.no_grad():
        label = int(model(torch.tensor(x, dtype=torch.float32)[None]).argmax())
    case = _robustness(x, 0.05, label).cases[0]
    lo, hi = (torch.as_tensor(t) for t in (case.lo, case.hi))
    model64 = model.double()
    z = (lo + (hi - lo) * torch.rand(64, 20, generator=torch.Generator().manual_seed(seed)))
    for i in range(100):  # PGD towards the case's least value
        z.requires_grad_(True)
        (grad,) = torch.autograd.grad((model64(z) @ torch.as_tensor(case.rows).T).sum(), z)
        z = torch.minimum(torch.maximum(z.detach() - 0.02 * (1 - i / 100) * grad.sign(), lo), hi)
    with torch.no_grad():
        y = model64(z)
        values = (y @ torch.as_tensor(case.rows).T).amax(1) - torch.as_tensor(case.rhs)
        best = int(values.argmin())
        margin = 1e-8 * float(y.abs().max())
    met = Case(case.lo, case.hi, case.rows, case.rhs + float(values[best]) + margin)
    with torch.no_grad():
        assert (model64(z[best:best + 1])[0] @ torch.as_tensor(met.rows).T
                <= torch.as_tensor(met.rhs)).all()
    lo_t, hi_t = _box(net, met)
    ch = relu_bab.chain(net, lo_t, hi_t, torch.as_tensor(met.rows)[None].double(),
                        -torch.as_tensor(met.rhs)[None].double(), 2)
    # no point is accepted as a counterexample, so the search goes on to its finest leaves
    res = relu_bab.refute(net, [met], ch, time.monotonic() + 4, None, lambda *_: False)
    assert res.status == "unknown", res.reason
