"""Linear regions along a line or plane through the input, and exact vs Captum IG.

Three job types: ``linear_regions_line`` (ExactLine between two inputs or along an attack or
random direction, with the FGSM-vs-random linearity study), ``linear_regions_plane``
(ExactPlane region map) and ``linear_regions_ig`` (exact IG against Captum's IG).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from app.analyses.linear_regions import (
    ExactLine,
    compare_with_captum,
    endpoint,
    exact_line,
    exact_plane,
    linearity_study,
)
from app.errors import InvalidInputError
from backend.analyses.base import Analysis, JobContext, jsonable, register, serialise

Direction = Literal["fgsm", "pgd", "random"]


class LineParams(BaseModel):
    mode: Literal["direction", "input"] = Field(
        "direction", description="along a direction from the input, or towards another input")
    direction: Direction = "fgsm"
    length: float = Field(0.3, gt=0.0, le=10.0, description="L-inf length of the segment")
    other_input_id: str | None = Field(None, description="end point when mode is 'input'")
    random_directions: int = Field(4, ge=0, le=16,
                                   description="random directions for the linearity study")
    seed: int = Field(0, ge=0, le=2**31 - 1)


class PlaneParams(BaseModel):
    shape: Literal["triangle", "parallelogram"] = "parallelogram"
    first: Direction = "fgsm"
    second: Direction = "random"
    length: float = Field(0.3, gt=0.0, le=10.0, description="L-inf length of both sides")
    seed: int = Field(0, ge=0, le=2**31 - 1)


class IGParams(BaseModel):
    baseline: Literal["zeros", "input"] = "zeros"
    baseline_input_id: str | None = None
    target: int | None = Field(None, ge=0, description="logit to explain (default: predicted)")
    method: Literal["gausslegendre", "riemann_trapezoid"] = "gausslegendre"


def _other_input(ctx: JobContext, input_id: str | None) -> torch.Tensor:
    if not input_id:
        raise InvalidInputError("choose the second input (other_input_id)")
    x, _ = ctx.load_input(input_id)
    return x


def _line_dict(line: ExactLine) -> dict:
    """The line's fields but the end points and the per-piece ReLU bits (large, unread)."""
    return serialise(line, exclude=("start", "end", "relu_pattern"),
                     properties=("num_pieces", "length", "density"),
                     num_patterns=int(line.pattern_ids.max()) + 1)


def run_line(ctx: JobContext, params: LineParams) -> dict:
    ctx.progress(0.0, "building the segment")
    if params.mode == "input":
        end = _other_input(ctx, params.other_input_id)
    else:
        end = endpoint(ctx.net, ctx.x, params.direction, params.length, seed=params.seed)
    line = exact_line(ctx.net, ctx.x, end, progress=lambda f, m: ctx.progress(0.5 * f, m))
    result = {"mode": params.mode, "direction": params.direction, "classes": ctx.class_names,
              "line": _line_dict(line)}
    if params.mode == "direction" and params.random_directions:
        study = linearity_study(ctx.net, ctx.x, params.length,
                                n_random=params.random_directions, seed=params.seed,
                                progress=lambda f, m: ctx.progress(0.5 + 0.5 * f, m))
        result["linearity"] = {
            "fgsm_density": study.fgsm.line.density,
            "random_density": study.random_density,
            "density_ratio": study.density_ratio,
            "fgsm_pieces": study.fgsm.line.num_pieces,
            "random_pieces": [r.line.num_pieces for r in study.random],
            "fgsm_relative_tangent_gap": study.fgsm.relative_tangent_gap,
            "random_relative_tangent_gap": float(np.mean(
                [r.relative_tangent_gap for r in study.random])),
            "fgsm_gap": {"ts": study.fgsm.line.ts, "gap": study.fgsm.tangent_gap},
            "random_gap": {"ts": study.random[0].line.ts, "gap": study.random[0].tangent_gap},
        }
    ctx.progress(1.0, f"{line.num_pieces} pieces")
    return jsonable(result)


def run_plane(ctx: JobContext, params: PlaneParams) -> dict:
    ctx.progress(0.0, "building the plane")
    p1 = endpoint(ctx.net, ctx.x, params.first, params.length, seed=params.seed)
    p2 = endpoint(ctx.net, ctx.x, params.second, params.length, seed=params.seed + 1)
    plane = exact_plane(ctx.net, ctx.x, p1, p2, shape=params.shape, progress=ctx.progress)
    return serialise(
        plane, exclude=("p0", "p1", "p2", "relu_pattern"), rename={"classes": "polygon_classes"},
        properties=("num_polygons", "num_regions"), axes=[params.first, params.second],
        classes=ctx.class_names,
        corners=[ctx.x, p1, p2],  # the plane's origin and axis ends, in input space
    )


def run_ig(ctx: JobContext, params: IGParams) -> dict:
    base = (_other_input(ctx, params.baseline_input_id) if params.baseline == "input"
            else None)
    cmp = compare_with_captum(ctx.net, ctx.x, base, params.target, method=params.method,
                              progress=ctx.progress)
    return serialise(
        cmp.exact, rename={"attributions": "exact"}, properties=("completeness_error",),
        classes=ctx.class_names, input_shape=list(ctx.net.input_shape),
        exact_seconds=cmp.exact_seconds, method=cmp.method,
        table=[{"steps": s, "relative_error": e, "seconds": t}
               for s, e, t in zip(cmp.steps, cmp.rel_errors, cmp.seconds, strict=True)],
        captum={str(s): a for s, a in zip(cmp.steps, cmp.captum, strict=True)},
    )


register(Analysis(
    name="linear_regions_line", title="Linear regions along a line",
    description="Exact linear pieces (ExactLine) of the network along a segment from the input: "
    "logits per piece, activation patterns, predicted class, density; FGSM vs random.",
    params=LineParams, run=run_line,
))
register(Analysis(
    name="linear_regions_plane", title="Linear regions in a plane",
    description="Exact partition of a triangle or parallelogram through the input into "
    "convex linear regions, coloured by predicted class.",
    params=PlaneParams, run=run_plane,
))
register(Analysis(
    name="linear_regions_ig", title="Exact Integrated Gradients",
    description="Integrated Gradients summed exactly over the linear pieces of the path, next "
    "to Captum's IG at 20/50/100/300 steps and their relative error.",
    params=IGParams, run=run_ig,
))
