"""The proof page's VNN-LIB panel figure: a counterexample drawn as the input it is (an image
for MNIST's 784 inputs, bars for ACAS Xu's 5) beside the outputs, from a real verdict."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from app import load_network
from app.properties import verify
from app.properties.vnnlib import Case, VnnProperty
from frontend.figures.proof_features import property_verdict


def _result(n_in: int, shape: list[int]) -> dict:
    """A verdict of a property that every input meets (``y_0 - y_0 <= 0``): a counterexample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    net = load_network(model, input_shape=(n_in,))
    row = np.zeros((1, 3))
    case = Case(np.zeros(n_in), np.ones(n_in), row, np.zeros(1))
    v = verify(net, VnnProperty(n_in, 3, [case]), "crown", time_limit=5)
    assert v.status == "counterexample"
    return {"status": v.status, "counterexample": v.counterexample.tolist(), "case": v.case,
            "output": v.output.tolist(), "cases": 1, "input_shape": shape}


def test_counterexample_of_784_inputs_is_drawn_as_a_28x28_image() -> None:
    result = _result(784, [784])
    fig = property_verdict(result)
    image, outputs = fig.data
    assert np.asarray(image.z).shape == (28, 28)
    np.testing.assert_allclose(np.asarray(image.z).reshape(-1), result["counterexample"])
    np.testing.assert_allclose(outputs.y, result["output"])
    assert "case 1 of 1" in fig.layout.title.text


def test_counterexample_of_5_inputs_is_drawn_as_bars_and_a_proof_has_none() -> None:
    result = _result(5, [1, 1, 1, 5])
    inputs, outputs = property_verdict(result).data
    assert list(inputs.x) == [f"X_{i}" for i in range(5)]
    np.testing.assert_allclose(inputs.y, result["counterexample"])
    assert list(outputs.x) == ["Y_0", "Y_1", "Y_2"]
    empty = property_verdict({"status": "proven", "counterexample": None})
    assert not empty.data and "proven" in empty.layout.title.text
