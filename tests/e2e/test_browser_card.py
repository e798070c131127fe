"""In the browser: an uploaded model without a card gets one in the sidebar form, and the app
then uses it (the dataset's gallery appears, class names label the inputs).

Oracle: the API's record of the model's card after the form is saved.
"""

from __future__ import annotations

import pytest

from tests.service import mlp_onnx

pytestmark = pytest.mark.browser


def test_an_upload_gets_a_card_in_the_sidebar(ui, atlas, tmp_path) -> None:
    path = mlp_onnx(tmp_path / "nocard.onnx", seed=91)
    with atlas.api() as api:
        model = api.post("/models", files={"file": ("nocard.onnx", path.read_bytes())}).json()
        assert model["card"] == {}
    ui.open("", model=model["id"])
    sidebar = ui.page.get_by_test_id("stSidebar")
    sidebar.get_by_text("No model card").wait_for()
    form = sidebar  # the card form is the sidebar's only one
    form.get_by_label("Dataset").fill("digits")
    form.get_by_label("Class names").fill("zero, one, two, three, four, five, six, seven, "
                                          "eight, nine")
    form.get_by_label("Input high").fill("1")
    form.get_by_role("button", name="Save card").click()
    # the gallery is offered once the saved card comes back (under load, the rerun that
    # saves it may still be running when the page first goes idle)
    sidebar.get_by_text("Gallery").first.wait_for()
    ui.wait_idle()
    with atlas.api() as api:
        card = api.get(f"/models/{model['id']}").json()["card"]
    assert card["dataset"] == "digits" and card["classes"][7] == "seven"
    assert card["input_range"] == [0, 1]
    ui.page.get_by_role("img").first.wait_for()  # the digits gallery is now offered
    ui.screenshot("card_editor")
