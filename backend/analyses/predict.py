"""The simple analysis that proves the path: class scores and activation pattern summary."""

from __future__ import annotations

from app.analyses.predict import predict
from backend.analyses.base import Analysis, JobContext, NoParams, jsonable, register


def run(ctx: JobContext, params: NoParams) -> dict:
    ctx.progress(0.1, "running the network")
    result = predict(ctx.net, ctx.x)
    classes = ctx.class_names
    ctx.progress(1.0, "done")
    return jsonable({
        "predicted": result.predicted,
        "predicted_class": classes[result.predicted] if result.predicted < len(classes) else None,
        "label": ctx.label,
        "correct": None if ctx.label is None else result.predicted == ctx.label,
        "classes": classes,
        "scores": result.scores,
        "logits": result.logits,
        "layers": result.layers,
        "total_neurons": sum(layer.neurons for layer in result.layers),
        "total_active": sum(layer.active for layer in result.layers),
    })


register(Analysis(
    name="predict",
    title="Prediction",
    description="Per-class scores (softmax) and, per ReLU layer, which neurons the input "
    "switches on.",
    params=NoParams,
    run=run,
))
