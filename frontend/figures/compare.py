"""Figures of a comparison: one subplot column (or trace) per model.

One input: class scores, kept proof features' gradient maps, largest certified eps. A batch:
certified accuracy vs eps, distribution of kept proof features. Each takes the models'
labels and their cell results (or summaries) only, so the page and the HTML report draw the
same pictures.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from frontend.figures.images import as_image

COLORS = qualitative.Plotly
MAX_FEATURE_ROWS = 4


def model_label(model: dict) -> str:
    """A short column title: the training method from the card, else the model's name."""
    card = model.get("card") or {}
    return f"{card['training']} ({model['name']})" if card.get("training") else model["name"]


def margin(prediction: dict) -> float:
    """Logit of the predicted class minus the runner-up's."""
    logits = np.sort(np.asarray(prediction["logits"], dtype=float))
    return float(logits[-1] - logits[-2]) if logits.size > 1 else float("nan")


def class_scores(labels: list[str], predictions: list[dict | None]) -> go.Figure:
    """Softmax scores per model; the predicted class in red."""
    fig = make_subplots(rows=1, cols=len(labels), shared_yaxes=True,
                        subplot_titles=[_prediction_title(lbl, p)
                                        for lbl, p in zip(labels, predictions, strict=True)])
    for k, result in enumerate(predictions):
        if result is None:
            continue
        classes = [str(c) for c in result["classes"]]
        colors = ["#d62728" if i == result["predicted"] else "#9aa5b1"
                  for i in range(len(classes))]
        fig.add_trace(go.Bar(x=classes, y=result["scores"], marker_color=colors,
                             showlegend=False, customdata=result["logits"],
                             hovertemplate="class %{x}<br>score %{y:.4f}"
                                           "<br>logit %{customdata:.3f}<extra></extra>"),
                      row=1, col=k + 1)
    fig.update_xaxes(type="category")
    fig.update_yaxes(range=[0, 1.05])
    fig.update_layout(title="Prediction and margin", height=330, margin={"t": 120, "b": 10})
    return fig


def _prediction_title(label: str, result: dict | None) -> str:
    if result is None:
        return f"{label}<br>pending"
    return f"{label}<br>class {result['predicted_class']}, margin {margin(result):.2f}"


def proof_maps(labels: list[str], proofs: list[dict | None],
               rows: int = MAX_FEATURE_ROWS) -> go.Figure:
    """Gradient maps of each model's highest-priority kept proof features (one column each)."""
    counts = [len(p["gradient_maps"]) if p else 0 for p in proofs]
    rows = max(1, min(rows, max(counts, default=0)))
    titles = []
    for r in range(rows):
        for k, proof in enumerate(proofs):
            if r == 0:
                head = labels[k] + "<br>"
                head += (_proof_summary(proof) if proof else "pending") + "<br>"
            else:
                head = ""
            feature = proof["map_features"][r] if proof and r < counts[k] else None
            titles.append(head + (f"feature {feature}" if feature is not None else ""))
    fig = make_subplots(rows=rows, cols=len(proofs), subplot_titles=titles,
                        horizontal_spacing=0.04, vertical_spacing=0.1 if rows > 1 else 0.0)
    for k, proof in enumerate(proofs):
        if not proof:
            continue
        maps = np.asarray(proof["gradient_maps"], dtype=float)
        if maps.size == 0:
            continue
        images = maps.reshape(len(maps), -1, *maps.shape[-2:]).sum(1)
        bound = float(np.abs(images[:rows]).max()) or 1.0
        for r, img in enumerate(images[:rows]):
            fig.add_trace(go.Heatmap(z=img, colorscale="RdBu", zmin=-bound, zmax=bound,
                                     showscale=False,
                                     hovertemplate="row %{y}, col %{x}<br>gradient %{z:.4g}"
                                                   "<extra></extra>"),
                          row=r + 1, col=k + 1)
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title="Proof features: gradient maps of the kept features",
                      height=130 + 190 * rows, margin={"t": 130, "b": 10})
    return fig


def proven_by_splitting(proof: dict) -> bool:
    """A branch-and-bound proof that alpha-CROWN alone could not give (no features)."""
    return proof["method"] == "bab" and proof["certified"] and not proof["sufficient"]


def _proof_summary(proof: dict) -> str:
    if not proof["certified"]:
        return f"not certified at eps {proof['eps']:g}"
    if proven_by_splitting(proof):
        return "proven by branch and bound: no single-proof features"
    return f"{proof['num_kept']} of {proof['num_features']} features kept"


def largest_eps(labels: list[str], found: list[dict | None]) -> go.Figure:
    """Largest certified eps per bound method (bars), one colour per model."""
    fig = go.Figure()
    for k, (label, result) in enumerate(zip(labels, found, strict=True)):
        if result is None:
            continue
        methods = list(result["largest_eps"])
        fig.add_trace(go.Bar(name=label, x=methods,
                             y=[result["largest_eps"][m] for m in methods],
                             marker_color=COLORS[k % len(COLORS)],
                             hovertemplate=f"{label}<br>%{{x}}: eps %{{y:.4f}}<extra></extra>"))
    fig.update_layout(title="Largest certified eps (bisection)", yaxis_title="eps",
                      barmode="group", height=320, margin={"t": 40, "b": 10},
                      legend={"orientation": "h", "y": -0.15})
    return fig


def certified_accuracy(labels: list[str], summaries: list[dict], method: str) -> go.Figure:
    """Certified accuracy vs eps, one line per model."""
    fig = go.Figure()
    for k, (label, summary) in enumerate(zip(labels, summaries, strict=True)):
        fig.add_trace(go.Scatter(
            x=summary["eps_grid"], y=summary["certified_accuracy"], mode="lines", name=label,
            line={"color": COLORS[k % len(COLORS)], "shape": "hv"},
            hovertemplate=f"{label}<br>eps %{{x:.3f}}: %{{y:.1%}}<extra></extra>"))
    fig.update_layout(title=f"Certified accuracy vs eps ({method}, bisection)",
                      xaxis_title="eps (L-inf)", yaxis_title="certified accuracy",
                      yaxis_range=[0, 1.02], yaxis_tickformat=".0%", height=360,
                      margin={"t": 40, "b": 10}, legend={"orientation": "h", "y": -0.2})
    return fig


def kept_counts(labels: list[str], summaries: list[dict], eps: float) -> go.Figure:
    """Distribution of the number of proof features kept, over the certified inputs."""
    fig = go.Figure()
    for k, (label, summary) in enumerate(zip(labels, summaries, strict=True)):
        counts = summary["kept_counts"]
        fig.add_trace(go.Box(
            y=counts, name=f"{label}<br>{len(counts)} certified, "
                           f"{summary['not_certified']} not",
            boxpoints="all", jitter=0.4, pointpos=0, marker_color=COLORS[k % len(COLORS)],
            showlegend=False))
    fig.update_layout(title=f"Proof features kept per certified input (eps {eps:g})",
                      yaxis_title="features kept", height=360, margin={"t": 40, "b": 10})
    return fig




def region_density(labels: list[str], lines: list[dict | None]) -> go.Figure:
    """Linear pieces per unit length along the FGSM direction and random directions."""
    fig = go.Figure()
    for kind, color in (("fgsm", "#d62728"), ("random", "#7f7f7f")):
        xs, ys = [], []
        for label, line in zip(labels, lines, strict=True):
            if line and line.get("linearity"):
                xs.append(label)
                ys.append(line["linearity"][f"{kind}_density"])
        fig.add_trace(go.Bar(name="FGSM" if kind == "fgsm" else "random (mean)", x=xs, y=ys,
                             marker_color=color,
                             hovertemplate="%{x}<br>%{y:.2f} pieces per unit<extra></extra>"))
    fig.update_layout(title="Linear-region density along FGSM and random directions",
                      yaxis_title="pieces per unit length", barmode="group", height=320,
                      margin={"t": 40, "b": 10}, legend={"orientation": "h", "y": -0.2})
    return fig


def saliency_masks(labels: list[str], masks: list[dict | None]) -> go.Figure:
    """Per model: the SMT mask (kept features ranked, 1 = most important) above input IG."""
    titles = [f"{label}<br>" + (f"SMT mask: {m['mask_size']} of {m['num_groups']} kept"
                                if m and m["mask_size"] is not None else "SMT mask: none")
              for label, m in zip(labels, masks, strict=True)]
    titles += ["Integrated Gradients"] * len(labels)
    fig = make_subplots(rows=2, cols=len(labels), subplot_titles=titles,
                        horizontal_spacing=0.04, vertical_spacing=0.12)
    for k, result in enumerate(masks):
        if not result:
            continue
        mask = as_image(result["mask"], how="sum")
        fig.add_trace(go.Heatmap(z=mask * as_image(result["input"]), colorscale="Greys",
                                 reversescale=True, showscale=False, zmin=0,
                                 hovertemplate="row %{y}, col %{x}<br>kept input %{z:.3f}"
                                               "<extra></extra>"), row=1, col=k + 1)
        ig = as_image(result["ig"], how="sum")
        bound = float(np.abs(ig).max()) or 1.0
        fig.add_trace(go.Heatmap(z=ig, colorscale="RdBu", zmin=-bound, zmax=bound,
                                 showscale=False,
                                 hovertemplate="row %{y}, col %{x}<br>IG %{z:.4g}"
                                               "<extra></extra>"), row=2, col=k + 1)
    fig.update_yaxes(autorange="reversed", scaleanchor="x", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title="SMT saliency mask (input kept by the mask) next to IG",
                      height=520, margin={"t": 100, "b": 10})
    return fig


def density_summary(labels: list[str], summaries: list[dict]) -> go.Figure:
    """Mean region density (with standard deviation) along FGSM vs random, per model."""
    fig = go.Figure()
    for kind, color, name in (("fgsm", "#d62728", "FGSM"),
                              ("random", "#7f7f7f", "random (mean)")):
        values = [summary[f"{kind}_density"] for summary in summaries]
        fig.add_trace(go.Bar(
            name=name, x=labels, y=[float(np.mean(v)) if v else None for v in values],
            error_y={"type": "data", "array": [float(np.std(v)) if v else 0 for v in values]},
            marker_color=color, customdata=[len(v) for v in values],
            hovertemplate="%{x}<br>mean %{y:.2f} over %{customdata} inputs<extra></extra>"))
    fig.update_layout(title="Mean linear-region density: adversarial vs random directions",
                      yaxis_title="pieces per unit length", barmode="group", height=360,
                      margin={"t": 40, "b": 10}, legend={"orientation": "h", "y": -0.2})
    return fig


def sparsity(labels: list[str], summaries: list[dict]) -> go.Figure:
    """Distribution of SMT mask sparsity (fraction of feature groups kept) per model."""
    fig = go.Figure()
    for k, (label, summary) in enumerate(zip(labels, summaries, strict=True)):
        fig.add_trace(go.Box(y=summary["sparsity"], name=label, boxpoints="all", jitter=0.4,
                             pointpos=0, marker_color=COLORS[k % len(COLORS)],
                             showlegend=False))
    fig.update_layout(title="Saliency sparsity: fraction of the input the SMT mask keeps",
                      yaxis_title="mask size / feature groups", yaxis_tickformat=".0%",
                      height=360, margin={"t": 40, "b": 10})
    return fig


def proven_coverage(labels: list[str], results: list[dict | None]) -> go.Figure:
    """Per model (``patterns_coverage`` results): the share of held-out inputs whose decision
    a proven input property implies, split into proven / refuted / unknown."""
    fig = go.Figure()
    parts = (("proven", "#2ca02c", "proven: covered"),
             ("counterexample", "#d62728", "refuted: a counterexample in the region"),
             ("unknown", "#9aa5b1", "unknown: no answer in time"))
    for status, color, name in parts:
        ys, text = [], []
        for result in results:
            cov = result["proven_coverage"] if result else None
            if cov is None:
                ys.append(None)
                text.append("")
                continue
            n = cov["covered"] if status == "proven" else cov["statuses"].get(status, 0)
            ys.append(n / cov["checked"] if cov["checked"] else 0.0)
            text.append(f"{n}/{cov['checked']}")
        fig.add_trace(go.Bar(name=name, x=labels, y=ys, text=text, marker_color=color,
                             textposition="inside",
                             hovertemplate="%{x}<br>%{text} inputs: %{y:.1%}<extra></extra>"))
    cov = next((r["proven_coverage"] for r in results if r and r["proven_coverage"]), None)
    where = ("" if cov is None else f" at L{cov['layer']}, " + (
        f"eps {cov['eps']:g} balls" if cov["eps"] is not None else "whole input box"))
    fig.update_layout(title=f"Proven coverage of held-out inputs (input properties{where})",
                      yaxis_title="share of held-out inputs", yaxis_tickformat=".0%",
                      yaxis_range=[0, 1.02], barmode="stack", height=360,
                      margin={"t": 40, "b": 10}, legend={"orientation": "h", "y": -0.2})
    return fig


def one_input_figures(labels: list[str],
                      columns: list[dict[str, dict]]) -> list[tuple[str, go.Figure]]:
    """The one-input grid's figures, named for downloads and the report.

    ``columns[k]`` maps analysis name to model ``k``'s result (missing while pending).
    """
    def cells(analysis: str) -> list[dict | None]:
        return [column.get(analysis) for column in columns]

    return [("compare_prediction", class_scores(labels, cells("predict"))),
            ("compare_proof_features", proof_maps(labels, cells("proof_features"))),
            ("compare_largest_eps", largest_eps(labels, cells("proof_eps"))),
            ("compare_saliency", saliency_masks(labels, cells("saliency"))),
            ("compare_region_density", region_density(labels, cells("linear_regions_line")))]


def batch_figures(labels: list[str], summaries: list[dict], method: str,
                  eps: float) -> list[tuple[str, go.Figure]]:
    """The batch's aggregate figures, named for downloads and the report."""
    return [("compare_certified_accuracy", certified_accuracy(labels, summaries, method)),
            ("compare_kept_features", kept_counts(labels, summaries, eps)),
            ("compare_region_density", density_summary(labels, summaries)),
            ("compare_sparsity", sparsity(labels, summaries))]
