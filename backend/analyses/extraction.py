"""Black-box weight recovery as a job: the chosen model is queried as a black box.

The attack sees only logits for the inputs it asks about; the true network is used again
afterwards, to grade the recovered one and to draw true vs recovered weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import BaseModel, Field

from app.analyses.extraction import QueryOracle, extract, first_layer_pairs, grade
from app.errors import AtlasError, InvalidInputError
from backend.analyses.base import Analysis, JobContext, jsonable, register

MAX_PAIRS = 16
SUPPORTED = {"linear", "relu", "flatten", "reshape", "elementwise_affine"}


class Params(BaseModel):
    budget: int = Field(200_000, ge=1_000, le=2_000_000, description="query budget")
    domain_margin: float = Field(
        1.0, ge=0.0, le=5.0,
        description="widen the search box beyond the input range by this many range widths",
    )
    max_hidden_layers: int = Field(3, ge=1, le=3)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    time_limit_s: float = Field(
        900.0, ge=10.0, le=3600.0,
        description="stop searching after this many seconds and return a partial result",
    )


def queries_needed(summary: dict) -> int:
    """A lower bound on the queries the attack needs for this network.

    Every hidden neuron's boundary normal costs ``2 d`` queries (forward differences on both
    sides of one critical point, ``d`` inputs), and a tenth more is kept for the final check.
    """
    dim = math.prod(summary.get("input_shape") or [1])
    hidden = sum(math.prod(layer["out_shape"]) for layer in summary.get("layers", [])
                 if layer["kind"] == "relu")
    return int(1.1 * 2 * dim * hidden)


def check(summary: dict, params: Params) -> None:
    """Refuse, before the job starts, what the attack cannot do (with the reason)."""
    layers = summary.get("layers", [])
    other = sorted({layer["kind"] for layer in layers} - SUPPORTED)
    if other or not summary.get("sequential", True):
        what = ", ".join(other) or "non-sequential connections"
        raise InvalidInputError(
            f"weight recovery supports fully connected ReLU networks (linear and ReLU layers "
            f"in sequence); this model has {what}")
    if not any(layer["kind"] == "relu" for layer in layers):
        raise InvalidInputError("weight recovery needs at least one hidden ReLU layer; this "
                                "model is affine")
    need = queries_needed(summary)
    if params.budget < need:
        raise InvalidInputError(
            f"a query budget of {params.budget:,} is too small for this network: recovering "
            f"its {sum(math.prod(la['out_shape']) for la in layers if la['kind'] == 'relu'):,} "
            f"hidden neurons from {math.prod(summary['input_shape']):,} inputs needs at least "
            f"{need:,} queries (2 per input per neuron, plus the final check)")


def run(ctx: JobContext, params: Params) -> dict:
    check(ctx.net.summary(), params)
    lo, hi = ctx.input_range
    width = hi - lo
    net = ctx.net
    dim = math.prod(net.input_shape)
    result = extract(
        QueryOracle(net), dim, params.budget, lo=lo - params.domain_margin * width,
        hi=hi + params.domain_margin * width, max_hidden_layers=params.max_hidden_layers,
        seed=params.seed, progress=ctx.progress, time_limit_s=0.9 * params.time_limit_s,
    )
    out: dict = {
        "input_shape": list(net.input_shape), "input_range": [lo, hi],
        "search_box": [lo - params.domain_margin * width, hi + params.domain_margin * width],
        "layer_sizes": result.layer_sizes, "queries": result.queries,
        "seconds": result.seconds, "complete": result.complete, "notes": result.notes,
        "log": result.log, "critical_points": result.critical_points,
        "point_neuron": result.point_neuron, "first_layer": list(result.first_layer),
        "grading": None, "pairs": None, "region_map": None,
    }
    try:
        if result.network is None:
            raise AtlasError("nothing was recovered")
        report = grade(net, result, lo, hi)
        out["grading"] = {"layers": report.table(), "argmax_agreement": report.argmax_agreement,
                          "max_abs_logit_diff": report.max_abs_logit_diff}
        if result.network is not None:
            true_rows, found_rows = first_layer_pairs(net, result.network)
            out["pairs"] = {"true": true_rows[:MAX_PAIRS, :-1], "found": found_rows[:MAX_PAIRS, :-1]}
    except AtlasError as exc:
        out["notes"].append(f"grading unavailable: {exc}")
    if dim == 2:
        out["region_map"] = _region_map(ctx, *out["search_box"])
    ctx.progress(1.0, f"done: {result.queries} queries, {sum(result.layer_sizes)} neurons")
    return jsonable(out)


def _region_map(ctx: JobContext, lo: float, hi: float, n: int = 120) -> dict:
    """The true network's linear regions on a grid (one id per activation pattern)."""
    axis = np.linspace(lo, hi, n)
    grid = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
    x = torch.from_numpy(grid).to(ctx.net.dtype).reshape(-1, *ctx.net.input_shape)
    with torch.no_grad():
        patterns = ctx.net.activation_patterns(x)
    bits = torch.cat([p.reshape(len(x), -1) for p in patterns.values()], dim=1).numpy()
    _, ids = np.unique(bits, axis=0, return_inverse=True)
    return {"x": axis, "y": axis, "region": ids.reshape(n, n)}


register(Analysis(
    name="extraction",
    title="Weight recovery",
    description="Treat the model as a black box and recover its weights from queries alone "
    "(critical points along lines, layer by layer), then grade them against the truth.",
    params=Params,
    run=run,
    needs_input=False,
    check=check,
))
