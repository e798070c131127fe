"""Refine a refuted rule: restrict its premise until it is proven or covers nothing.

When a rule fails on a domain, the strongest thing left to prove is often the same rule on
a smaller pattern set. Each counterexample has an activation pattern at the rule's layer;
one more literal that it violates excludes it. Among those literals the one kept by most of
the inputs the rule covered (fires on, and the network decides its class) is added, so
the support shrinks as little as possible; then the rule is verified again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from app.analyses.patterns.rules import Rule, decisions, layer_pattern
from app.analyses.patterns.verify import InputDomain, Method, Verdict, verify_rule
from app.network import Network


@dataclass
class Refinement:
    """The last rule tried, its verdict, how many covered inputs it still fires on, every
    step ``(rule, verdict)`` from the original rule on, and whether it stopped because any
    literal excluding the counterexample would drop every covered input."""

    rule: Rule
    verdict: Verdict
    support: int
    steps: list[tuple[Rule, Verdict]] = field(default_factory=list)
    exhausted: bool = False

    @property
    def outcome(self) -> str:
        """``proven``, ``no support`` (every literal that excludes the counterexample drops
        all covered inputs), or the last verdict's status (``counterexample`` when the step
        budget ran out, ``unknown``)."""
        if self.verdict.status == "proven":
            return "proven"
        return "no support" if self.exhausted else self.verdict.status


def refine_rule(
    net: Network,
    rule: Rule,
    input_domain: InputDomain | tuple[float | Tensor, float | Tensor],
    inputs: Tensor,
    max_steps: int = 8,
    timeout: float = 10.0,
    method: Method = "auto",
    first: Verdict | None = None,
) -> Refinement:
    """Verify ``rule``; while refuted, add the literal that excludes the counterexample and
    keeps most of the covered ``inputs``, and verify again (at most ``max_steps`` literals).
    ``first``: the rule's verdict on this domain when already known."""
    domain = InputDomain.of(net, input_domain)
    net64 = net.with_dtype(torch.float64)
    xs = inputs.to(torch.float64).reshape(-1, *net.input_shape)
    pattern = layer_pattern(net64, xs, rule.node).numpy()
    covered = rule.fires_on_pattern(torch.from_numpy(pattern)).numpy()
    covered &= decisions(net64, xs, rule.lowest) == rule.target
    pattern = pattern[covered]
    steps: list[tuple[Rule, Verdict]] = []
    while True:
        verdict = first if first is not None and not steps else verify_rule(
            net, rule, domain, timeout=timeout, method=method, known=xs[covered])
        steps.append((rule, verdict))
        support = int(rule.fires_on_pattern(torch.from_numpy(pattern)).sum())
        if verdict.status != "counterexample" or len(steps) > max_steps:
            return Refinement(rule, verdict, support, steps)
        ce = layer_pattern(net64, verdict.counterexample[None], rule.node)[0].numpy()
        firing = pattern[rule.fires_on_pattern(torch.from_numpy(pattern)).numpy()]
        used = {n for n, _ in rule.literals}
        free = np.array([n for n in range(ce.size) if n not in used], dtype=int)
        keep = (firing[:, free] != ce[free]).sum(0)  # covered inputs keeping each literal
        if free.size == 0 or keep.max() == 0:
            return Refinement(rule, verdict, support, steps, exhausted=True)
        best = int(np.argmax(keep))
        n = int(free[best])
        rule = Rule(rule.layer, rule.node, (*rule.literals, (n, not bool(ce[n]))),
                    rule.target, rule.lowest)
