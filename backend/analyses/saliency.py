"""SMT saliency masks (SMUG) as a job: neurons by IG, minimal mask by HiGHS or z3, graded vs
gradients."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from app.analyses.saliency import smt_mask
from backend.analyses.base import Analysis, JobContext, register, serialise


class Params(BaseModel):
    top_k: int = Field(10, ge=1, le=100, description="first-layer neurons to keep (by IG)")
    threshold: float = Field(0.5, gt=0.0, le=2.0,
                             description="each kept neuron stays >= threshold x its value")
    granularity: Annotated[int, Field(ge=1, le=16)] | Literal["superpixel"] | None = Field(
        None, description="side of the square patches sharing a mask bit, or 'superpixel' "
        "(SLIC regions of the input; empty: automatic)")
    timeout_s: float = Field(30.0, gt=0.0, le=600.0, description="solver time-out in seconds")
    target: int | None = Field(None, ge=0, description="class to explain (default: predicted)")
    baseline: Annotated[float, Field(ge=-10.0, le=10.0)] | Literal["blurred"] = Field(
        0.0, description="value of masked-out features, or 'blurred' (the input blurred)")
    solver: Literal["highs", "bisection", "optimize"] = Field(
        "highs", description="exact 0/1 solver: HiGHS branch and bound, or z3 (SMUG's) by "
        "bisection over the mask size or by its Optimize engine")


def run(ctx: JobContext, params: Params) -> dict:
    res = smt_mask(ctx.net, ctx.x, target=params.target, top_k=params.top_k,
                   threshold=params.threshold, granularity=params.granularity,
                   timeout_s=params.timeout_s, baseline=params.baseline, solver=params.solver,
                   progress=ctx.progress)
    classes = ctx.class_names
    return serialise(
        res, exclude=("group_mask",), properties=("mask_size", "num_groups"),
        input_shape=list(ctx.net.input_shape), input=ctx.x, label=ctx.label,
        target_class=classes[res.target] if res.target < len(classes) else res.target,
        mask=res.mask.astype(float),  # drawn as an image: numbers, not booleans
    )


register(Analysis(
    name="saliency",
    title="SMT saliency masks",
    description="Integrated Gradients picks the first-layer neurons that carry the prediction; "
                "an exact 0/1 solver (HiGHS, or z3) finds the smallest input mask keeping those "
                "neurons above a threshold (a guarantee on first-layer activations, not on the "
                "decision); the mask is ranked and graded against IG and SmoothGrad.",
    params=Params,
    run=run,
))
