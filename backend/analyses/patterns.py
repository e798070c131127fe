"""Pattern rules as jobs.

* ``patterns``: mine on/off rules from the gallery (or an uploaded dataset), verify the
  first few one by one, and explain the current input by the rules that fire on it and its
  pattern polytope's radius.
* ``patterns_verify``: verify one rule. ``POST /api/patterns/verify`` fans many rules out as
  one batch of these (one Dask task per rule, progress and cancel per rule).
* ``patterns_coverage``: one model's proven coverage of held-out inputs and its distilled
  rule list's fidelity, without an input (the Compare page's per-model cell).

A rule refuted on its domain comes with what can still be proven about the inputs it covers:
the rule restricted by more literals (:func:`refine_rule`) and the input properties of a few
covered inputs (the polytope of each one's pattern up to the rule's layer, Prophecy's form),
each with its verdict and its extent in input space.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, Field

from app.analyses.patterns import (
    InputDomain,
    MinedRules,
    Rule,
    distill,
    input_property,
    mine_rules,
    proven_coverage,
    refine_rule,
    rules_firing,
    verify_rule,
)
from app.analyses.patterns.rules import decisions, relu_node
from app.errors import InvalidInputError
from backend.analyses.base import Analysis, JobContext, jsonable, register

# distilled rule lists: noisy copies per training input, noise as a share of the input range.
# Mean held-out fidelity of the 100-rule threshold list over four random splits of the
# 360-digit gallery, six sample models: 0.88-0.94 with 10 copies at 0.15, 0.92-0.96 here
AUGMENT = 60
NOISE = 0.25


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
    properties: int = Field(3, ge=0, le=10, description="covered inputs whose input property "
                            "is decided for each refuted rule (0: none)")


def run(ctx: JobContext, params: Params) -> dict:
    xs, mined = _mine(ctx, params)
    lo, hi = ctx.input_range
    held = xs[mined.heldout]
    rows = []
    todo = mined.rules[: params.verify]
    verdicts = []
    for k, rule in enumerate(mined.rules):
        covered = held[rule.fires(ctx.net, held)]
        row = rule.to_dict() | {"status": "not verified", "seconds": None, "message": "",
                                "counterexample": None, "counterexample_class": None,
                                "covered": covered[: params.thumbnails], "refined": None,
                                "properties": None}
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
                    "counterexample_class": verdict.counterexample_class}
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
            if verdict.status == "counterexample" and params.properties:
                row["properties"] = _covered_properties(ctx, rule, held, params)
        rows.append(row)
    ctx.progress(0.8, "distilling rule lists")
    tradeoff, rule_list = _tradeoff(ctx, xs, params.layer, params.lowest)
    coverage = None
    if params.coverage:
        ctx.progress(0.86, "proven coverage of held-out inputs")
        coverage = _coverage(ctx, held, params, todo, verdicts)
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


def _mine(ctx: JobContext, params) -> tuple[torch.Tensor, MinedRules]:
    """The inputs (gallery or uploaded dataset) and the rules mined from them; the held-out
    split depends only on how many inputs there are, so every job on them shares it."""
    if params.layer == 0:
        raise InvalidInputError("layer counts ReLU layers from 1 (or from the end with -1)")
    # labels are not used: the rules explain the network's own decisions
    xs = (ctx.load_dataset(params.dataset_id)[0] if params.dataset_id
          else ctx.gallery(params.n_inputs)[0])
    if len(xs) < 10:
        source = "the dataset" if params.dataset_id else "this model's gallery"
        raise InvalidInputError(f"mining needs at least 10 inputs; {source} has {len(xs)}")
    xs = xs.to(ctx.net.dtype)
    ctx.progress(0.02, "mining rules")
    mined = mine_rules(ctx.net, xs, layer=params.layer, target=params.target,
                       min_support=params.min_support, min_precision=params.min_precision,
                       max_depth=params.max_depth, lowest=params.lowest)
    return xs, mined


def _tradeoff(ctx: JobContext, xs: torch.Tensor, layer: int, lowest: bool):
    """Rule lists of several sizes with threshold and on/off literals: ``(rows, the list of
    at most 100 threshold rules)``, each row its size and fidelity on held-out inputs.

    The trees learn from the training inputs and :data:`AUGMENT` noisy copies of each
    (labelled by the network): a gallery alone is too small for a faithful tree."""
    lo, hi = ctx.input_range
    rows, chosen = [], None
    for literals in ("threshold", "pattern"):
        for size in (10, 30, 100, None):
            listed = distill(ctx.net, xs, layer=layer, literals=literals, max_depth=None,
                             max_rules=size, augment=AUGMENT, noise=NOISE,
                             input_range=(lo, hi), lowest=lowest)
            rows.append({"literals": literals, "max_rules": size,
                         "rules": len(listed.rules), "fidelity": listed.fidelity})
            if literals == "threshold" and size == 100:
                chosen = listed
    return rows, chosen


def _coverage(ctx: JobContext, held: torch.Tensor, params, rules: list, verdicts: list) -> dict:
    """Proven coverage of the first ``params.coverage`` held-out inputs: on the box, rules
    proven there cover the inputs they fire on and conclude; otherwise each input's property
    (its pattern polytope at ``params.layer``) is decided on the box or on its eps-ball."""
    lo, hi = ctx.input_range
    on_box = params.domain == "box"
    cov = proven_coverage(
        ctx.net, held[: params.coverage], InputDomain.box(ctx.net, lo, hi),
        layer=params.layer, lowest=params.lowest, eps=None if on_box else params.eps,
        rules=rules if on_box else [], verdicts=verdicts if on_box else [],
        timeout=min(params.timeout, 5.0))
    return cov.to_dict() | {"domain": params.domain, "per_input": cov.statuses}


def _covered_properties(ctx: JobContext, rule: Rule, held: torch.Tensor, params) -> list[dict]:
    """Input properties of the first ``params.properties`` held-out inputs a refuted rule
    covers (it fires on them and the network decides its class): the polytope of each one's
    pattern up to the rule's layer, decided on the rule's domain (the box, or the input's own
    eps-ball), and where the box fails, on the eps-ball too; with its extent in input space."""
    lo, hi = ctx.input_range
    net = ctx.net
    fires = rule.fires(net, held)
    decided = decisions(net.with_dtype(torch.float64), held.to(torch.float64), rule.lowest)
    chosen = held[fires & torch.from_numpy(decided == rule.target)][: params.properties]
    seconds = min(params.timeout, 5.0)
    out = []
    for x in chosen:
        ball = InputDomain.linf_ball(net, x, params.eps, clip=(lo, hi))
        domain = InputDomain.box(net, lo, hi) if params.domain == "box" else ball
        poly = input_property(net, x, domain, layer=rule.layer, target=rule.target,
                              lowest=rule.lowest, count_facets=False, timeout=seconds,
                              method=params.method)
        v = poly.verdict
        item = {"input": x, "domain": params.domain, "status": v.status, "message": v.message,
                "seconds": v.seconds, "counterexample": v.counterexample,
                "counterexample_class": v.counterexample_class,
                "num_constraints": poly.num_constraints, "radius_linf": poly.radius_linf,
                "radius_l2": poly.radius_l2, "chebyshev_linf": poly.chebyshev_linf[0],
                "chebyshev_l2": poly.chebyshev_l2[0], "ball": None}
        if params.domain == "box" and v.status != "proven":
            inner = input_property(net, x, ball, layer=rule.layer, target=rule.target,
                                   lowest=rule.lowest, count_facets=False, timeout=seconds,
                                   method=params.method)
            item["ball"] = {"eps": params.eps, "status": inner.verdict.status,
                            "message": inner.verdict.message,
                            "chebyshev_linf": inner.chebyshev_linf[0]}
        out.append(item)
    return out


class CoverageParams(BaseModel):
    """The ``patterns`` job's settings that its proven coverage and rule list depend on."""

    layer: int = Field(-1, ge=-8, le=8, description="ReLU layer (1 = first, -1 = last; not 0)")
    lowest: bool = Field(False, description="the decision is the lowest score (ACAS Xu)")
    n_inputs: int = Field(600, ge=20, le=5000, description="gallery inputs (held-out split)")
    dataset_id: str | None = Field(
        None, pattern=r"^dataset:[0-9a-f]{64}$",
        description="use this uploaded dataset (all of it) instead of the gallery")
    target: int | None = Field(None, ge=0, le=999, description="class the rules are mined for")
    min_support: int = Field(5, ge=1, le=1000)
    min_precision: float = Field(0.9, ge=0.5, le=1.0)
    max_depth: int = Field(8, ge=1, le=20, description="decision-tree depth")
    domain: Literal["ball", "box"] = Field(
        "ball", description="ball: each input's eps-ball; box: the input range, where rules "
                            "proven on it cover the inputs they fire on")
    eps: float = Field(0.05, gt=0.0, le=1.0, description="L-inf radius of the balls")
    verify: int = Field(5, ge=0, le=50, description="box: rules verified on it first")
    timeout: float = Field(20.0, ge=1.0, le=300.0, description="seconds per rule (each "
                           "input property gets at most 5)")
    method: Literal["auto", "milp", "split"] = "auto"
    coverage: int = Field(40, ge=1, le=1000, description="held-out inputs checked")


def run_coverage(ctx: JobContext, params: CoverageParams) -> dict:
    """The ``patterns`` job's proven coverage and rule-list fidelity alone, same numbers for
    the same settings (the same held-out inputs, rules and verdicts). A model without a
    gallery (and no dataset named) gets no numbers, and says why, rather than failing: the
    Compare page runs this on every model it compares."""
    if params.dataset_id is None and len(ctx.gallery(10)[0]) < 10:
        return {"proven_coverage": None, "fidelity": None, "rule_list_size": None,
                "reason": "this model has no gallery of held-out inputs (its card names no "
                          "dataset with one): proven coverage not measured"}
    xs, mined = _mine(ctx, params)
    held = xs[mined.heldout]
    lo, hi = ctx.input_range
    rules = mined.rules[: params.verify] if params.domain == "box" else []
    verdicts = []
    for k, rule in enumerate(rules):
        ctx.progress(0.05 + 0.5 * k / len(rules), f"verifying rule {k + 1} of {len(rules)}")
        verdicts.append(verify_rule(ctx.net, rule, InputDomain.box(ctx.net, lo, hi),
                                    timeout=params.timeout, method=params.method,
                                    known=held[rule.fires(ctx.net, held)]))
    ctx.progress(0.55, "distilling rule lists")
    tradeoff, rule_list = _tradeoff(ctx, xs, params.layer, params.lowest)
    ctx.progress(0.6, "proven coverage of held-out inputs")
    coverage = _coverage(ctx, held, params, rules, verdicts)
    return jsonable({
        "layer": mined.layer, "num_inputs": len(xs), "num_heldout": int(len(mined.heldout)),
        "source": params.dataset_id or "gallery", "heldout": mined.heldout[: params.coverage],
        "domain": params.domain, "eps": params.eps,
        "rules_proven": sum(v.status == "proven" for v in verdicts),
        "rules_verified": len(verdicts), "proven_coverage": coverage,
        "fidelity": rule_list.fidelity, "rule_list_size": len(rule_list.rules),
        "rule_list_tradeoff": tradeoff,
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

register(Analysis(
    name="patterns_coverage", title="Proven coverage",
    description="The share of held-out inputs whose decision a proven pattern rule or their "
                "own input property (the polytope of their activation pattern) implies, and "
                "how faithful a distilled rule list is: one number per model.",
    params=CoverageParams, run=run_coverage, needs_input=False,
))
