"""Inferred pattern rules (Gopinath et al., "Property Inference for Deep Neural Networks").

* :func:`mine_rules`: on/off patterns at a layer that imply a decision, from a decision tree.
* :func:`verify_rule` / :func:`verify_rules`: prove a rule on an input domain (MILP), or give
  a counterexample confirmed by a forward pass, or say unknown at time-out.
* :func:`input_property`: the polytope of inputs sharing an input's pattern, its robustness
  radius and whether the decision holds on all of it.
* :func:`distill`: a rule-list classifier imitating the network; :func:`rules_firing`.
* :func:`refine_rule`: restrict a refuted rule by literals until it is proven.
* :func:`proven_coverage`: the share of inputs whose decision a proven rule or property implies.
"""

from app.analyses.patterns.coverage import ProvenCoverage, proven_coverage
from app.analyses.patterns.mining import MinedRules, RuleList, distill, mine_rules
from app.analyses.patterns.polytope import InputPolytope, input_property, property_verdict
from app.analyses.patterns.refine import Refinement, refine_rule
from app.analyses.patterns.rules import Rule, rules_firing
from app.analyses.patterns.verify import InputDomain, Verdict, verify_rule, verify_rules

__all__ = [
    "InputDomain",
    "InputPolytope",
    "MinedRules",
    "ProvenCoverage",
    "Refinement",
    "Rule",
    "RuleList",
    "Verdict",
    "distill",
    "input_property",
    "mine_rules",
    "property_verdict",
    "proven_coverage",
    "refine_rule",
    "rules_firing",
    "verify_rule",
    "verify_rules",
]
