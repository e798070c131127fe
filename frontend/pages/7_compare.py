"""Compare: 2 to 6 models side by side on one input or a batch, exported as an HTML report.

Every cell is the ordinary single-analysis job (see frontend/comparison.py); the URL keeps
the models, inputs and parameters, so a copied link reopens the same comparison.
"""

import io
import statistics
from datetime import UTC, datetime
from urllib.parse import urlencode, urlsplit

import numpy as np
import streamlit as st

from frontend import comparison
from frontend import components as ui
from frontend.client import ApiError
from frontend.figures import compare as figures
from frontend.report import ReportContent, build_report

MAX_MODELS = 6
RERENDER_SECONDS = 2.0

st.title("Compare training methods")
st.caption(
    "The same analyses on several models at once: how standard, adversarial (PGD) and "
    "certified (IBP) training change what a network predicts, what its robustness proofs "
    "rest on and how far they reach. Each cell is the job the analysis' own page runs, so the "
    "numbers are the same; finished cells are reused. Once per model, the proven coverage: "
    "the share of held-out gallery inputs whose decision the polytope of their activation "
    "pattern, within their eps-ball, is proven to imply (as on the Pattern rules page)."
)

selection = ui.sidebar()
api = ui.client()
query = dict(st.query_params)
try:
    models = {m["id"]: m for m in api.models()}
    offered = set(ui.analyses())
except ApiError as exc:
    st.error(str(exc))
    st.stop()
anchor = selection.model
if anchor is None:
    st.info("Choose or upload a model in the sidebar: models with its input shape can join.")
    st.stop()


candidates = [mid for mid, m in models.items() if m["input_shape"] == anchor["input_shape"]]
kept = [m for m in st.session_state.get("cmp_models", []) if m in candidates]
if not kept:  # first visit, or the sidebar's model has another input shape
    kept = [m for m in query.get("models", "").split(",") if m in candidates] or [
        m["id"] for m in ui.sibling_models(anchor, list(models.values()))]
st.session_state["cmp_models"] = kept[:MAX_MODELS]
chosen = st.multiselect(
    f"Models (2 to {MAX_MODELS}, input shape "
    f"{'x'.join(map(str, anchor['input_shape']))})", candidates, key="cmp_models",
    format_func=lambda mid: figures.model_label(models[mid]), max_selections=MAX_MODELS,
)

left, middle, right, last = st.columns([1.2, 1, 1, 1])
modes = ["One input", "Batch"]
mode = left.radio("Inputs", modes, horizontal=True, key="cmp_mode",
                  index=1 if query.get("mode") == "batch" else 0)
params = comparison.CompareParams.from_query(query)
eps = middle.number_input("Proof eps (L-inf)", 0.005, 0.3, params.eps, step=0.005,
                          format="%.3f", key="cmp_eps")
tol = right.select_slider("Bisection tolerance", [1e-3, 3e-3, 1e-2, 3e-2],
                          value=min([1e-3, 3e-3, 1e-2, 3e-2], key=lambda t: abs(t - params.tol)),
                          key="cmp_tol")
bound_methods, _ = ui.choices("proof_features", "method")
method = last.selectbox(
    "Proof method", bound_methods, key="cmp_method",
    index=bound_methods.index(params.method) if params.method in bound_methods else 0,
    help=f"Proofs and the certified-accuracy curve. bab (branch and bound) gets "
         f"{params.time_limit_s:g} s per input, and so does each method's eps bisection; a "
         f"proof not found by then counts as not certified.")
params = comparison.CompareParams(eps=float(eps), method=method, eps_max=params.eps_max,
                                  tol=float(tol), time_limit_s=params.time_limit_s)

if mode == "One input":
    input_ids = [selection.input_id] if selection.input_id else []
    st.caption(f"Input: `{selection.input_id}` (choose another in the sidebar)."
               if selection.input_id else "Choose, upload or draw an input in the sidebar.")
else:
    try:
        gallery = [i for i in api.inputs(anchor["id"]) if i["source"] == "gallery"]
    except ApiError as exc:
        st.error(str(exc))
        st.stop()
    if not gallery:
        st.warning("This model has no gallery to run a batch on.")
        st.stop()
    how = st.radio("Batch", ["First N test inputs", "Gallery selection"], horizontal=True,
                   key="cmp_batch", index=1 if query.get("inputs") else 0)
    if how == "First N test inputs":
        most = min(200, len(gallery))
        wanted = query.get("n", "20")
        n = st.number_input("N", 1, most, min(most, int(wanted) if wanted.isdigit() else 20),
                            key="cmp_n")
        input_ids = [i["id"] for i in gallery[: int(n)]]
    else:
        labels = {i["id"]: i["label"] for i in gallery}
        default = [i for i in query.get("inputs", "").split(",") if i in labels]
        input_ids = st.multiselect("Gallery inputs", list(labels), default=default,
                                   format_func=labels.get, key="cmp_inputs")

ready = 2 <= len(chosen) <= MAX_MODELS and bool(input_ids)
if len(chosen) < 2:
    st.info("Choose at least two models.")
todo = comparison.plan(chosen, input_ids, params, offered)
config = (tuple(chosen), tuple(input_ids), params)
clicked = st.button("Compare", type="primary", disabled=not ready,
                    icon=":material/play_arrow:", key="cmp_run")
if clicked or (query.get("run") == "1" and st.session_state.get("cmp_config") is None):
    st.session_state["cmp_config"] = config
    st.session_state["cmp_started"] = datetime.now(UTC)
    if clicked:  # a new run, not the batches of the last one (which may have been cancelled)
        st.session_state.pop("cmp_batches_for", None)

# the URL reopens this comparison
url = {"models": ",".join(chosen), "mode": "batch" if mode == "Batch" else "one",
       **params.query()}
if mode == "Batch":
    url.update({"n": str(len(input_ids))} if st.session_state.get("cmp_batch", "").startswith(
        "First") else {"inputs": ",".join(input_ids)})
if st.session_state.get("cmp_config") == config:
    url["run"] = "1"
for key, value in url.items():
    if st.query_params.get(key) != value:
        st.query_params[key] = value
for key in {"n", "inputs", "run", "job"} - set(url):
    st.query_params.pop(key, None)

if not ready or st.session_state.get("cmp_config") != config:
    st.stop()

labels = [figures.model_label(models[m]) for m in chosen]


def _figures(cells: comparison.Cells) -> list:
    if mode == "One input":
        columns = [cells.results.get((m, input_ids[0]), {}) for m in chosen]
        drawn = figures.one_input_figures(labels, columns)
    else:
        summaries = [s.to_json() for s in comparison.summarize(cells, chosen, input_ids, params)]
        drawn = figures.batch_figures(labels, summaries, params.method, params.eps)
    if "patterns_coverage" in todo.analyses:  # per model, whatever the inputs
        drawn.append(("compare_proven_coverage", figures.proven_coverage(
            labels, [cells.get(m, None, "patterns_coverage") for m in chosen])))
    return drawn


def _coverage_note(result: dict | None) -> tuple[str, str] | None:
    """``(value, note)`` of a model's proven coverage card, None while pending."""
    if not result:
        return None
    cov = result["proven_coverage"]
    if cov is None:
        return "not measured", result.get("reason")
    return (f"{cov['fraction']:.0%}",
            f"{cov['covered']} of {cov['checked']} held-out inputs; rule list "
            f"{result['fidelity']:.0%} faithful")


def _one_input_cards(cells: comparison.Cells) -> list[dict]:
    """Per model, the metric cards shown above the figures: ``{title: (value, note)}``."""
    cards = []
    for mid, label in zip(chosen, labels, strict=True):
        prediction = cells.get(mid, input_ids[0], "predict")
        proof = cells.get(mid, input_ids[0], "proof_features")
        found = cells.get(mid, input_ids[0], "proof_eps")
        mask = cells.get(mid, input_ids[0], "saliency")
        line = cells.get(mid, input_ids[0], "linear_regions_line")
        card: dict = {"model": label}
        if prediction:
            card["Prediction"] = (prediction["predicted_class"],
                                  f"margin {figures.margin(prediction):.2f}")
        if proof:
            card[f"Proof features kept ({params.method}, eps {params.eps:g})"] = (
                "not certified" if not proof["certified"]
                else "proven by splitting" if figures.proven_by_splitting(proof)
                else f"{proof['num_kept']} / {proof['num_features']}",
                "no single-proof features" if figures.proven_by_splitting(proof) else None)
        if found:
            card[f"Largest certified eps ({params.method})"] = (
                f"{found['largest_eps'][params.method]:.3f}", None)
        if mask:
            card["SMT mask"] = (f"{mask['mask_size']} / {mask['num_groups']}", mask["status"])
        if line and line.get("linearity"):
            card["Region density FGSM / random"] = (
                f"{line['linearity']['fgsm_density']:.1f} / "
                f"{line['linearity']['random_density']:.1f}", None)
        coverage = _coverage_note(cells.get(mid, None, "patterns_coverage"))
        if coverage:
            card[f"Proven coverage (eps {params.eps:g} balls)"] = coverage
        cards.append(card)
    return cards


def _one_input_metrics(cards: list[dict]) -> None:
    for col, card in zip(st.columns(len(cards)), cards, strict=True):
        with col:
            st.markdown(f"**{card['model']}**")
            for title, (value, note) in ((k, v) for k, v in card.items() if k != "model"):
                st.metric(title, value, note, delta_color="off")


def _median(values: list) -> float | None:
    return statistics.median(values) if values else None


def _mean(values: list) -> float | None:
    return round(statistics.mean(values), 2) if values else None


def _batch_rows(cells: comparison.Cells) -> list[dict]:
    rows = []
    for label, s in zip(labels, comparison.summarize(cells, chosen, input_ids, params),
                        strict=True):
        at_eps = min(range(len(s.eps_grid)), key=lambda k: abs(s.eps_grid[k] - params.eps))
        rows.append({"model": label, "inputs": s.inputs,
                     "accuracy": None if s.accuracy is None else round(s.accuracy, 3),
                     f"certified accuracy ({params.method}, eps {params.eps:g})":
                         s.certified_accuracy[at_eps],
                     "median features kept": _median(s.kept_counts),
                     "mean density FGSM": _mean(s.fgsm_density),
                     "mean density random": _mean(s.random_density),
                     "median sparsity": _median(s.sparsity),
                     f"proven coverage (eps {params.eps:g})":
                         None if s.proven_coverage is None
                         else round(s.proven_coverage["fraction"], 3),
                     "rule-list fidelity": None if s.rule_list_fidelity is None
                     else round(s.rule_list_fidelity, 3)})
    return rows


def _summary_rows(cells: comparison.Cells) -> list[dict]:
    """The per-model numbers above the figures, as table rows (also the report's)."""
    if mode != "One input":
        return _batch_rows(cells)
    return [{k: (v if k == "model" else v[0] if v[1] is None else f"{v[0]} ({v[1]})")
             for k, v in card.items()} for card in _one_input_cards(cells)]


def _render(cells: comparison.Cells, key: str) -> list:
    if mode == "One input":
        _one_input_metrics(_one_input_cards(cells))
    else:
        st.dataframe(_batch_rows(cells), hide_index=True)
    drawn = _figures(cells)
    for name, fig in drawn:
        ui.show_figure(fig, name, key=f"{key}_{name}")
    return drawn


if mode == "One input" and input_ids[0].startswith("upload:"):
    comparison.share_input(api, anchor["id"], input_ids[0], chosen)

board = st.empty()
state = {"drawn_at": 0.0, "round": 0, "done": -1}


def _on_update(run: comparison.BatchRun, batches: list[dict]) -> None:
    """New results after every poll; the partial figures at most every few seconds."""
    run.update(batches)
    cells = run.cells
    now = datetime.now(UTC).timestamp()
    if cells.done != state["done"] and now - state["drawn_at"] > RERENDER_SECONDS:
        state.update(drawn_at=now, done=cells.done, round=state["round"] + 1)
        with board.container():
            st.caption("Partial results: figures fill in as cells finish.")
            _render(cells, f"partial{state['round']}")


def _follow() -> comparison.Cells:
    """Submit the comparison's batches once per configuration (a rerun, such as the one a
    Cancel click makes, follows the same batches) and wait for them on the page."""
    run = comparison.BatchRun(api, todo)
    if st.session_state.get("cmp_batches_for") == config:
        run.resume(st.session_state["cmp_batches"])
    else:
        run.submit()
        st.session_state.update(cmp_batches=list(run.cells.batch_ids), cmp_batches_for=config)
    batches = ui.follow(
        run.batches, api.batch, key="cmp", cancel=api.cancel_batch,
        text=lambda _: f"{run.cells.done} of {run.cells.total} cells done",
        on_poll=lambda batches: _on_update(run, batches))
    run.update(batches)
    return run.cells


cached = st.session_state.get("cmp_cells")
if cached and cached[0] == config:
    cells = cached[1]
else:
    try:
        cells = _follow()
    except ApiError as exc:
        st.error(str(exc))
        st.stop()
    if not cells.errors:
        st.session_state["cmp_cells"] = (config, cells)
st.caption(f"{cells.done} of {cells.total} cells done")
if cells.errors:
    st.warning(f"{len(cells.errors)} of {cells.total} cells failed; first: "
               + "; ".join(f"{analysis} on {input_id}: {err}"
                           for (_, input_id, analysis), err in list(cells.errors.items())[:3]))
board.empty()  # the partial figures give way to the final ones
drawn = _render(cells, "final")

def _input_images(limit: int = 12) -> list[tuple[str, bytes]]:
    """The compared inputs as PNGs (the first ``limit``), drawn as in the sidebar."""
    if not ui.is_image(anchor):
        return []
    images = []
    for input_id in input_ids[:limit]:
        try:
            values = np.asarray(api.input(anchor["id"], input_id)["values"], dtype=float)
        except ApiError:
            continue
        buf = io.BytesIO()
        ui.to_image(values, ui.value_range(anchor), size=128).save(buf, format="PNG")
        images.append((input_id, buf.getvalue()))
    return images


try:
    backend_version = api.health().get("version")
except ApiError:
    backend_version = None
report = build_report(ReportContent(
    title="ReLU Atlas comparison: " + " vs ".join(labels),
    models=[models[m] for m in chosen], params={**params.query(), "mode": mode},
    inputs=input_ids, figures=drawn, summary=_summary_rows(cells),
    input_images=_input_images(),
    link=urlsplit(st.context.url)._replace(query=urlencode(st.query_params.to_dict())).geturl(),
    jobs=[{"model": figures.model_label(models[cell[0]]), "input": cell[1],
           "analysis": cell[2], "job_id": job_id,
           "status": "failed" if cell in cells.errors else "finished"}
          for cell, job_id in cells.job_ids.items()],
    backend_version=backend_version, started_at=st.session_state.get("cmp_started"),
))
cols = st.columns([1, 3])
cols[0].download_button("HTML report", report, file_name="relu_atlas_comparison.html",
                        mime="text/html", icon=":material/download:", on_click="ignore",
                        key="cmp_report")
cols[1].caption("The report embeds the figures (plotly), the model cards, the parameters, the "
                "jobs and software versions. Each figure's camera button saves a PNG; this "
                "page's link reopens the comparison.")
