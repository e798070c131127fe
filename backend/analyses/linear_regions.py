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
    compare_with_captum,
    endpoint,
    exact_line,
    exact_plane,
    linearity_study,
)
from app.errors import InvalidInputError
from backend.analyses.base import Analysis, JobContext, jsonable, register

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


def _classes(ctx: JobContext) -> list:
    return ctx.card.get("classes") or list(range(ctx.net.num_outputs))


def _other_input(ctx: JobContext, input_id: str | None) -> torch.Tensor:
    if not input_id:
        raise InvalidInputError("choose the second input (other_input_id)")
    x, _ = ctx.load_input(input_id)
    return x


def _line_dict(line) -> dict:
    return {
        "ts": line.ts, "logits": line.logits, "pattern_ids": line.pattern_ids,
        "classes": line.classes, "class_ts": line.class_ts, "class_labels": line.class_labels,
        "num_pieces": line.num_pieces, "num_patterns": int(line.pattern_ids.max()) + 1,
        "length": line.length, "density": line.density,
    }


def run_line(ctx: JobContext, params: LineParams) -> dict:
    ctx.progress(0.0, "building the segment")
    if params.mode == "input":
        end = _other_input(ctx, params.other_input_id)
    else:
        end = endpoint(ctx.net, ctx.x, params.direction, params.length, seed=params.seed)
    line = exact_line(ctx.net, ctx.x, end, progress=lambda f, m: ctx.progress(0.5 * f, m))
    result = {"mode": params.mode, "direction": params.direction, "classes": _classes(ctx),
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
    return jsonable({
        "shape": plane.shape, "axes": [params.first, params.second], "classes": _classes(ctx),
        "corners": [ctx.x, p1, p2],  # the plane's origin and axis ends, in input space
        "polygons": plane.polygons, "pattern_ids": plane.pattern_ids,
        "polygon_classes": plane.classes, "num_polygons": plane.num_polygons,
        "num_regions": plane.num_regions,
    })


def run_ig(ctx: JobContext, params: IGParams) -> dict:
    base = (_other_input(ctx, params.baseline_input_id) if params.baseline == "input"
            else None)
    cmp = compare_with_captum(ctx.net, ctx.x, base, params.target, method=params.method,
                              progress=ctx.progress)
    return jsonable({
        "target": cmp.exact.target, "classes": _classes(ctx),
        "input_shape": list(ctx.net.input_shape),
        "exact": cmp.exact.attributions, "num_pieces": cmp.exact.num_pieces,
        "completeness_error": cmp.exact.completeness_error,
        "f_x": cmp.exact.f_x, "f_baseline": cmp.exact.f_baseline,
        "exact_seconds": cmp.exact_seconds, "method": cmp.method,
        "table": [{"steps": s, "relative_error": e, "seconds": t}
                  for s, e, t in zip(cmp.steps, cmp.rel_errors, cmp.seconds, strict=True)],
        "captum": {str(s): a for s, a in zip(cmp.steps, cmp.captum, strict=True)},
    })


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
