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


def tradeoff(result: dict) -> go.Figure:
    """Fidelity of distilled rule lists against their size, one line per kind of literal;
    the list the page reports is circled."""
    fig = go.Figure()
    names = {"threshold": "threshold literals (pre-activation > t)",
             "pattern": "on/off literals (pattern rules)"}
    for kind, color, dash in (("pattern", "#2ca02c", "dash"), ("threshold", "#1f77b4", "solid")):
        rows = sorted((r for r in result["rule_list_tradeoff"] if r["literals"] == kind),
                      key=lambda r: r["rules"])
        if not rows:
            continue
        fig.add_trace(go.Scatter(
            x=[r["rules"] for r in rows], y=[r["fidelity"] for r in rows], mode="lines+markers",
            name=names[kind], line={"color": color, "dash": dash},
            customdata=[r["max_rules"] or "no limit" for r in rows],
            hovertemplate="%{x} rules (limit %{customdata}): fidelity %{y:.1%}<extra></extra>"))
    lowest = min((r["fidelity"] for r in result["rule_list_tradeoff"]), default=0.0)
    fig.add_trace(go.Scatter(
        x=[result["rule_list_size"]], y=[result["fidelity"]], mode="markers", showlegend=False,
        marker={"size": 16, "symbol": "circle-open", "color": "#d62728", "line": {"width": 2}},
        hovertemplate="the list reported above: %{x} rules, %{y:.1%}<extra></extra>"))
    fig.update_layout(title="Rule-list size vs fidelity (agreement with the network on "
                            "held-out inputs)",
                      xaxis_title="rules in the list", yaxis_title="fidelity",
                      yaxis_tickformat=".0%", yaxis_range=[max(0.0, lowest - 0.05), 1.01],
                      height=340,
                      margin={"l": 10, "r": 10, "t": 50, "b": 40},
                      legend={"orientation": "h", "y": -0.25})
    return fig


def coverage_summary(cov: dict) -> str:
    """One sentence on what the proven coverage counts, every status word as measured."""
    statuses = cov["statuses"]
    where = ("within the eps " f"{cov['eps']:g} L-inf ball around it" if cov["eps"] is not None
             else "on the whole input box")
    prop = (f"their input property (the polytope of their pattern up to L{cov['layer']}, "
            f"{where}, proven to imply the decision)")
    if cov["eps"] is None:
        parts = [f"{cov['covered']} of {cov['checked']} held-out inputs have a proven reason "
                 f"for their decision: {cov['by_rule']} by a pattern rule proven on the whole "
                 f"box, {cov['by_property']} by {prop}."]
    else:  # a rule proven on one input's ball says nothing about the others
        parts = [f"{cov['covered']} of {cov['checked']} held-out inputs have a proven reason "
                 f"for their decision: {prop}."]
    refuted, unknown = statuses.get("counterexample", 0), statuses.get("unknown", 0)
    if refuted:
        parts.append(f"For {refuted} that region holds an input of another class (a "
                     "counterexample confirmed by a forward pass), so they are not covered.")
    if unknown:
        parts.append(f"For {unknown} the solver gave no answer in time (unknown, not covered).")
    return " ".join(parts)


def properties_table(rule: dict) -> list[dict]:
    """Rows for the input properties of the inputs a refuted rule covers: verdict on the
    rule's domain (and on the eps-ball where the box failed) and the polytope's extent."""
    rows = []
    for k, p in enumerate(rule.get("properties") or []):
        ball = p["ball"]
        row = {"input": f"covered #{k + 1}",
               f"on the {p['domain']}": _verdict(p["status"], p.get("counterexample_class"))}
        if p["domain"] == "box":
            row["on its eps-ball"] = (_verdict(ball["status"]) if ball
                                      else "proven (it holds on the box)")
        rows.append(row | {
            "constraints": p["num_constraints"],
            "L-inf radius around it": _round(p["radius_linf"]),
            "largest L-inf ball inside": _round(p["chebyshev_linf"]),
            "largest L2 ball inside": _round(p["chebyshev_l2"]),
        })
    return rows


def _verdict(status: str, cls: int | None = None) -> str:
    if status == "counterexample":
        return "refuted" + (f" (class {cls} wins)" if cls is not None else "")
    return status


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 5)
