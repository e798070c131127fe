"""Proven coverage: the share of inputs whose decision a proven specification implies.

The measure used for activation-pattern specifications (Geng et al., ICML 2023): an input is
covered when a rule proven on the whole input domain fires on it and concludes its decision,
or when its own input property (the polytope of its pattern up to a layer, within the
domain) is proven to imply its decision. Rules are trusted only with a "proven" verdict on
the same domain; each property is decided here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from app.analyses.patterns.polytope import property_verdict
from app.analyses.patterns.rules import Rule, decisions
from app.analyses.patterns.verify import InputDomain, Method, Verdict
from app.network import Network
from app.progress import ProgressFn, report


@dataclass
class ProvenCoverage:
    """``covered`` of ``checked`` inputs; ``by_rule`` of them by a proven rule, the rest by
    their input property. ``statuses`` is each input's property verdict (``"rule"`` where a
    rule already covered it)."""

    layer: int
    checked: int
    covered: int
    by_rule: int
    statuses: list[str] = field(default_factory=list)
    seconds: float = 0.0
    eps: float | None = None  # properties on L-inf balls of this radius (None: the domain)

    @property
    def fraction(self) -> float:
        return self.covered / self.checked if self.checked else 0.0

    def to_dict(self) -> dict:
        counts = {s: self.statuses.count(s) for s in sorted(set(self.statuses))}
        return {"layer": self.layer, "checked": self.checked, "covered": self.covered,
                "fraction": self.fraction, "by_rule": self.by_rule,
                "by_property": self.covered - self.by_rule, "statuses": counts,
                "seconds": self.seconds, "eps": self.eps}


def proven_coverage(
    net: Network,
    inputs: Tensor,
    input_domain: InputDomain | tuple[float | Tensor, float | Tensor],
    layer: int = -1,
    lowest: bool = False,
    eps: float | None = None,
    rules: list[Rule] = (),
    verdicts: list[Verdict] = (),
    timeout: float = 5.0,
    method: Method = "auto",
    progress: ProgressFn | None = None,
) -> ProvenCoverage:
    """How many of ``inputs`` (all inside the domain) have a proven reason for their decision.

    ``rules`` with their ``verdicts`` on this same domain: the proven ones that fire on an
    input and conclude its decision cover it. Otherwise its input property at ReLU ``layer``
    is decided (``timeout`` seconds each; an LP when the layer is the last one), on the whole
    domain or, with ``eps``, on the L-inf ball of that radius around the input within it.
    """
    start = time.perf_counter()
    domain = InputDomain.of(net, input_domain)
    net64 = net.with_dtype(torch.float64)
    xs = inputs.to(torch.float64).reshape(-1, *net.input_shape)
    decided = decisions(net64, xs, lowest)
    by_rule = np.zeros(len(xs), dtype=bool)
    for rule, verdict in zip(rules, verdicts, strict=True):
        if verdict.status == "proven":
            by_rule |= rule.fires(net64, xs).numpy() & (decided == rule.target)
    statuses = []
    for k in range(len(xs)):
        report(progress, k / max(1, len(xs)), f"input property {k + 1} of {len(xs)}")
        if by_rule[k]:
            statuses.append("rule")
            continue
        local = domain if eps is None else InputDomain(
            torch.maximum(xs[k] - eps, domain.lo), torch.minimum(xs[k] + eps, domain.hi))
        statuses.append(property_verdict(net, xs[k], local, layer=layer, lowest=lowest,
                                         timeout=timeout, method=method, net64=net64).status)
    covered = int(by_rule.sum()) + statuses.count("proven")
    ordinal = layer if layer > 0 else len(net.relu_indices) + 1 + layer
    return ProvenCoverage(ordinal, len(xs), covered, int(by_rule.sum()), statuses,
                          time.perf_counter() - start, eps)
