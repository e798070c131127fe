"""In the browser: inputs that cannot be what the model expects are flagged and fixed, the
Input box follows a model switch, and a page that needs a gallery says so before running.

Oracles: the gallery's own values (served by the API) and plain arithmetic on them: the
fixed input the app uploads is the 0..255 file divided by 255, or the black-on-white picture
inverted back to the gallery image (up to the PNG's 1/255 quantisation).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import sample_model
from tests.e2e.test_browser_predict import upload_in_sidebar
from tests.service import mlp_onnx

MODEL = "digits_fc_pgd"
GALLERY = "gallery:digits:3"

pytestmark = pytest.mark.browser


def _gallery(atlas, model_id: str) -> np.ndarray:
    with atlas.api() as api:
        info = api.get(f"/models/{model_id}/inputs/{GALLERY}").json()
    return np.asarray(info["values"], dtype=np.float64).reshape(info["shape"])


def _selected(ui, atlas, model_id: str) -> np.ndarray:
    with atlas.api() as api:
        info = api.get(f"/models/{model_id}/inputs/{ui.query_params()['input']}").json()
    return np.asarray(info["values"], dtype=np.float64).reshape(info["shape"])


def _new_input_after(ui, action) -> None:
    """Run ``action`` and wait until the page has selected another input."""
    before = ui.query_params().get("input")
    action()
    ui.page.wait_for_function(
        f"() => new URLSearchParams(location.search).get('input') !== '{before}'")
    ui.wait_idle()


def _upload(ui, name: str, data: bytes) -> None:
    ui.page.get_by_role("tab", name="Upload").click()
    _new_input_after(ui, lambda: upload_in_sidebar(ui.page, ".npy", name, data))


def _fix_flagged(ui, warning: str, button: str, shot: str) -> None:
    """The sidebar flags the uploaded input; its fix button uploads the corrected one."""
    sidebar = ui.page.get_by_test_id("stSidebar")
    sidebar.get_by_text(warning).wait_for()
    ui.screenshot(shot)
    _new_input_after(ui, sidebar.get_by_role("button", name=button).click)


def test_0_255_csv_is_flagged_and_scaled(ui, atlas) -> None:
    _, model_id = ui.open_sample("", MODEL, input=GALLERY)  # Predict
    x = _gallery(atlas, model_id)
    csv = ",".join(f"{v:g}" for v in np.round(255 * x.ravel())).encode()
    _upload(ui, "digit_255.csv", csv)
    _fix_flagged(ui, "looks like a 0..255 file", "Scale 0..255 to [0, 1]",
                 "input_0_255_warning")
    assert np.allclose(_selected(ui, atlas, model_id), np.round(255 * x) / 255, atol=1e-6)
    sidebar = ui.page.get_by_test_id("stSidebar")
    assert sidebar.get_by_text("looks like a 0..255 file").count() == 0


def test_black_on_white_image_is_flagged_and_inverted(ui, atlas) -> None:
    _, model_id = ui.open_sample("", MODEL, input=GALLERY)  # Predict
    x = _gallery(atlas, model_id)
    buffer = io.BytesIO()
    Image.fromarray(np.round(255 * (1 - x[0])).astype(np.uint8)).save(buffer, format="PNG")
    _upload(ui, "black_on_white.png", buffer.getvalue())
    _fix_flagged(ui, "dark strokes on a light background", "Invert the image",
                 "input_black_on_white_warning")
    assert np.abs(_selected(ui, atlas, model_id) - x).max() <= 0.5 / 255 + 1e-6


def test_model_switch_and_missing_gallery(ui, atlas, tmp_path) -> None:
    """A model without a gallery: after switching to it the Input box does not keep the
    previous model's gallery input, and Pattern rules refuse to mine before any run."""
    sample_model(MODEL)
    path = mlp_onnx(tmp_path / "nogallery.onnx", seed=17, input_shape=(1, 6, 6))
    with atlas.api() as api:
        other = api.post("/models", files={"file": ("nogallery.onnx", path.read_bytes())}).json()
    ui.open_sample("patterns", MODEL, input=GALLERY)
    sidebar = ui.page.get_by_test_id("stSidebar")
    box = sidebar.get_by_test_id("stSelectbox")
    box.first.click()
    ui.page.get_by_role("option", name=other["name"]).click()
    ui.page.wait_for_function(f"() => location.search.includes('model={other['id']}')")
    ui.wait_idle()
    sidebar.get_by_text("No input yet for this model").wait_for()
    ui.wait_idle()
    assert sidebar.get_by_text(re.compile(r"^gallery #")).count() == 0
    assert box.count() == 1  # the model chooser only: no stale input box
    assert "input" not in ui.query_params()
    ui.page.get_by_text("This model has no gallery to mine rules from").wait_for()
    assert ui.page.locator(".st-key-run_patterns").count() == 0
    ui.screenshot("patterns_no_gallery")
    with atlas.api() as api:  # other tests open the service's first model
        api.delete(f"/models/{other['id']}").raise_for_status()
