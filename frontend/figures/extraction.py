"""Figures for the ``extraction`` analysis: progress, weights side by side, 2-D boundaries."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def discovery(result: dict) -> go.Figure:
    """Neurons found against queries spent, as the attack went along.

    Both axes start at zero, so a run that stopped early still gets a readable scale.
    """
    log = result["log"]
    top_q = max([e["queries"] for e in log] + [1])
    top_n = max([e["neurons"] for e in log] + [1])
    fig = go.Figure(go.Scatter(
        x=[e["queries"] for e in log], y=[e["neurons"] for e in log], mode="lines+markers",
        text=[e["phase"] for e in log],
        hovertemplate="%{text}<br>%{x} queries<br>%{y} neurons<extra></extra>",
    ))
    fig.update_layout(title="Neurons found vs queries spent", xaxis_title="queries",
                      yaxis_title="neurons found", margin={"t": 40, "b": 10}, height=320)
    fig.update_xaxes(range=[0, 1.05 * top_q])
    fig.update_yaxes(range=[0, 1.1 * top_n])
    return fig


def weight_pairs(result: dict, columns: int = 8) -> go.Figure:
    """Each first-layer neuron's true (top) and recovered (below) weights as images."""
    true, found = np.asarray(result["pairs"]["true"]), np.asarray(result["pairs"]["found"])
    shape = result["input_shape"][-2:]
    n = min(len(true), columns)
    fig = make_subplots(rows=2, cols=n, horizontal_spacing=0.01, vertical_spacing=0.06,
                        row_titles=["true", "recovered"])
    for i in range(n):
        bound = float(np.abs(true[i]).max()) or 1.0
        for row, values in ((1, true[i]), (2, found[i])):
            fig.add_trace(go.Heatmap(
                z=values.reshape(shape), colorscale="RdBu", zmin=-bound, zmax=bound,
                showscale=False, hovertemplate="w %{z:.4g}<extra></extra>",
            ), row=row, col=i + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor="x")
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title="First-layer weights: true vs recovered (aligned, scaled)",
                      height=300, margin={"t": 50, "b": 10, "l": 10, "r": 40})
    return fig


def boundaries_2d(result: dict) -> go.Figure:
    """Boundary points found and recovered first-layer lines over the true linear regions."""
    regions = result["region_map"]
    x, y = np.asarray(regions["x"]), np.asarray(regions["y"])
    fig = go.Figure(go.Heatmap(
        x=x, y=y, z=(np.asarray(regions["region"]) * 7919) % 97, colorscale="Rainbow",
        opacity=0.35, showscale=False, hoverinfo="skip",
    ))  # scrambled region ids, so neighbouring regions get different colours
    weight, bias = (np.asarray(a, dtype=float) for a in result["first_layer"])
    for j, (w, b) in enumerate(zip(weight, bias, strict=True)):
        xs, ys = _line_in_box(w, b, x[0], x[-1])
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "black", "width": 1},
                                 name=f"neuron {j}", showlegend=False))
    points = np.asarray(result["critical_points"], dtype=float).reshape(-1, 2)
    owner = np.asarray(result["point_neuron"])
    for label, mask, color in (("first layer", owner >= 0, "#d62728"),
                               ("deeper layer", owner < 0, "#1f77b4")):
        if mask.any():
            fig.add_trace(go.Scatter(x=points[mask, 0], y=points[mask, 1], mode="markers",
                                     marker={"size": 6, "color": color}, name=label))
    fig.update_xaxes(range=[x[0], x[-1]], title="x0")
    fig.update_yaxes(range=[y[0], y[-1]], title="x1", scaleanchor="x")
    fig.update_layout(title="Boundary points and recovered hyperplanes over the true regions",
                      height=520, margin={"t": 40, "b": 10},
                      legend={"orientation": "h", "y": -0.12})
    return fig


def _line_in_box(w: np.ndarray, b: float, lo: float, hi: float) -> tuple[list, list]:
    """Two points of ``w . x + b = 0`` spanning the square ``[lo, hi]^2``."""
    if abs(w[1]) >= abs(w[0]):
        xs = np.array([lo, hi])
        return list(xs), list(-(b + w[0] * xs) / w[1])
    ys = np.array([lo, hi])
    return list(-(b + w[1] * ys) / w[0]), list(ys)
