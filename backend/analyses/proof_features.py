"""Proof features as jobs: one proof, the largest certified eps per method, a method
comparison over gallery inputs (the page lines the latter up across sibling models), and a
VNN-LIB property verified on the model (proven / counterexample / unknown)."""

from __future__ import annotations

import statistics
from typing import Literal

import torch
from pydantic import BaseModel, Field

from app.analyses.proof_features import certify, largest_certified_eps, proof_features
from app.bounds import QUICK_METHODS
from app.errors import InvalidInputError
from app.properties import read_vnnlib, verify
from backend.analyses.base import Analysis, JobContext, jsonable, register

Method = Literal["interval", "deepz", "crown", "alpha-crown", "bab"]


class Params(BaseModel):
    eps: float = Field(0.05, gt=0.0, le=1.0, description="L-inf radius of the ball")
    method: Method = Field("crown", description="bound propagator, or branch and bound "
                                                "(features from alpha-CROWN; see the note)")
    max_maps: int = Field(16, ge=1, le=64, description="gradient maps returned (top priority)")
    time_limit_s: float = Field(60.0, gt=0.0, le=600.0,
                                description="branch and bound's time limit (seconds)")


class EpsParams(BaseModel):
    eps_max: float = Field(0.5, gt=0.0, le=1.0)
    tol: float = Field(1e-3, ge=1e-5, le=0.1)
    methods: list[Method] = Field(list(QUICK_METHODS), min_length=1, max_length=5,
                                  description="bound methods to bisect with")
    time_limit_s: float = Field(30.0, gt=0.0, le=600.0,
                                description="per method: the bisection stops there, keeping "
                                            "the largest eps certified so far")


class CompareParams(BaseModel):
    eps: float = Field(0.05, gt=0.0, le=1.0)
    n_inputs: int = Field(20, ge=1, le=200, description="gallery inputs to prove")


class PropertyParams(BaseModel):
    vnnlib: str = Field(..., min_length=1, max_length=4_000_000,
                        description="the property's VNN-LIB text (X_i: flattened input)")
    method: Literal["interval", "deepz", "crown", "alpha-crown", "bab"] = Field(
        "bab", description="bound method, or branch and bound (complete where it finishes)")
    time_limit: float = Field(60.0, gt=0.0, le=3600.0, description="seconds")


def _target(ctx: JobContext) -> tuple[torch.Tensor, int]:
    """The input and the class to prove: the network's own prediction."""
    with torch.no_grad():
        predicted = int(ctx.net(ctx.x[None].to(ctx.net.device, ctx.net.dtype)).argmax())
    return ctx.x, predicted


def run(ctx: JobContext, params: Params) -> dict:
    x, predicted = _target(ctx)
    result = proof_features(ctx.net, x, predicted, params.eps, params.method, ctx.input_range,
                            progress=ctx.progress, time_limit=params.time_limit_s)
    cert = result.certificate
    kept = result.kept[: params.max_maps]
    return jsonable({
        "method": params.method, "eps": params.eps, "predicted": predicted, "label": ctx.label,
        "certified": cert.certified, "margin": cert.margin, "margins": cert.margins,
        "num_features": result.num_features, "num_nonzero": result.num_nonzero,
        "num_kept": len(result.kept), "kept": result.kept, "sufficient": result.sufficient,
        "pruned_margin": result.pruned_margin, "feature_node": result.feature_node,
        "lower": result.lower, "upper": result.upper, "priority": result.priority,
        "input_shape": list(ctx.net.input_shape), "map_features": kept,
        "gradient_maps": result.gradient_maps[: len(kept)], "note": result.note,
    })


def run_eps(ctx: JobContext, params: EpsParams) -> dict:
    x, predicted = _target(ctx)
    found = {}
    methods = list(dict.fromkeys(params.methods))
    for k, method in enumerate(methods):
        def step(frac: float, msg: str, k: int = k) -> None:
            ctx.progress((k + frac) / len(methods), msg)

        found[method] = largest_certified_eps(ctx.net, x, predicted, method, params.eps_max,
                                              params.tol, ctx.input_range, progress=step,
                                              time_limit=params.time_limit_s)
    return jsonable({"predicted": predicted, "label": ctx.label, "eps_max": params.eps_max,
                     "tol": params.tol, "largest_eps": found})


def run_compare(ctx: JobContext, params: CompareParams) -> dict:
    xs, ys = ctx.gallery(params.n_inputs)
    if len(xs) == 0:
        raise InvalidInputError("this model has no gallery to compare on")
    rows = []
    total = len(QUICK_METHODS) * len(xs)
    for k, method in enumerate(QUICK_METHODS):
        certified, kept, margins = 0, [], []
        for i, (x, y) in enumerate(zip(xs, ys.tolist(), strict=True)):
            ctx.progress((k * len(xs) + i) / total, f"{method}: input {i + 1} of {len(xs)}")
            cert = certify(ctx.net, x, int(y), params.eps, method, ctx.input_range)
            margins.append(cert.margin)
            if cert.certified:
                certified += 1
                result = proof_features(ctx.net, x, int(y), params.eps, method, ctx.input_range)
                kept.append(len(result.kept) / result.num_features)
        rows.append({"method": method, "certified_rate": certified / len(xs),
                     "median_margin": statistics.median(margins),
                     "mean_kept_fraction": statistics.mean(kept) if kept else None})
    return jsonable({"eps": params.eps, "n_inputs": len(xs), "training": ctx.card.get("training"),
                     "rows": rows})


def run_property(ctx: JobContext, params: PropertyParams) -> dict:
    prop = read_vnnlib(params.vnnlib)
    verdict = verify(ctx.net, prop, params.method, params.time_limit, progress=ctx.progress)
    return jsonable({
        "status": verdict.status, "method": verdict.method, "seconds": verdict.seconds,
        "message": verdict.message, "cases": len(prop.cases), "case_status": verdict.case_status,
        "counterexample": verdict.counterexample, "output": verdict.output,
        "case": verdict.case, "boxes": verdict.boxes, "input_shape": list(ctx.net.input_shape),
    })


register(Analysis(
    name="proof_features", title="Proof features",
    description="Certify the eps-ball around the input with a bound propagator (interval, "
                "DeepZ, CROWN, alpha-CROWN) or branch and bound, prune the proof to its few sufficient penultimate-layer "
                "features (ProFIt) and show what each kept feature looks at.",
    params=Params, run=run,
))
register(Analysis(
    name="proof_eps", title="Largest certified eps",
    description="The largest L-inf radius each bound method (or branch and bound) certifies, "
                "by bisection within a time limit per method.",
    params=EpsParams, run=run_eps,
))
register(Analysis(
    name="proof_compare", title="Proof methods compared",
    description="Certified rate and kept proof features per bound method over gallery inputs.",
    params=CompareParams, run=run_compare, needs_input=False,
))
register(Analysis(
    name="verify_property", title="VNN-LIB property",
    description="Verify a VNN-COMP property (input box, linear output constraints) on the "
                "model: proven, a counterexample checked by a forward pass, or unknown within "
                "the time limit.",
    params=PropertyParams, run=run_property, needs_input=False,
))
