"""Refining refuted rules, checked on a 2-D network by exhaustive region enumeration.

Every counterexample along the way must be real (float64, in the box, premise, other class)
and excluded by the next rule; a rule the refinement ends with as proven must have no region
where a rival wins (LPs over every activation region, written from the weights).
"""

from __future__ import annotations

import torch
from torch import nn

from app import load_network
from app.analyses.patterns import InputDomain, mine_rules, refine_rule
from tests.test_patterns_scale import _assert_real, _oracle_worst, _premise64, _regions, _tiny

torch.set_num_threads(1)


def test_refined_rules_are_proven_where_regions_agree() -> None:
    model = _tiny(7, (4, 3, 3))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    regions = _regions([m.weight.detach().numpy() for m in linears],
                       [m.bias.detach().numpy() for m in linears], [(-1.0, 1.0)] * 2)
    net = load_network(model, input_shape=(2,))
    domain = InputDomain.box(net, -1.0, 1.0)
    grid = torch.cartesian_prod(*[torch.linspace(-1, 1, 41, dtype=torch.float64)] * 2)
    outcomes = []
    for layer in (1, 2):
        for rule in mine_rules(net, grid, layer=layer, min_support=4, min_precision=0.8,
                               max_depth=3, seed=0).rules[:2]:
            ref = refine_rule(net, rule, domain, grid, max_steps=6, timeout=10)
            assert ref.steps[0][0] == rule
            for (before, verdict), (after, _) in zip(ref.steps, ref.steps[1:], strict=False):
                assert verdict.status == "counterexample"
                _assert_real(net, before, domain, verdict)
                assert set(before.literals) < set(after.literals)
                assert not _premise64(net, after, verdict.counterexample)
            if ref.outcome == "proven":
                assert _oracle_worst(regions, ref.rule) <= 0, str(ref.rule)
                assert ref.support > 0
            outcomes.append((len(ref.steps), ref.outcome))
    assert any(steps > 1 and outcome == "proven" for steps, outcome in outcomes), outcomes
