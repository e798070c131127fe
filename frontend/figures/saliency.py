"""Figures for SMT saliency: the maps side by side, the selected neurons, grading curves."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from frontend.figures.images import as_image

METHODS = {"smt": "SMT mask", "ig": "Integrated Gradients", "smoothgrad": "SmoothGrad"}


def maps(result: dict) -> go.Figure:
    """Input, SMT mask, ranked SMT saliency, IG and SmoothGrad as heatmaps over the input."""
    panels = [("input", result["input"], "gray", False),
              (f"SMT mask ({result['mask_size']} features)", result["mask"], "Reds", False),
              ("SMT ranked saliency", result["saliency"], "Reds", False),
              ("Integrated Gradients", result["ig"], "RdBu", True),
              ("SmoothGrad", result["smoothgrad"], "Reds", False)]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels],
                        horizontal_spacing=0.02)
    for col, (_, values, scale, signed) in enumerate(panels, start=1):
        img = as_image(values, how="mean" if col == 1 else "sum")  # the input, then attributions
        bound = float(np.abs(img).max()) or 1.0
        fig.add_trace(go.Heatmap(
            z=img, colorscale=scale, showscale=False, zmin=-bound if signed else 0.0,
            zmax=bound, hovertemplate="row %{y}, col %{x}<br>%{z:.4g}<extra></extra>",
        ), row=1, col=col)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{col}", showticklabels=False,
                         row=1, col=col)
        fig.update_xaxes(showticklabels=False, row=1, col=col)
    fig.update_layout(height=300, margin={"t": 40, "b": 10, "l": 10, "r": 10})
    return fig


def neurons(result: dict) -> go.Figure:
    """The selected first-layer neurons: original vs masked pre-activation, and the threshold."""
    rows = result["neurons"]
    names = [str(n["index"]) for n in rows]
    fig = go.Figure([
        go.Bar(name="original", x=names, y=[n["pre_activation"] for n in rows]),
        go.Bar(name="on the masked input", x=names, y=[n["masked_pre_activation"] for n in rows]),
        go.Scatter(name=f"threshold ({result['threshold']:g} x original)", x=names,
                   y=[result["threshold"] * n["pre_activation"] for n in rows], mode="markers",
                   marker={"symbol": "line-ew-open", "size": 18, "color": "black"}),
    ])
    fig.update_layout(
        title="Selected first-layer neurons (by IG, highest first)", barmode="group",
        xaxis_title="neuron", yaxis_title="pre-activation", xaxis_type="category", height=320,
        margin={"t": 40, "b": 10},
    )
    return fig


def curves(result: dict) -> go.Figure:
    """Insertion and deletion curves of the three methods over the kept features."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["insertion (higher is better)",
                                                        "deletion (lower is better)"])
    for name, grade in result["grades"].items():
        for col, key in ((1, "insertion_curve"), (2, "deletion_curve")):
            ys = grade[key]
            fig.add_trace(go.Scatter(x=list(range(len(ys))), y=ys, name=METHODS.get(name, name),
                                     legendgroup=name, showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(title_text="features inserted / deleted")
    fig.update_yaxes(title_text="target probability", col=1)
    fig.update_layout(height=300, margin={"t": 40, "b": 10})
    return fig


def grade_rows(result: dict) -> list[dict]:
    """The grading table: one row per method at the same number of kept features."""
    return [{
        "method": METHODS.get(name, name),
        "kept features": g["kept"],
        "sparsity": round(g["sparsity"], 3),
        "prediction survives": g["survives"],
        "features to survive": g["survive_size"],
        "insertion AUC": round(g["insertion_auc"], 3),
        "deletion AUC": round(g["deletion_auc"], 3),
        "saliency metric": round(g["saliency_metric"], 3),
    } for name, g in result["grades"].items()]


def verified(result: dict) -> go.Figure:
    """Input, VeriX explanation, and for one kept feature its counterexample and the change."""
    x = as_image(result["input"])
    panels = [("input", x, "gray", False),
              (f"explanation ({result['size']} features)", as_image(result["explanation"]),
               "Reds", False)]
    if result["counterexamples"]:
        first = result["counterexamples"][0]
        cex = as_image(first["input"])
        panels += [(f"counterexample: class {first['predicted']}", cex, "gray", False),
                   (f"change (feature {first['feature']} freed)", cex - x, "RdBu", True)]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels],
                        horizontal_spacing=0.02)
    for col, (_, img, scale, signed) in enumerate(panels, start=1):
        bound = float(np.abs(img).max()) or 1.0
        fig.add_trace(go.Heatmap(z=img, colorscale=scale, showscale=False,
                                 zmin=-bound if signed else 0.0, zmax=bound), row=1, col=col)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{col}", showticklabels=False,
                         row=1, col=col)
        fig.update_xaxes(showticklabels=False, row=1, col=col)
    fig.update_layout(height=300, margin={"t": 40, "b": 10, "l": 10, "r": 10})
    return fig
