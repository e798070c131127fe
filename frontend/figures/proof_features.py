"""Figures for the proof-feature analyses: feature intervals, gradient-map grid, method table."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def feature_intervals(result: dict) -> go.Figure:
    """Every penultimate feature's interval, sorted by priority; kept ones highlighted."""
    lower, upper = np.asarray(result["lower"]), np.asarray(result["upper"])
    priority = np.asarray(result["priority"])
    order = np.argsort(-priority, kind="stable")
    kept = set(result["kept"])
    colors = ["#d62728" if i in kept else "#9aa5b1" for i in order]
    fig = go.Figure(go.Bar(
        x=[str(i) for i in order], y=(upper - lower)[order], base=lower[order],
        marker_color=colors, customdata=priority[order],
        hovertemplate="feature %{x}<br>[%{base:.3f}, %{y:.3f} wide]"
                      "<br>priority %{customdata:.4g}<extra></extra>",
    ))
    fig.update_layout(
        title=f"Proof features by priority ({len(kept)} kept of {len(lower)}, red)",
        xaxis_title="feature (highest priority first)", yaxis_title="interval",
        xaxis_type="category", height=320, margin={"t": 40, "b": 10},
    )
    return fig


def gradient_grid(result: dict, columns: int = 4, title: str = "") -> go.Figure:
    """One heatmap per kept feature: the gradient of its interval midpoint w.r.t. the input."""
    maps = np.asarray(result["gradient_maps"], dtype=float)
    features = result["map_features"]
    if maps.size == 0:
        return go.Figure().update_layout(title=title or "No proof features (not certified)",
                                         height=120)
    images = maps.reshape(len(maps), -1, *maps.shape[-2:]).sum(1) if maps.ndim >= 3 else maps
    cols = min(columns, len(images))
    rows = math.ceil(len(images) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"feature {f}" for f in features],
                        horizontal_spacing=0.03, vertical_spacing=0.08)
    bound = float(np.abs(images).max()) or 1.0
    for k, img in enumerate(images):
        fig.add_trace(go.Heatmap(
            z=img, colorscale="RdBu", zmin=-bound, zmax=bound, showscale=k == 0,
            hovertemplate="row %{y}, col %{x}<br>gradient %{z:.4g}<extra></extra>",
        ), row=k // cols + 1, col=k % cols + 1)
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=title, height=80 + 170 * rows, margin={"t": 60, "b": 10})
    return fig


def largest_eps(result: dict) -> go.Figure:
    """Largest certified eps per bound method."""
    methods = list(result["largest_eps"])
    fig = go.Figure(go.Bar(x=methods, y=[result["largest_eps"][m] for m in methods],
                           marker_color="#1f77b4",
                           hovertemplate="%{x}: eps %{y:.4f}<extra></extra>"))
    fig.update_layout(title="Largest certified eps", yaxis_title="eps", height=300,
                      margin={"t": 40, "b": 10})
    return fig


def property_verdict(result: dict) -> go.Figure:
    """A VNN-LIB verdict's counterexample: the input (an image when its shape is one, else
    one bar per input) beside the network's outputs on it."""
    if result.get("counterexample") is None:
        return go.Figure().update_layout(
            title=f"{result['status']}: no counterexample to show", height=120)
    x = np.asarray(result["counterexample"], dtype=float)
    y = np.asarray(result["output"], dtype=float).reshape(-1)
    image = _image_shape(result.get("input_shape") or list(x.shape), x.size)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                        subplot_titles=["counterexample input", "network output on it"])
    if image is not None:
        img = x.reshape(-1, *image).mean(0)  # channels averaged
        fig.add_trace(go.Heatmap(z=img, colorscale="Greys", showscale=False,
                                 hovertemplate="row %{y}, col %{x}: %{z:.4g}<extra></extra>"),
                      row=1, col=1)
        fig.update_yaxes(autorange="reversed", scaleanchor="x", row=1, col=1)
    else:
        x = x.reshape(-1)
        fig.add_trace(go.Bar(x=[f"X_{i}" for i in range(x.size)], y=x, marker_color="#1f77b4",
                             hovertemplate="%{x}: %{y:.4g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=[f"Y_{j}" for j in range(y.size)], y=y, marker_color="#d62728",
                         hovertemplate="%{x}: %{y:.4g}<extra></extra>"), row=1, col=2)
    case = result.get("case")
    fig.update_layout(title=f"Counterexample (meets case {case + 1 if case is not None else '?'}"
                            f" of {result.get('cases', '?')})", showlegend=False, height=340,
                      margin={"t": 60, "b": 10})
    return fig


def _image_shape(shape: list[int], size: int) -> tuple[int, int] | None:
    """``(height, width)`` when the input reads as an image: two non-unit trailing dimensions,
    or a flat square of at least 16 pixels (MNIST's 784 as 28x28); else ``None``."""
    dims = [int(d) for d in shape if int(d) > 1]
    if len(dims) >= 2:
        return dims[-2], dims[-1]
    side = math.isqrt(size)
    return (side, side) if side * side == size and size >= 16 else None
