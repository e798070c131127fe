"""Pattern rules as a job: mine on/off rules from the gallery, verify them one by one, and
explain the current input by the rules that fire on it and its pattern polytope's radius."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.analyses.patterns import (
    InputDomain,
    distill,
    input_property,
    mine_rules,
    rules_firing,
    verify_rule,
)
from backend.analyses.base import Analysis, JobContext, jsonable, register


class Params(BaseModel):
    layer: int = Field(-1, ge=-8, le=8, description="ReLU layer (1 = first, -1 = last; not 0)")
    target: int | None = Field(None, ge=0, le=999, description="class to mine rules for (all)")
    lowest: bool = Field(False, description="the decision is the lowest score (ACAS Xu)")
    n_inputs: int = Field(600, ge=20, le=5000, description="gallery inputs to mine from")
    min_support: int = Field(5, ge=1, le=1000)
    min_precision: float = Field(0.9, ge=0.5, le=1.0)
    max_depth: int = Field(8, ge=1, le=20, description="decision-tree depth")
    verify: int = Field(5, ge=0, le=50, description="rules to verify (highest support first)")
    domain: Literal["ball", "box"] = Field(
        "ball", description="ball: eps-ball around an input the rule covers; box: input range")
    eps: float = Field(0.05, gt=0.0, le=1.0, description="L-inf radius of the ball domains")
    timeout: float = Field(20.0, ge=1.0, le=300.0, description="seconds per verification")
    thumbnails: int = Field(6, ge=0, le=24, description="covered inputs shown per rule")


def _range(ctx: JobContext) -> tuple[float, float]:
    lo, hi = (ctx.card.get("input_range") or [0.0, 1.0])[:2]
    return float(lo), float(hi)


def run(ctx: JobContext, params: Params) -> dict:
    if params.layer == 0:
        raise ValueError("layer counts ReLU layers from 1 (or from the end with -1)")
    xs, _ = ctx.gallery(params.n_inputs)
    if len(xs) < 10:
        raise ValueError("mining needs a gallery of at least 10 inputs for this model")
    xs = xs.to(ctx.net.dtype)
    lo, hi = _range(ctx)
    ctx.progress(0.02, "mining rules")
    mined = mine_rules(ctx.net, xs, layer=params.layer, target=params.target,
                       min_support=params.min_support, min_precision=params.min_precision,
                       max_depth=params.max_depth, lowest=params.lowest)
    held = xs[mined.heldout]
    rows = []
    todo = mined.rules[: params.verify]
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
            verdict = verify_rule(ctx.net, rule, domain, timeout=params.timeout)
            row |= {"status": verdict.status, "seconds": verdict.seconds,
                    "message": verdict.message, "counterexample": verdict.counterexample,
                    "counterexample_class": verdict.counterexample_class}
        rows.append(row)
    ctx.progress(0.87, "distilling a rule list")
    rule_list = distill(ctx.net, xs, layer=params.layer, max_depth=params.max_depth + 4,
                        lowest=params.lowest)
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
        "input_shape": list(ctx.net.input_shape), "domain": params.domain, "eps": params.eps,
        "rules": rows, "fidelity": rule_list.fidelity, "rule_list_size": len(rule_list.rules),
        "current": current,
    })


register(Analysis(
    name="patterns", title="Pattern rules",
    description="Mine on/off neuron patterns at a layer that imply a decision (decision tree "
                "over the gallery), verify each rule with a MILP (proven / counterexample / "
                "unknown), and explain the input by the rules that fire on it.",
    params=Params, run=run,
))
