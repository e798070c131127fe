"""Input properties (Prophecy's form) on ACAS Xu, against independent oracles.

The polytope of an input's activation pattern up to a layer, within the input box, implies
the decision. Where the pattern fixes every ReLU the verdict is an LP; it is checked here by
hit-and-run sampling inside the polytope, whose only membership test is a float64 forward
pass (same pattern as the input), and each counterexample by its own forward pass. Scaling
the logits must not change any verdict.
"""

from __future__ import annotations

import copy

import torch

from app import load_network
from app.analyses.patterns import InputDomain, input_property
from tests.conftest import shared_path
from tests.test_patterns import _hit_and_run

torch.set_num_threads(1)
LO = torch.tensor([-0.328422877, -0.5, -0.5, -0.5, -0.5], dtype=torch.float64).reshape(1, 1, 5)
HI = torch.tensor([0.679857769, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64).reshape(1, 1, 5)


def _same_pattern(net64, x0: torch.Tensor, node: int):
    ref = net64.activation_patterns(x0[None])

    def member(z: torch.Tensor) -> torch.Tensor:
        got = net64.activation_patterns(z)
        ok = torch.ones(z.shape[0], dtype=torch.bool)
        for i in net64.relu_indices:
            if i <= node:
                ok &= (got[i] == ref[i]).reshape(z.shape[0], -1).all(1)
        return ok

    return member


def _check(net, poly, x0: torch.Tensor, box: InputDomain, samples: int) -> None:
    net64 = net.with_dtype(torch.float64)
    member = _same_pattern(net64, x0, poly.node)
    verdict = poly.verdict
    if verdict.status == "counterexample":
        ce = verdict.counterexample[None]
        assert ce.dtype == torch.float64 and bool(((ce >= box.lo) & (ce <= box.hi)).all())
        assert bool(member(ce)[0])
        with torch.no_grad():
            assert int(net64(ce)[0].argmin()) == verdict.counterexample_class != poly.target
    elif verdict.status == "proven":
        pts = _hit_and_run(member, x0[None].repeat(40, 1, 1, 1), box.lo, box.hi, n=samples)
        assert bool(member(pts).all())
        with torch.no_grad():
            assert bool((net64(pts).argmin(1) == poly.target).all())


def test_complete_patterns_are_decided_by_lp_and_survive_sampling() -> None:
    net = load_network(str(shared_path("vnncomp2021", "acasxu",
                                       "ACASXU_run2a_1_1_batch_2000.onnx")))
    box = InputDomain.box(net, LO, HI)
    gen = torch.Generator().manual_seed(11)
    xs = LO + (HI - LO) * torch.rand((10, 1, 1, 5), generator=gen, dtype=torch.float64)
    tiny = copy.deepcopy(net)
    with torch.no_grad():
        tiny.layers[-1].weight.mul_(1e-9)
        tiny.layers[-1].bias.mul_(1e-9)
    statuses = []
    for x0 in xs:
        poly = input_property(net, x0, box, layer=6, lowest=True, count_facets=False)
        assert poly.verdict.status != "unknown", poly.verdict.message
        assert poly.verdict.seconds < 2.0  # LPs, not a MILP
        _check(net, poly, x0, box, 320)
        statuses.append(poly.verdict.status)
        scaled = input_property(tiny, x0, box, layer=6, lowest=True, count_facets=False)
        assert scaled.verdict.status == poly.verdict.status, scaled.verdict.message
    assert statuses.count("proven") >= 5


def test_partial_patterns_by_splitting_survive_oracles() -> None:
    """Layer 5 of 6: one layer still branches, decided by input splitting + MILP leaves."""
    net = load_network(str(shared_path("vnncomp2021", "acasxu",
                                       "ACASXU_run2a_1_1_batch_2000.onnx")))
    box = InputDomain.box(net, LO, HI)
    gen = torch.Generator().manual_seed(5)
    xs = LO + (HI - LO) * torch.rand((3, 1, 1, 5), generator=gen, dtype=torch.float64)
    decided = 0
    for x0 in xs:
        poly = input_property(net, x0, box, layer=5, lowest=True, count_facets=False,
                              timeout=3)
        _check(net, poly, x0, box, 320)
        decided += poly.verdict.status != "unknown"
    assert decided >= 2
