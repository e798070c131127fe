"""Drawings are prepared the way the digit datasets were (frontend.components.drawing_to_input):
cut to the ink's box, kept in aspect, filled into the grid (8x8 digits) or centred by mass
(28x28 MNIST). Oracles: the geometry of the result, and the sample digit models' decisions
on a drawn 7 (they were never shown a drawing)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageDraw

from frontend.components import drawing_to_input
from tests.conftest import SAMPLE_MODELS


def _canvas(strokes: list[list[tuple[int, int]]], width: int = 14) -> np.ndarray:
    """A 168x168 RGBA canvas as the browser sends it: white strokes, transparent elsewhere."""
    image = Image.new("RGBA", (168, 168), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        draw.line(stroke, fill=(255, 255, 255, 255), width=width, joint="curve")
    return np.asarray(image)


SEVEN = [[(40, 12), (130, 12), (95, 90), (70, 160)]]  # a 7 drawn up to the canvas' top edge


def test_a_small_drawing_in_a_corner_fills_the_digits_grid() -> None:
    small = [[(x // 4, y // 4) for x, y in SEVEN[0]]]  # the same 7, a quarter size, top left
    x = drawing_to_input(_canvas(small, width=4), (1, 8, 8), (0.0, 1.0))[0]
    rows, cols = np.nonzero(x > 0.2)
    assert rows.min() == 0 and rows.max() == 7  # tall: fills the grid's height
    assert x[0].max() == pytest.approx(1.0) or x[0].max() > 0.5  # the top bar is on row 0
    assert x.max() == pytest.approx(1.0)


def test_mnist_sized_grids_get_a_20_pixel_box_centred_by_mass() -> None:
    x = drawing_to_input(_canvas(SEVEN), (1, 28, 28), (0.0, 1.0))[0]
    rows, cols = np.nonzero(x > 0)
    assert rows.max() - rows.min() + 1 <= 20 and cols.max() - cols.min() + 1 <= 20
    mass = x.sum()
    cy = (x.sum(1) * np.arange(28)).sum() / mass
    cx = (x.sum(0) * np.arange(28)).sum() / mass
    assert abs(cy - 13.5) <= 1.0 and abs(cx - 13.5) <= 1.0


def test_an_empty_canvas_is_all_background() -> None:
    x = drawing_to_input(np.zeros((168, 168, 4), np.uint8), (1, 8, 8), (-1.0, 1.0))
    assert (x == -1.0).all()


@pytest.mark.parametrize("name", ["digits_fc_standard", "digits_fc_pgd", "digits_conv_standard"])
@pytest.mark.parametrize("scale", [1, 4])
def test_a_drawn_seven_reads_as_seven(name: str, scale: int) -> None:
    """Full size, and a quarter size in the corner (before: read as 3 by digits_fc_pgd)."""
    path = SAMPLE_MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip("sample models not built")
    strokes = [[(x // scale, y // scale) for x, y in SEVEN[0]]]
    x = drawing_to_input(_canvas(strokes, width=14 // scale), (1, 8, 8), (0.0, 1.0))[None]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0][0]
    assert int(np.argmax(logits)) == 7, logits
