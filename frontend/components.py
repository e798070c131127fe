"""Widgets every page shares: the model/input sidebar, running a job, heatmaps, downloads.

Pages call :func:`sidebar` for the current :class:`Selection` and :func:`run_job` to run an
analysis on it. The model, input and jobs live in the URL's query parameters, so a copied link
reopens the same results.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import Image, ImageDraw
from streamlit.components.v1 import html as components_html
from streamlit.runtime.pages_manager import PagesManager

from frontend.client import ACTIVE, ApiClient, ApiError

_SELECTION = "_atlas_selection"
_PENDING_INPUT = "_atlas_pending_input"
_SIDEBAR_ERROR = "_atlas_sidebar_error"
_PRIMARY_JOB = "_atlas_primary_job"
_JOB_PARAM = "job"
_URL_WRITTEN = "_atlas_url_"  # + key: the value this session last put in the URL
GALLERY_THUMBNAILS = 12
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Selection:
    """The model (its ``ModelInfo`` dict) and input id the user is looking at."""

    model: dict | None
    input_id: str | None

    @property
    def model_id(self) -> str | None:
        return self.model["id"] if self.model else None


@st.cache_resource
def client() -> ApiClient:
    """One HTTP client per frontend process (base URL from ``ATLAS_API_URL``)."""
    return ApiClient()


@st.cache_data(max_entries=1024, show_spinner=False)
def input_values(model_id: str, input_id: str) -> np.ndarray:
    """An input's values in the model's input shape (inputs never change under one id)."""
    info = client().input(model_id, input_id)
    return np.asarray(info["values"], dtype=np.float32).reshape(info["shape"])


@st.cache_data(max_entries=64, show_spinner=False)
def job_result(job_id: str) -> Any:
    """A finished job's result: it never changes, so reruns, other tabs and shared links
    reuse it instead of fetching (and decoding) it again."""
    return client().result(job_id)


@st.cache_data(ttl=60, show_spinner=False)
def analyses() -> dict[str, dict]:
    """The backend's analyses by name."""
    return {a["name"]: a for a in client().analyses()}


def choices(analysis: str, field: str) -> tuple[list, int]:
    """The options the API accepts for ``params.field`` of ``analysis`` (from the
    ``params_schema`` it serves) and the index of its default, for a selectbox."""
    schema = analyses()[analysis]["params_schema"]
    prop = schema["properties"][field]
    found = [prop, *prop.get("anyOf", []), *([prop["items"]] if "items" in prop else [])]
    for item in list(found):
        if "$ref" in item:
            found.append(schema["$defs"][item["$ref"].rsplit("/", 1)[-1]])
    options = next(item["enum"] for item in found if "enum" in item)
    default = prop.get("default")
    return options, options.index(default) if default in options else 0


def default(analysis: str, field: str) -> object:
    """The default the API gives ``params.field`` of ``analysis`` (from its params_schema)."""
    return analyses()[analysis]["params_schema"]["properties"][field].get("default")


# -- sidebar ----------------------------------------------------------------------------------


def _leave_legacy_pages_mode() -> None:
    """Make Streamlit use app.py's ``st.navigation`` even on a first visit to a page URL.

    Streamlit treats a ``pages/`` folder beside the entry script as an old-style multipage
    app until ``st.navigation`` has run once in the server; if the first visitor after a start
    opens a page link (``/saliency?job=...``), it would run that page alone and keep the
    old-style menu for everyone. Clearing the flag and rerunning goes through app.py instead.
    """
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def begin_run() -> None:
    """Called by app.py at the top of every run so :func:`sidebar` renders once per run."""
    _leave_legacy_pages_mode()
    st.session_state.pop(_SELECTION, None)
    st.session_state.pop(_PRIMARY_JOB, None)


def sidebar() -> Selection:
    """Render the model and input chooser once per run and return the selection.

    Pages may call it freely: later calls in the same run return the first call's result.
    """
    _leave_legacy_pages_mode()
    if _SELECTION in st.session_state:
        return st.session_state[_SELECTION]
    with st.sidebar:
        selection = _render_sidebar()
    st.session_state[_SELECTION] = selection
    return selection


def _render_sidebar() -> Selection:
    api = client()
    if error := st.session_state.pop(_SIDEBAR_ERROR, None):
        st.error(error)
    try:
        models = {m["id"]: m for m in api.models()}
    except ApiError as exc:
        st.error(str(exc))
        return Selection(None, None)
    _adopt_shared_job(api)

    st.subheader("Model")
    _choose_initial("model", list(models))
    model_id = st.selectbox(
        "Model", list(models), key="model", label_visibility="collapsed",
        format_func=lambda mid: models[mid]["name"] if mid in models else mid,
        placeholder="Upload a model below",
    )
    _to_url("model", model_id)
    with st.expander("Upload a model", expanded=not models):
        st.file_uploader(
            "ONNX or torch.export (.pt2)", type=["onnx", "pt2"],
            key="model_upload", on_change=_upload_model,
            help="TorchScript runs code when it loads, so it is not accepted: convert it on "
                 "your machine with `relu-atlas convert model.pt --input-shape 1,28,28`",
        )
    model = models.get(model_id)
    if model is None:
        return Selection(None, None)
    _model_card(model)
    if model.get("source") == "upload":
        _card_editor(api, model)

    st.subheader("Input")
    input_id = _input_chooser(api, model)
    return Selection(model, input_id)


def _adopt_shared_job(api: ApiClient) -> None:
    """A link with jobs but no model (``?job=``) selects the first job's model and input."""
    if "model" in st.query_params or st.session_state.get("model"):
        return
    params = sorted(k for k in st.query_params if k.partition(".")[0] == _JOB_PARAM)
    if not params:
        return
    job_id = st.query_params[params[0]]  # plain ``job`` sorts first
    try:
        job = api.job(job_id)
    except ApiError:
        return
    st.session_state["model"] = job["model_id"]
    if job.get("input_id"):
        st.session_state[_PENDING_INPUT] = job["input_id"]


def _choose_initial(key: str, options: list[str]) -> None:
    """Before the widget ``key`` renders: take the URL's value if it changed from outside
    (a link such as the Jobs page's "Open", or a shared address), else keep the session's
    choice, else the URL's, else the first option."""
    url = st.query_params.get(key)
    if url in options and url != st.session_state.get(_URL_WRITTEN + key):
        st.session_state[_URL_WRITTEN + key] = url
        st.session_state[key] = url
        return
    for candidate in (st.session_state.get(key), url):
        if candidate in options:
            st.session_state[key] = candidate
            return
    st.session_state.pop(key, None)
    if options:
        st.session_state[key] = options[0]


def _to_url(key: str, value: str | None) -> None:
    """Mirror a choice into the URL so a copied link reopens it."""
    st.session_state[_URL_WRITTEN + key] = value
    if value is None:
        st.query_params.pop(key, None)
    elif st.query_params.get(key) != value:
        st.query_params[key] = value


def _upload_model() -> None:
    upload = st.session_state.get("model_upload")
    if upload is None:
        return
    try:
        info = client().upload_model(upload.name, upload.getvalue())
    except ApiError as exc:
        st.session_state[_SIDEBAR_ERROR] = f"Upload of {upload.name} failed: {exc}"
        return
    st.session_state["model"] = info["id"]
    st.session_state.pop("input", None)


def _model_card(model: dict) -> None:
    card = model.get("card") or {}
    shape = "x".join(str(s) for s in model.get("input_shape", []))
    st.caption(f"{model.get('format', '?')} · input {shape} · {model.get('num_outputs')} outputs")
    if not card:
        st.caption("No model card: training details unknown.")
        return
    if not {"training", "clean_accuracy"} & card.keys():  # a user's card: data, not training
        st.caption(f"Dataset: {card.get('dataset') or '–'} · inputs in "
                   f"{list(card.get('input_range') or [0, 1])}")
        return
    train_eps = card.get("train_eps")
    st.markdown(f"**Training:** {card.get('training', '?')}"
                + (f" (eps {train_eps:g})" if train_eps else ""))
    eps = card.get("eps")
    method = card.get("certified_method") or ("IBP" if "IBP" in card.get("evaluation", "")
                                              else "bounds")
    st.caption("Accuracy on held-out inputs" + (
        f"; under PGD attack and certified by {method}, both at eps {eps:g}" if eps else ""))
    accuracies = [("clean", "clean_accuracy"), ("PGD", "pgd_accuracy"),
                  (f"{method} certified", "certified_accuracy")]
    cols = st.columns(len(accuracies))
    for col, (label, field) in zip(cols, accuracies, strict=True):
        value = card.get(field)
        col.metric(label, "–" if value is None else f"{100 * value:.0f}%")


def _card_editor(api: ApiClient, model: dict) -> None:
    """An uploaded model's card: its dataset (for the gallery), input range (how images are
    scaled) and class names, which every analysis then uses."""
    card = dict(model.get("card") or {})
    with st.expander("Edit model card", expanded=not card), \
            st.form(key=f"card_{model['id']}", border=False):
        name = st.text_input("Name", value=model.get("name", ""), max_chars=200)
        dataset = st.text_input("Dataset (e.g. digits, mnist, cifar10)",
                                value=card.get("dataset", ""))
        lo, hi = value_range(model)
        cols = st.columns(2)
        low = cols[0].number_input("Input low", value=lo, format="%g")
        high = cols[1].number_input("Input high", value=hi, format="%g")
        classes = st.text_input("Class names, comma-separated",
                                value=", ".join(str(c) for c in card.get("classes") or []))
        if not st.form_submit_button("Save card", icon=":material/save:"):
            return
    names = [c.strip() for c in classes.split(",") if c.strip()]
    card.update(name=name.strip() or model.get("name"), input_range=[low, high])
    for key, value in (("dataset", dataset.strip()), ("classes", names)):
        if value:
            card[key] = value
        else:
            card.pop(key, None)
    try:
        api.set_card(model["id"], card)
    except ApiError as exc:
        st.error(str(exc))
        return
    st.rerun()


def sibling_models(model: dict, models: list[dict] | None = None) -> list[dict]:
    """The model and those trained on its dataset with its architecture (other training
    methods), in the service's order. Only a card that names both makes siblings: uploads
    without one have none (they share no inputs and may differ in shape)."""
    card = model.get("card") or {}
    if not (card.get("dataset") and card.get("architecture")):
        return [model]
    models = client().models() if models is None else models
    return [m for m in models
            if (m.get("card") or {}).get("dataset") == card["dataset"]
            and (m.get("card") or {}).get("architecture") == card["architecture"]
            and m.get("input_shape") == model.get("input_shape")] or [model]


def _input_chooser(api: ApiClient, model: dict) -> str | None:
    mid = model["id"]
    try:
        inputs = api.inputs(mid)
    except ApiError as exc:
        st.error(str(exc))
        return None
    by_id = {i["id"]: i for i in inputs}
    if (pending := st.session_state.pop(_PENDING_INPUT, None)) in by_id:
        st.session_state["input"] = pending
    _choose_initial("input", list(by_id))
    if not by_id:  # no empty selectbox: it would keep showing the last model's input
        st.caption("No input yet for this model: upload or draw one below.")
        input_id = None
    else:
        input_id = st.selectbox(
            "Input", list(by_id), key="input", label_visibility="collapsed",
            format_func=lambda i: _input_name(by_id[i]) if i in by_id else i,
            placeholder="Upload or draw an input below",
        )
    _to_url("input", input_id)
    if input_id is not None and is_image(model):
        _show_input_preview(mid, input_id, model)

    gallery = [i for i in inputs if i.get("source") == "gallery"]
    if input_id is not None and by_id[input_id].get("source") == "upload":
        _check_upload(mid, input_id, model, gallery[0]["id"] if gallery else None)
    tabs = st.tabs(["Gallery", "Upload", "Draw"])
    with tabs[0]:
        if gallery and is_image(model):
            _gallery_thumbnails(mid, gallery[:GALLERY_THUMBNAILS], model)
        elif not gallery:
            st.caption("This model has no gallery: upload or draw an input.")
    with tabs[1]:
        st.file_uploader(
            "Image, .npy or .csv", type=["png", "jpg", "jpeg", "bmp", "npy", "csv"],
            key="input_upload", on_change=_upload_input, args=(mid,),
        )
    with tabs[2]:
        _drawing_canvas(mid, model)
    return input_id


def _input_name(info: dict) -> str:
    """``gallery #17: 3`` or ``upload drawing.npy``: the backend's label with its source."""
    return f"{info.get('source', '')} {info.get('label', info['id'])}".strip()


def is_image(model: dict) -> bool:
    shape = model.get("input_shape") or []
    return len(shape) == 3 and shape[0] in (1, 3)


def value_range(model: dict) -> tuple[float, float]:
    lo, hi = (model.get("card") or {}).get("input_range") or (0.0, 1.0)
    return float(lo), float(hi)


def favicon() -> Image.Image:
    """The app's icon, drawn here (a ReLU's graph on the app's red), so no page fetches one."""
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((0, 0, 31, 31), radius=7, fill=(217, 54, 62, 255))
    draw.line([(5, 22), (15, 22), (27, 8)], fill=(255, 255, 255, 255), width=4)
    return image


def to_image(values: np.ndarray, value_range: tuple[float, float], size: int = 96) -> Image.Image:
    """A ``[C, H, W]`` input as a crisp, upscaled picture (nearest neighbour, no blur)."""
    lo, hi = value_range
    scaled = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1)
    pixels = (255 * scaled).astype(np.uint8)
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    scale = max(1, size // max(pixels.shape[1:]))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def _show_input_preview(model_id: str, input_id: str, model: dict) -> None:
    try:
        values = input_values(model_id, input_id)
    except ApiError as exc:
        st.error(str(exc))
        return
    st.image(to_image(values, value_range(model), size=128), caption="Selected input")


def _check_upload(model_id: str, input_id: str, model: dict, gallery_id: str | None) -> None:
    """Warn when an uploaded input cannot be what the model expects, and offer the fix: values
    far above the model's range (a 0..255 file for a [0, 1] model) or dark strokes on a light
    background for a model whose gallery is light on dark (the two look alike to a person
    and give confident nonsense)."""
    try:
        values = input_values(model_id, input_id)
        reference = input_values(model_id, gallery_id) if gallery_id else None
    except ApiError:
        return
    lo, hi = value_range(model)
    if values.max() > hi + 0.5 * (hi - lo) and values.min() >= 0 and values.max() <= 255:
        st.warning(f"This input's values reach {values.max():g}, but the model takes inputs "
                   f"in [{lo:g}, {hi:g}]: it looks like a 0..255 file.")
        if st.button(f"Scale 0..255 to [{lo:g}, {hi:g}]", key="fix_scale", width="stretch"):
            _upload_fixed(model_id, lo + (hi - lo) * values / 255.0, "scaled")
    elif reference is not None and is_image(model) and values.shape[0] == 1:
        light = lo + 0.5 * (hi - lo)
        if _border_mean(reference) < light <= _border_mean(values):
            st.warning("This image has dark strokes on a light background; the model was "
                       "trained on light strokes on a dark background (like its gallery), "
                       "so its prediction on it means little.")
            if st.button("Invert the image", key="fix_invert", width="stretch"):
                _upload_fixed(model_id, lo + hi - values, "inverted")


def _border_mean(values: np.ndarray) -> float:
    """Mean of an image's outermost pixels: its background."""
    img = values.reshape(-1, *values.shape[-2:])
    return float(np.concatenate([img[:, 0].ravel(), img[:, -1].ravel(),
                                 img[:, :, 0].ravel(), img[:, :, -1].ravel()]).mean())


def _upload_fixed(model_id: str, values: np.ndarray, what: str) -> None:
    """Upload the corrected input and select it."""
    buffer = io.BytesIO()
    np.save(buffer, values.astype(np.float32))
    try:
        info = client().upload_input(model_id, f"{what}.npy", buffer.getvalue())
    except ApiError as exc:
        st.error(f"Upload of the {what} input failed: {exc}")
        return
    st.session_state[_PENDING_INPUT] = info["id"]
    st.rerun()


def _gallery_thumbnails(model_id: str, gallery: list[dict], model: dict) -> None:
    cols = st.columns(4)
    for n, item in enumerate(gallery):
        with cols[n % 4]:
            st.image(to_image(input_values(model_id, item["id"]), value_range(model), size=48))
            st.button(
                str(item.get("target", n)), key=f"pick_{item['id']}", on_click=_pick_input,
                args=(item["id"],), help=f"Use {item['label']}", width="stretch",
            )


def _pick_input(input_id: str) -> None:
    st.session_state["input"] = input_id


def _upload_input(model_id: str) -> None:
    upload = st.session_state.get("input_upload")
    if upload is None:
        return
    try:
        info = client().upload_input(model_id, upload.name, upload.getvalue())
    except ApiError as exc:
        st.session_state[_SIDEBAR_ERROR] = f"Upload of {upload.name} failed: {exc}"
        return
    st.session_state[_PENDING_INPUT] = info["id"]


def _drawing_canvas(model_id: str, model: dict) -> None:
    """Draw a digit (white on black); it is downsampled to the input shape and uploaded."""
    shape = model.get("input_shape") or []
    if not (is_image(model) and shape[0] == 1 and max(shape[1:]) <= 64):
        st.caption("Drawing is offered for small single-channel (digit-like) inputs.")
        return
    from streamlit_drawable_canvas import st_canvas

    # The canvas' toolbar waits, invisible, over the canvas' top strip until hovered, and
    # strokes there drew nothing: keep it above the canvas, where it goes when shown.
    components_html(_TOOLBAR_ABOVE, height=0)
    canvas = st_canvas(
        stroke_width=16, stroke_color="#ffffff", background_color="#000000",
        height=168, width=168, drawing_mode="freedraw", return_image_data=True,
        key=f"canvas_{model_id}",
    )
    if st.button("Use drawing", key="use_drawing", width="stretch"):
        strokes = canvas.image_data if canvas is not None else None
        if strokes is None or not strokes[..., 3].any():
            st.warning("Draw something first.")
            return
        values = drawing_to_input(strokes, tuple(shape), value_range(model))
        buffer = io.BytesIO()
        np.save(buffer, values)
        try:
            info = client().upload_input(model_id, "drawing.npy", buffer.getvalue())
        except ApiError as exc:
            st.error(f"Upload of the drawing failed: {exc}")
            return
        st.session_state[_PENDING_INPUT] = info["id"]
        st.rerun()


# The canvas lives in a shadow root, out of reach of the page's CSS: a script from a
# same-origin frame adds the rule there (and again when the canvas is redrawn).
_TOOLBAR_ABOVE = """<script>
const rule = ".dc-toolbar{top:-2.65rem !important}";
function place() {
  for (const el of window.parent.document.querySelectorAll("*")) {
    const root = el.shadowRoot;
    if (root && root.querySelector(".dc-toolbar") && !root.querySelector("style[data-atlas]")) {
      const style = document.createElement("style");
      style.dataset.atlas = "1";
      style.textContent = rule;
      root.appendChild(style);
    }
  }
}
place();
setInterval(place, 500);
</script>"""


def drawing_to_input(
    rgba: np.ndarray, shape: tuple[int, ...], value_range: tuple[float, float]
) -> np.ndarray:
    """Canvas RGBA pixels to a ``shape`` array, prepared the way digit datasets are.

    The ink's bounding box is cut out, padded to a square (aspect kept) and box-averaged
    into the model's grid: filling it for small grids (scikit-learn's 8x8 digits fill their
    box), or into a 20/28 box centred by the ink's centre of mass for larger ones (MNIST).
    The brightest cell is stretched to full ink, as in the scanned digits the models saw.
    """
    ink = rgba[..., :3].max(axis=-1).astype(np.float32) * (rgba[..., 3] / 255.0)
    height, width = shape[1], shape[2]
    rows, cols = np.nonzero(ink > 0.1 * max(float(ink.max()), 1.0))
    if rows.size == 0:
        return np.full(shape, value_range[0], dtype=np.float32)
    crop = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    side = max(crop.shape)
    square = np.zeros((side, side), np.float32)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    box = (height, width) if max(height, width) <= 16 else (round(height * 20 / 28),
                                                             round(width * 20 / 28))
    small = np.asarray(Image.fromarray(square).resize((box[1], box[0]), Image.BOX), np.float32)
    cells = np.zeros((height, width), np.float32)
    if box == (height, width):
        cells[:] = small
    else:  # centre of mass at the centre of the grid
        mass = small.sum() or 1.0
        cy = (small.sum(1) * np.arange(box[0])).sum() / mass
        cx = (small.sum(0) * np.arange(box[1])).sum() / mass
        y0 = int(np.clip(round(height / 2 - cy - 0.5), 0, height - box[0]))
        x0 = int(np.clip(round(width / 2 - cx - 0.5), 0, width - box[1]))
        cells[y0:y0 + box[0], x0:x0 + box[1]] = small
    cells /= max(float(cells.max()), 1e-6)
    lo, hi = value_range
    return (lo + (hi - lo) * cells).reshape(shape).astype(np.float32)


# -- jobs -------------------------------------------------------------------------------------


def run_job(
    analysis: str, params: dict | None = None, key: str | None = None
) -> dict | None:
    """Run ``analysis`` on the sidebar's selection; return its result once finished.

    Shows a Run button, then a live progress bar with a Cancel button while the job runs,
    and the error if it failed. Each widget keeps its job id in the URL, so a shared link
    reopens every result on the page: the page's first widget in ``?job=`` (the form older
    links and the Jobs page use), the others in ``?job.<key>=``.
    """
    key = key or analysis
    url_param = _job_param(key)
    api = client()
    selection = sidebar()
    if selection.model is None:
        st.info("Choose or upload a model in the sidebar.")
        return None
    try:
        needs_input = analyses().get(analysis, {}).get("needs_input", True)
        input_id = selection.input_id if needs_input else None
        if needs_input and input_id is None:
            st.info("Choose, upload or draw an input in the sidebar.")
            return None
        state_key = f"_atlas_job_{key}"
        job = _current_job(api, state_key, url_param, analysis, selection.model_id, input_id)
        if st.button("Run", key=f"run_{key}", type="primary", icon=":material/play_arrow:"):
            job = api.submit(analysis, selection.model_id, input_id, params or {})
        if job is None:
            return None
        st.session_state[state_key] = job["id"]
        if st.query_params.get(url_param) != job["id"]:
            st.query_params[url_param] = job["id"]
        job = follow([job], api.job, key=key, text=lambda jobs: _progress_text(jobs[0]),
                     cancel=api.cancel)[0]
        return _outcome(job, key)
    except ApiError as exc:
        st.error(str(exc))
        return None


def shown_job(key: str) -> str | None:
    """The id of the job the widget ``run_job(..., key=key)`` showed in this session."""
    return st.session_state.get(f"_atlas_job_{key}")


def _job_param(key: str) -> str:
    """The URL parameter that holds the job of widget ``key`` in this page run.

    The first widget a run meets is the page's primary one and answers to plain ``job``.
    """
    primary = st.session_state.setdefault(_PRIMARY_JOB, key)
    return _JOB_PARAM if key == primary else f"{_JOB_PARAM}.{key}"


def _current_job(
    api: ApiClient, state_key: str, url_param: str, analysis: str, model_id: str,
    input_id: str | None,
) -> dict | None:
    """The job this widget showed last, or its job in the URL, if it fits the selection."""
    for job_id in (st.session_state.get(state_key), st.query_params.get(url_param)):
        if not job_id:
            continue
        try:
            job = api.job(job_id)
        except ApiError:
            continue
        if (job["analysis"], job["model_id"], job.get("input_id")) == (
            analysis, model_id, input_id
        ):
            return job
    st.session_state.pop(state_key, None)
    st.query_params.pop(url_param, None)
    return None


def follow(items: list[dict], fetch: Callable[[str], dict], *, key: str,
           text: Callable[[list[dict]], str],
           cancel: Callable[[str], dict] | None = None,
           on_poll: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Poll jobs or batches (both have ``id``, ``status`` and ``progress``) until none is
    queued or running, with one progress bar (their mean progress) and a Cancel button;
    returns their last records. ``on_poll`` sees the records after every poll (partial
    results). Every page waits on the service through this."""
    if on_poll is not None:
        on_poll(items)
    if not any(i["status"] in ACTIVE for i in items):
        return items
    bar = st.progress(0.0)
    cancel_slot = st.empty()
    if cancel is not None and cancel_slot.button("Cancel", key=f"cancel_{key}",
                                                 icon=":material/stop:"):
        items = [cancel(i["id"]) if i["status"] in ACTIVE else i for i in items]
    while any(i["status"] in ACTIVE for i in items):
        bar.progress(float(np.mean([i.get("progress") or 0.0 for i in items])),
                     text=text(items))
        time.sleep(POLL_SECONDS)
        items = [fetch(i["id"]) if i["status"] in ACTIVE else i for i in items]
        if on_poll is not None:
            on_poll(items)
    bar.empty()
    cancel_slot.empty()
    return items


def _progress_text(job: dict) -> str:
    message = job.get("message") or job["status"]
    return f"{job['analysis']} · {message} ({100 * float(job.get('progress') or 0):.0f}%)"


def _outcome(job: dict, key: str) -> dict | None:
    status = job["status"]
    if status == "failed":
        st.error(f"The analysis failed: {job.get('error') or job.get('message') or 'no reason'}")
        return None
    if status == "cancelled":
        st.warning("The job was cancelled. Press Run to start it again.")
        return None
    result = job_result(job["id"])
    cols = st.columns([3, 1])
    cols[0].caption(
        f"Job `{job['id'][:8]}` {status}" + (" (cached result)" if job.get("cached") else "")
        + " · copy this page's link to share the result."
    )
    with cols[1]:
        download_json(result, f"{job['analysis']}_{job['id'][:8]}.json", key=f"json_{key}")
    return result


# -- figures and downloads --------------------------------------------------------------------


def heatmap(
    values: np.ndarray,
    title: str = "",
    *,
    colorscale: str = "RdBu",
    symmetric: bool = True,
    colorbar_title: str = "",
    hover: str = "value",
    height: int = 360,
) -> go.Figure:
    """A 2-D array as an image-like heatmap (row 0 on top, square pixels).

    ``symmetric`` centres the colour scale on 0, as signed attributions need.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"heatmap takes a 2-D array, got shape {values.shape}")
    bound = float(np.nanmax(np.abs(values))) if symmetric and values.size else None
    fig = go.Figure(go.Heatmap(
        z=values, colorscale=colorscale,
        zmin=-bound if bound else None, zmax=bound if bound else None,
        colorbar={"title": {"text": colorbar_title}},
        hovertemplate=f"row %{{y}}, col %{{x}}<br>{hover} %{{z:.4g}}<extra></extra>",
    ))
    rows, cols = values.shape
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain",
                     dtick=1 if rows <= 16 else None, title="row")
    fig.update_xaxes(constrain="domain", dtick=1 if cols <= 16 else None, title="column")
    fig.update_layout(title=title, height=height,
                      margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10})
    return fig


def show_figure(fig: go.Figure, name: str, key: str | None = None) -> None:
    """Render a plotly figure; its toolbar's camera button downloads it as ``<name>.png``."""
    st.plotly_chart(
        fig, key=key or f"fig_{name}",
        config={"displaylogo": False,
                "toImageButtonOptions": {"format": "png", "filename": name, "scale": 2}},
    )


def download_json(result: Any, file_name: str, key: str | None = None) -> None:
    """A button that downloads ``result`` as pretty-printed JSON (written on click only, so
    a large result costs nothing on reruns)."""
    st.download_button(
        "Result JSON", lambda: json.dumps(result, indent=2), file_name=file_name,
        mime="application/json", key=key, icon=":material/download:", on_click="ignore",
    )
