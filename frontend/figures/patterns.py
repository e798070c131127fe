"""Figures for pattern rules: the neurons a rule uses, the inputs it covers, a counterexample."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def rule_neurons(result: dict, index: int) -> go.Figure:
    """The rule's layer as a grid of neurons: +1 must be on, -1 must be off, 0 unused."""
    rule = result["rules"][index]
    n = int(result["num_neurons"])
    state = np.zeros(n)
    state[rule["on"]] = 1.0
    state[rule["off"]] = -1.0
    cols = min(n, 16)
    rows = math.ceil(n / cols)
    grid = np.full(rows * cols, np.nan)
    grid[:n] = state
    labels = np.array([f"L{rule['layer']}.n{i}" for i in range(rows * cols)]).reshape(rows, cols)
    fig = go.Figure(go.Heatmap(
        z=grid.reshape(rows, cols), zmin=-1, zmax=1, text=labels,
        colorscale=[[0, "#1f77b4"], [0.5, "#eeeeee"], [1, "#d62728"]], showscale=False,
        hovertemplate="%{text}: %{z}<extra>+1 on, -1 off</extra>",
    ))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=f"Neurons of L{rule['layer']} used by the rule (red on, blue off)",
                      height=120 + 30 * rows, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def _image(values, shape: list[int]) -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(shape)
    return arr.reshape(-1, *arr.shape[-2:]).mean(0) if arr.ndim >= 2 else arr.reshape(1, -1)


def covered_inputs(result: dict, index: int) -> go.Figure:
    """Thumbnails of held-out inputs the rule covers, plus its counterexample if any."""
    rule = result["rules"][index]
    shape = result["input_shape"]
    images = [(_image(v, shape), "covered") for v in rule["covered"]]
    if rule["counterexample"] is not None:
        images.append((_image(rule["counterexample"], shape),
                       f"counterexample: class {rule['counterexample_class']}"))
    if not images:
        return go.Figure().update_layout(title="No held-out input is covered", height=120)
    fig = make_subplots(rows=1, cols=len(images), subplot_titles=[t for _, t in images],
                        horizontal_spacing=0.02)
    for k, (img, _) in enumerate(images, start=1):
        fig.add_trace(go.Heatmap(z=img, colorscale="gray_r", showscale=False,
                                 hovertemplate="%{z:.2f}<extra></extra>"), row=1, col=k)
        fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor=f"x{k}",
                         row=1, col=k)
        fig.update_xaxes(showticklabels=False, row=1, col=k)
    fig.update_layout(title="Inputs covered by the rule", height=220,
                      margin={"l": 10, "r": 10, "t": 60, "b": 10})
    return fig


def rule_table(result: dict, verdicts: list[dict] | None = None) -> list[dict]:
    """Rows for the sortable rule table; ``verdicts`` (a verification batch's result items, one
    per rule) replace the mining job's status and time when given."""
    rows = []
    for k, r in enumerate(result["rules"]):
        status, seconds = r["status"], r["seconds"]
        item = verdicts[k] if verdicts else None
        if item is not None:
            verdict = item["result"] or {}
            status = verdict.get("status", item["status"])
            seconds = verdict.get("seconds")
        rows.append({"rule": r["condition"], "class": r["target"], "support": r["support"],
                     "precision": round(r["precision"], 3), "recall": round(r["recall"], 3),
                     "status": status,
                     "time_s": None if seconds is None else round(seconds, 2)})
    return rows
