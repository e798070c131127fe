"""Figures for the ``predict`` analysis: class scores and the activation pattern."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go


def class_scores(result: dict) -> go.Figure:
    """Softmax score per class; the predicted class stands out, the true label is marked."""
    classes = [str(c) for c in result["classes"]]
    predicted, label = result["predicted"], result.get("label")
    colors = ["#d62728" if i == predicted else "#9aa5b1" for i in range(len(classes))]
    fig = go.Figure(go.Bar(
        x=classes, y=result["scores"], marker_color=colors,
        customdata=result["logits"],
        hovertemplate="class %{x}<br>score %{y:.4f}<br>logit %{customdata:.3f}<extra></extra>",
    ))
    if label is not None and 0 <= label < len(classes):
        fig.add_annotation(x=classes[label], y=result["scores"][label], text="true label",
                           showarrow=True, arrowhead=2, ay=-30)
    fig.update_layout(
        title="Class scores (softmax)", xaxis_title="class", yaxis_title="score",
        xaxis_type="category", yaxis_range=[0, 1.15], margin={"t": 40, "b": 10},
    )
    return fig


def layer_activity(result: dict) -> go.Figure:
    """Active and inactive ReLUs per layer, as stacked bars."""
    names = [f"ReLU {n + 1} (node {layer['node']})" for n, layer in enumerate(result["layers"])]
    active = [layer["active"] for layer in result["layers"]]
    inactive = [layer["neurons"] - layer["active"] for layer in result["layers"]]
    fig = go.Figure([
        go.Bar(name="active (on)", x=names, y=active, marker_color="#2ca02c"),
        go.Bar(name="inactive (off)", x=names, y=inactive, marker_color="#c7c7c7"),
    ])
    fig.update_layout(
        barmode="stack", title="ReLUs switched on per layer", yaxis_title="neurons",
        margin={"t": 40, "b": 10}, legend={"orientation": "h", "y": -0.2},
    )
    return fig


def pattern_grid(layer: dict) -> np.ndarray:
    """A conv layer's 0/1 pattern as its spatial map: the fraction of channels on."""
    shape = tuple(layer["shape"])
    return np.asarray(layer["pattern"], dtype=float).reshape(shape).mean(axis=0)


def pattern_strip(layer: dict, title: str) -> go.Figure:
    """A dense layer's 0/1 pattern as one row of units in index order: its units have no
    spatial layout, so none is drawn."""
    pattern = np.asarray(layer["pattern"], dtype=float).reshape(1, -1)
    fig = go.Figure(go.Heatmap(
        z=pattern, x=np.arange(pattern.shape[1]), colorscale=[[0, "#eeeeee"], [1, "#2ca02c"]],
        zmin=0, zmax=1, showscale=False, xgap=1,
        hovertemplate="unit %{x}: %{z:.0f}<extra>1 = on</extra>"))
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title=title, height=150, xaxis_title="unit",
                      margin={"l": 10, "r": 10, "t": 40, "b": 40})
    return fig
