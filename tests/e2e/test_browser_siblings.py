"""In the browser: an uploaded model without a card has no "other training methods" to
compare with (before, every card-less upload counted as one, and Compare sent this model's
uploaded input to another model: a raw HTTP 404).

Oracle: the API's list of models (two card-less uploads of different shapes exist).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from tests.service import mlp_onnx

pytestmark = pytest.mark.browser


def test_card_less_uploads_are_not_compared_with_each_other(ui, atlas, tmp_path) -> None:
    x = io.BytesIO()
    np.save(x, np.full((1, 8, 8), 0.4, np.float32))
    with atlas.api() as api:
        first = api.post("/models", files={"file": ("a.onnx", mlp_onnx(
            tmp_path / "a.onnx", seed=92).read_bytes())}).json()
        api.post("/models", files={"file": ("b.onnx", mlp_onnx(
            tmp_path / "b.onnx", seed=93, hidden=(7,), classes=4).read_bytes())})
        inp = api.post(f"/models/{first['id']}/inputs", files={"file": ("x.npy", x.getvalue())}
                       ).json()["id"]
        uploads = [m for m in api.get("/models").json() if m["source"] == "upload"]
    assert len(uploads) >= 2 and all(not m["card"] for m in uploads[:2])
    ui.open("proof_features", model=first["id"], input=inp)
    ui.click_run("proof_features")
    ui.page.get_by_text(re.compile(r"^(Certified|Not certified): class")).wait_for(
        timeout=120_000)
    ui.wait_idle()
    assert ui.page.locator(".st-key-proof_siblings").count() == 0
    assert ui.page.get_by_text("HTTP 404").count() == 0
    ui.screenshot("proof_features_upload")
