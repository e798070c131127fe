"""Figures for pattern rules: the neurons a rule uses, the inputs it covers, a counterexample."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from frontend.figures.images import as_image


def rule_neurons(result: dict, index: int) -> go.Figure:
    """The neurons the rule names, by index: a bar up for "must be on", down for "must be
    off" (the layer's other neurons are free and not drawn)."""
    rule = result["rules"][index]
    used = sorted([(i, 1) for i in rule["on"]] + [(i, -1) for i in rule["off"]])
    labels = [f"n{i}" for i, _ in used]
    fig = go.Figure(go.Bar(
        x=labels, y=[v for _, v in used],
        marker_color=["#2ca02c" if v > 0 else "#7f7f7f" for _, v in used],
        text=["on" if v > 0 else "off" for _, v in used], textposition="inside",
        hovertemplate="%{x} must be %{text}<extra></extra>"))
    fig.update_yaxes(range=[-1.2, 1.2], showticklabels=False, zeroline=True)
    fig.update_layout(title=f"The {len(used)} of {result['num_neurons']} neurons of "
                            f"L{rule['layer']} the rule uses (green on, grey off)",
                      height=220, xaxis_title="neuron", xaxis_type="category",
                      margin={"l": 10, "r": 10, "t": 40, "b": 40})
    return fig


def covered_inputs(result: dict, index: int) -> go.Figure:
    """Thumbnails of held-out inputs the rule covers, plus its counterexample if any."""
    rule = result["rules"][index]
    shape = result["input_shape"]
    images = [(as_image(v, shape), "covered") for v in rule["covered"]]
    if rule["counterexample"] is not None:
        images.append((as_image(rule["counterexample"], shape),
                       f"counterexample: class {rule['counterexample_class']}"))
    if not images:
        return go.Figure().update_layout(title="No held-out input is covered", height=120)
    fig = make_subplots(rows=1, cols=len(images), subplot_titles=[t for _, t in images],
                        horizontal_spacing=0.02)
    for k, (img, _) in enumerate(images, start=1):
        fig.add_trace(go.Heatmap(z=img, colorscale="gray", showscale=False,
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
                     "time_s": "not run" if seconds is None else f"{seconds:.2f}"})
    return rows
