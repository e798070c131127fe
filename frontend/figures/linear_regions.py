"""Figures for the linear-region analyses: exact logit curves, class strips, region maps."""

from __future__ import annotations

import numpy as np
import plotly.colors as pc
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from frontend.figures import region_map

PALETTE = pc.qualitative.Plotly + pc.qualitative.D3
REGION_COLOURS = pc.qualitative.Pastel1[:8] + pc.qualitative.Pastel2[:4]


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


def plane_map(result: dict, size: int = 240) -> go.Figure:
    """The plane's linear regions as a map: each region (activation pattern) filled with a
    colour its neighbours do not share, class boundaries in bold black, region edges thin,
    the input marked; hovering names the region's pattern id and predicted class."""
    classes = result["classes"]
    polygons = [np.asarray(p, dtype=float) for p in result["polygons"]]
    pattern = np.asarray(result["pattern_ids"], dtype=np.int64)
    label = np.asarray(result["polygon_classes"], dtype=np.int64)
    grid = region_map.raster(polygons, size)
    starts, ends, owner, across = region_map.neighbours(polygons)
    colour = region_map.colour_regions(pattern, owner, across, len(REGION_COLOURS))
    inside = grid.owner >= 0
    safe = np.where(inside, grid.owner, 0)
    steps = len(REGION_COLOURS)
    scale = [[(c + edge) / steps, REGION_COLOURS[c]] for c in range(steps) for edge in (0, 1)]
    names = [str(c) for c in classes]
    by_index = names == [str(k) for k in range(len(names))]
    hover = ("class %{customdata[1]}" if by_index else "class %{text}")
    fig = go.Figure(go.Heatmap(
        x=grid.a, y=grid.b, zmin=0, zmax=steps, colorscale=scale, showscale=False,
        z=np.where(inside, colour[pattern[safe]] + 0.5, np.nan).astype(np.float32),
        customdata=np.stack([np.where(inside, pattern[safe], -1),
                             np.where(inside, label[safe], -1)], -1),
        text=None if by_index else np.array(names + [""])[np.where(inside, label[safe], -1)],
        hoverongaps=False, name="regions",
        hovertemplate=hover + "<br>region (pattern) %{customdata[0]}"
                              "<br>a %{x:.3f}, b %{y:.3f}<extra></extra>"))
    ex, ey = region_map.outlines(polygons)
    fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", name="region edges",
                             line={"color": "rgba(60,60,60,0.45)", "width": 0.6},
                             hoverinfo="skip"))
    valid = across >= 0
    cut = valid & (label[owner] != label[np.where(valid, across, 0)])
    bx, by = region_map.segments(starts[cut], ends[cut])
    fig.add_trace(go.Scatter(x=bx, y=by, mode="lines", name="class boundary",
                             line={"color": "black", "width": 3}, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[0.0], y=[0.0], mode="markers+text", name="input",
                             text=["input"], textposition="top right",
                             marker={"symbol": "star", "size": 16, "color": "white",
                                     "line": {"color": "black", "width": 1.5}},
                             hovertemplate="the input (a = 0, b = 0)<extra></extra>"))
    _label_classes(fig, polygons, label, classes)
    a, b = result["axes"]
    shown = len(np.unique(label))
    fig.update_layout(
        title=f"{result['num_regions']} linear regions ({result['num_polygons']} polygons), "
              f"{shown} predicted class{'es' if shown > 1 else ''}",
        xaxis_title=f"a: along {a}", yaxis_title=f"b: along {b}", height=560,
        margin={"t": 40, "b": 10}, plot_bgcolor="white",
        legend={"orientation": "h", "y": -0.12})
    fig.update_yaxes(scaleanchor="x", constrain="domain")
    fig.update_xaxes(constrain="domain")
    return fig


def _label_classes(fig: go.Figure, polygons: list[np.ndarray], label: np.ndarray,
                   classes: list) -> None:
    """Name each predicted class once, inside its largest polygon."""
    area = np.array([0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], -1))
                               - np.dot(p[:, 1], np.roll(p[:, 0], -1))) for p in polygons])
    for k in np.unique(label):
        best = int(np.flatnonzero(label == k)[np.argmax(area[label == k])])
        cx, cy = polygons[best].mean(0)
        fig.add_annotation(x=cx, y=cy, text=f"class {classes[k]}", showarrow=False,
                           font={"size": 13, "color": "black"},
                           bgcolor="rgba(255,255,255,0.75)")


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
