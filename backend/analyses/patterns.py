"""Pattern rules as jobs.

* ``patterns``: mine on/off rules from the gallery (or an uploaded dataset), verify the
  first few one by one, and explain the current input by the rules that fire on it and its
  pattern polytope's radius.
* ``patterns_verify``: verify one rule. ``POST /api/patterns/verify`` fans many rules out as
  one batch of these (one Dask task per rule, progress and cancel per rule).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, Field

from app.analyses.patterns import (
    InputDomain,
    Rule,
    distill,
    input_property,
    mine_rules,
    proven_coverage,
    refine_rule,
    rules_firing,
    verify_rule,
)
from app.analyses.patterns.rules import relu_node
from app.errors import InvalidInputError
from backend.analyses.base import Analysis, JobContext, jsonable, register


class Params(BaseModel):
    layer: int = Field(-1, ge=-8, le=8, description="ReLU layer (1 = first, -1 = last; not 0)")
    target: int | None = Field(None, ge=0, le=999, description="class to mine rules for (all)")
    lowest: bool = Field(False, description="the decision is the lowest score (ACAS Xu)")
    n_inputs: int = Field(600, ge=20, le=5000, description="gallery inputs to mine from")
    dataset_id: str | None = Field(
        None, pattern=r"^dataset:[0-9a-f]{64}$",
        description="mine from this uploaded dataset (all of it) instead of the gallery")
    min_support: int = Field(5, ge=1, le=1000)
    min_precision: float = Field(0.9, ge=0.5, le=1.0)
    max_depth: int = Field(8, ge=1, le=20, description="decision-tree depth")
    verify: int = Field(5, ge=0, le=50, description="rules to verify (highest support first)")
    domain: Literal["ball", "box"] = Field(
        "ball", description="ball: eps-ball around an input the rule covers; box: input range")
    eps: float = Field(0.05, gt=0.0, le=1.0, description="L-inf radius of the ball domains")
    timeout: float = Field(20.0, ge=1.0, le=300.0, description="seconds per verification")
    method: Literal["auto", "milp", "split"] = Field(
        "auto", description="one MILP, or input splitting (auto: for few input dimensions)")
    thumbnails: int = Field(6, ge=0, le=24, description="covered inputs shown per rule")
    refine: int = Field(3, ge=0, le=8, description="literals added at most to a refuted rule "
                        "to find a restriction that is proven (0: do not refine)")
    coverage: int = Field(40, ge=0, le=1000, description="held-out inputs whose input "
                          "property is decided for the proven coverage (0: skip)")


def run(ctx: JobContext, params: Params) -> dict:
    if params.layer == 0:
        raise InvalidInputError("layer counts ReLU layers from 1 (or from the end with -1)")
    # labels are not used: the rules explain the network's own decisions
    xs = (ctx.load_dataset(params.dataset_id)[0] if params.dataset_id
          else ctx.gallery(params.n_inputs)[0])
    if len(xs) < 10:
        source = "the dataset" if params.dataset_id else "this model's gallery"
        raise InvalidInputError(f"mining needs at least 10 inputs; {source} has {len(xs)}")
    xs = xs.to(ctx.net.dtype)
    lo, hi = ctx.input_range
    ctx.progress(0.02, "mining rules")
    mined = mine_rules(ctx.net, xs, layer=params.layer, target=params.target,
                       min_support=params.min_support, min_precision=params.min_precision,
                       max_depth=params.max_depth, lowest=params.lowest)
    held = xs[mined.heldout]
    rows = []
    todo = mined.rules[: params.verify]
    verdicts = []
    for k, rule in enumerate(mined.rules):
        covered = held[rule.fires(ctx.net, held)]
        row = rule.to_dict() | {"status": "not verified", "seconds": None, "message": "",
                                "counterexample": None, "counterexample_class": None,
                                "covered": covered[: params.thumbnails]}
        if k < len(todo):
            ctx.progress(0.05 + 0.8 * k / len(todo), f"verifying rule {k + 1} of {len(todo)}")
            if params.domain == "box" or not len(covered):
                domain = InputDomain.box(ctx.net, lo, hi)
            else:
                domain = InputDomain.linf_ball(ctx.net, covered[0], params.eps, clip=(lo, hi))
            verdict = verify_rule(ctx.net, rule, domain, timeout=params.timeout,
                                  method=params.method, known=covered)
            verdicts.append(verdict)
            row |= {"status": verdict.status, "seconds": verdict.seconds,
                    "message": verdict.message, "counterexample": verdict.counterexample,
                    "counterexample_class": verdict.counterexample_class, "refined": None}
            if verdict.status == "counterexample" and params.refine:
                ref = refine_rule(ctx.net, rule, domain, held, max_steps=params.refine,
                                  timeout=params.timeout, method=params.method, first=verdict)
                row["refined"] = {"text": f"if {ref.rule.condition()} then "
                                          f"{ref.rule.conclusion()}",
                                  "condition": ref.rule.condition(),
                                  "on": ref.rule.on, "off": ref.rule.off,
                                  "outcome": ref.outcome, "support": ref.support,
                                  "message": ref.verdict.message,
                                  "literals_added": len(ref.steps) - 1}
        rows.append(row)
    ctx.progress(0.8, "distilling rule lists")
    tradeoff = []
    for literals in ("threshold", "pattern"):
        for size in (10, 30, 100, None):
            listed = distill(ctx.net, xs, layer=params.layer, literals=literals, max_depth=None,
                             max_rules=size, augment=10, input_range=(lo, hi),
                             lowest=params.lowest)
            tradeoff.append({"literals": literals, "max_rules": size,
                             "rules": len(listed.rules), "fidelity": listed.fidelity})
            if literals == "threshold" and size == 100:
                rule_list = listed
    coverage = None
    if params.coverage:
        ctx.progress(0.86, "proven coverage of held-out inputs")
        on_box = params.domain == "box"  # rules proven on the box cover what they fire on
        cov = proven_coverage(
            ctx.net, held[: params.coverage], InputDomain.box(ctx.net, lo, hi),
            layer=params.layer, lowest=params.lowest, eps=None if on_box else params.eps,
            rules=todo if on_box else [], verdicts=verdicts if on_box else [],
            timeout=min(params.timeout, 5.0))
        coverage = cov.to_dict() | {"domain": params.domain}
    current = None
    if ctx.x is not None:
        ctx.progress(0.92, "explaining the current input")
        x = ctx.x.to(ctx.net.dtype)
        fired = {str(r) for r in rules_firing(ctx.net, mined.rules, x)}
        poly = input_property(ctx.net, x, InputDomain.linf_ball(ctx.net, x, params.eps,
                                                                clip=(lo, hi)),
                              layer=params.layer, lowest=params.lowest, count_facets=False,
                              timeout=params.timeout)
        current = {"fired": [i for i, r in enumerate(mined.rules) if str(r) in fired],
                   "decision": poly.target, "radius_linf": poly.radius_linf,
                   "radius_l2": poly.radius_l2, "num_constraints": poly.num_constraints,
                   "polytope_status": poly.verdict.status, "polytope_message": poly.verdict.message}
    return jsonable({
        "layer": mined.layer, "node": mined.node, "num_neurons": mined.num_neurons,
        "num_train": mined.num_train, "num_heldout": int(len(mined.heldout)),
        "source": params.dataset_id or "gallery", "num_inputs": len(xs),
        "heldout": mined.heldout,
        "input_shape": list(ctx.net.input_shape), "domain": params.domain, "eps": params.eps,
        "rules": rows, "fidelity": rule_list.fidelity, "rule_list_size": len(rule_list.rules),
        "rule_list_literals": "threshold", "rule_list_tradeoff": tradeoff,
        "proven_coverage": coverage, "current": current,
    })


class VerifyParams(BaseModel):
    layer: int = Field(ge=-8, le=8, description="ReLU layer of the premise (1 = first)")
    on: list[int] = Field(default_factory=list, max_length=4096)
    off: list[int] = Field(default_factory=list, max_length=4096)
    target: int = Field(ge=0, le=999)
    lowest: bool = False
    domain: Literal["ball", "box"] = "box"
    center: list[float] | None = Field(None, max_length=200_000,
                                       description="centre of the eps-ball (flat input)")
    eps: float = Field(0.05, gt=0.0, le=1.0)
    timeout: float = Field(20.0, ge=1.0, le=600.0)
    method: Literal["auto", "milp", "split"] = "auto"


def verify(ctx: JobContext, params: VerifyParams) -> dict:
    net = ctx.net
    ordinal, node = relu_node(net, params.layer)
    width = math.prod(net.shapes[node])
    if any(not 0 <= n < width for n in params.on + params.off):
        raise InvalidInputError(f"neurons of layer {ordinal} are numbered 0..{width - 1}")
    literals = tuple((n, True) for n in params.on) + tuple((n, False) for n in params.off)
    rule = Rule(ordinal, node, literals, params.target, params.lowest)
    lo, hi = ctx.input_range
    if params.domain == "box":
        domain = InputDomain.box(net, lo, hi)
    else:
        if params.center is None or len(params.center) != math.prod(net.input_shape):
            raise InvalidInputError("a ball domain needs its centre: one value per input")
        center = torch.tensor(params.center, dtype=net.dtype).reshape(net.input_shape)
        domain = InputDomain.linf_ball(net, center, params.eps, clip=(lo, hi))
    verdict = verify_rule(net, rule, domain, timeout=params.timeout, method=params.method,
                          progress=ctx.progress)
    return jsonable({
        "rule": str(rule), "condition": rule.condition(), "status": verdict.status,
        "seconds": verdict.seconds, "message": verdict.message,
        "counterexample": verdict.counterexample,
        "counterexample_class": verdict.counterexample_class,
        "worst_margin": verdict.worst_margin, "input_shape": list(net.input_shape),
    })


register(Analysis(
    name="patterns_verify", title="Verify a pattern rule",
    description="Prove one on/off pattern rule on an input box or eps-ball, or find a "
                "counterexample confirmed by a forward pass, or say unknown at time-out.",
    params=VerifyParams, run=verify, needs_input=False,
))

register(Analysis(
    name="patterns", title="Pattern rules",
    description="Mine on/off neuron patterns at a layer that imply a decision (decision tree "
                "over the gallery), verify each rule with a MILP (proven / counterexample / "
                "unknown), and explain the input by the rules that fire on it.",
    params=Params, run=run,
))
