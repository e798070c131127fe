"""Figures for the linear-region analyses: exact logit curves, class strips, region maps."""

from __future__ import annotations

import plotly.colors as pc
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = pc.qualitative.Plotly + pc.qualitative.D3


def _class_color(k: int) -> str:
    return PALETTE[int(k) % len(PALETTE)]


def logits_along_line(result: dict) -> go.Figure:
    """Every logit along t (exact: straight between breakpoints), pieces shaded alternately,
    with the predicted-class strip underneath."""
    line, classes = result["line"], result["classes"]
    ts, logits = line["ts"], line["logits"]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.85, 0.15],
                        vertical_spacing=0.04)
    for i in range(0, len(ts) - 1, 2):
        fig.add_vrect(x0=ts[i], x1=ts[i + 1], fillcolor="#888", opacity=0.08, line_width=0,
                      row=1, col=1)
    for c in range(len(logits[0])):
        fig.add_trace(go.Scatter(
            x=ts, y=[row[c] for row in logits], mode="lines", name=f"class {classes[c]}",
            line={"color": _class_color(c)}), row=1, col=1)
    cts, labels = line["class_ts"], line["class_labels"]
    for k, label in enumerate(labels):
        fig.add_trace(go.Scatter(
            x=[cts[k], cts[k + 1], cts[k + 1], cts[k], cts[k]], y=[0, 0, 1, 1, 0],
            fill="toself", mode="lines", line={"width": 0}, fillcolor=_class_color(label),
            name=f"predicted {classes[label]}", showlegend=False,
            hovertemplate=f"predicted {classes[label]}<extra></extra>"), row=2, col=1)
    fig.update_yaxes(title_text="logit", row=1, col=1)
    fig.update_yaxes(showticklabels=False, title_text="class", row=2, col=1)
    fig.update_xaxes(title_text="t (0 = input)", row=2, col=1)
    fig.update_layout(title=f"Logits along the segment: {line['num_pieces']} linear pieces",
                      height=480, margin={"t": 40, "b": 10})
    return fig


def tangent_gap(result: dict) -> go.Figure:
    """Distance between the network and its tangent at the input, FGSM vs one random line."""
    lin = result["linearity"]
    fig = go.Figure([
        go.Scatter(x=lin["fgsm_gap"]["ts"], y=lin["fgsm_gap"]["gap"], name="FGSM direction"),
        go.Scatter(x=lin["random_gap"]["ts"], y=lin["random_gap"]["gap"],
                   name="random direction"),
    ])
    fig.update_layout(title="Gap to the tangent at the input (max over logits)",
                      xaxis_title="t", yaxis_title="|F - tangent|", height=320,
                      margin={"t": 40, "b": 10})
    return fig


def plane_map(result: dict) -> go.Figure:
    """Polygons of the plane coloured by predicted class, region edges drawn."""
    classes = result["classes"]
    fig = go.Figure()
    seen = set()
    for poly, label, pid in zip(result["polygons"], result["polygon_classes"],
                                result["pattern_ids"], strict=True):
        xs = [p[0] for p in poly] + [poly[0][0]]
        ys = [p[1] for p in poly] + [poly[0][1]]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, fill="toself", mode="lines", fillcolor=_class_color(label),
            line={"color": "rgba(0,0,0,0.35)", "width": 0.5}, name=f"class {classes[label]}",
            legendgroup=str(label), showlegend=label not in seen,
            hovertemplate=f"class {classes[label]}, region {pid}<extra></extra>"))
        seen.add(label)
    a, b = result["axes"]
    fig.update_layout(
        title=f"{result['num_regions']} linear regions ({result['num_polygons']} polygons)",
        xaxis_title=f"a: along {a}", yaxis_title=f"b: along {b}", height=520,
        margin={"t": 40, "b": 10})
    fig.update_yaxes(scaleanchor="x")
    return fig


def ig_error(result: dict) -> go.Figure:
    """Captum's relative error against the exact IG, per step count."""
    table = result["table"]
    fig = go.Figure(go.Scatter(
        x=[r["steps"] for r in table], y=[100 * r["relative_error"] for r in table],
        mode="lines+markers", name=result["method"]))
    fig.update_xaxes(tickvals=[r["steps"] for r in table])
    fig.update_layout(title="Captum IG relative error (L1) vs exact", xaxis_type="log",
                      xaxis_title="steps", yaxis_title="error (%)", height=320,
                      margin={"t": 40, "b": 10})
    return fig


def density_comparison(rows: list[dict]) -> go.Figure:
    """Pieces per unit length along FGSM and random directions, one bar pair per model."""
    names = [r["model"] for r in rows]
    fig = go.Figure([
        go.Bar(x=names, y=[r["FGSM density"] for r in rows], name="FGSM direction"),
        go.Bar(x=names, y=[r["random density"] for r in rows], name="random directions"),
    ])
    fig.update_layout(title="Linear pieces per unit length (L2), same input", barmode="group",
                      yaxis_title="pieces / unit length", height=360, margin={"t": 40, "b": 10})
    return fig
