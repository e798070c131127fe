"""Verified explanations (VeriX) as a job: the features that provably fix the decision."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from app.analyses.saliency.verix import WITNESSED, verified_explanation
from backend.analyses.base import Analysis, JobContext, jsonable, register

MAX_COUNTEREXAMPLES = 16  # inputs sent back (the ids of every witnessed feature are)


class Params(BaseModel):
    eps: float = Field(0.05, gt=0.0, le=1.0,
                       description="L-inf radius of the perturbations off the explanation")
    timeout_s: float = Field(60.0, gt=0.0, le=600.0,
                             description="after this, untried features are kept (still sound)")
    check_timeout_s: float = Field(5.0, gt=0.0, le=120.0,
                                   description="time limit of each complete check (branch "
                                               "and bound, MILP)")


def run(ctx: JobContext, params: Params) -> dict:
    res = verified_explanation(ctx.net, ctx.x, params.eps, input_range=ctx.input_range,
                               timeout_s=params.timeout_s, check_timeout_s=params.check_timeout_s,
                               progress=ctx.progress)
    classes = ctx.class_names
    shown = list(res.counterexamples)[:MAX_COUNTEREXAMPLES]
    points = {i: torch.from_numpy(res.counterexamples[i]) for i in shown}
    with torch.no_grad():  # the class each witness gets, in float64 as it was checked
        net64 = ctx.net.with_dtype(torch.float64)
        predicted = {i: int(net64(p[None]).argmax()) for i, p in points.items()}
    return jsonable({
        "input_shape": list(ctx.net.input_shape),
        "input": ctx.x,
        "label": ctx.label,
        "target": res.target,
        "target_class": classes[res.target] if res.target < len(classes) else res.target,
        "eps": res.eps,
        "input_range": list(res.input_range),
        "explanation": res.explanation.astype(float),
        "size": res.size,
        "num_features": int(res.explanation.size),
        "irreducible": res.irreducible,
        "order": res.order,
        "freed": res.freed,
        "witnessed": [i for i, v in res.kept.items() if v == WITNESSED],
        "unproven": [i for i, v in res.kept.items() if v != WITNESSED],
        "counterexamples": [{"feature": i, "input": points[i], "predicted": predicted[i]}
                            for i in shown],
        "checks": res.checks,
        "timings": res.timings,
    })


register(Analysis(
    name="verified_explanation",
    title="Verified explanation (VeriX)",
    description="The features that, fixed at the input's values, provably keep the predicted "
                "class for every perturbation of at most eps elsewhere (CROWN bounds, then "
                "ReLU-split branch and bound and a MILP); a kept feature comes with a "
                "counterexample when one was found, "
                "otherwise it is marked sound but not proven irreducible.",
    params=Params,
    run=run,
))
