"""Prediction of one input: class scores and which ReLUs the input switches on.

The activation pattern is the input's "address" in the network's piecewise-linear
structure; its per-layer summary is the first thing to look at before any deeper analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from app.errors import InvalidInputError
from app.network import Network


@dataclass
class LayerPattern:
    """On/off summary of one ReLU node: ``active`` of ``neurons`` units have pre > 0."""

    node: int
    shape: tuple[int, ...]
    neurons: int
    active: int
    fraction_active: float
    pattern: np.ndarray  # flat 0/1 per unit, row-major over ``shape``


@dataclass
class Prediction:
    logits: np.ndarray
    scores: np.ndarray  # softmax of the logits
    predicted: int
    layers: list[LayerPattern]


def predict(net: Network, x: Tensor) -> Prediction:
    """Logits, softmax scores, arg-max class and per-ReLU-layer pattern of one input.

    ``x`` has the network's input shape, with or without a leading batch dimension of 1.
    """
    if tuple(x.shape) == net.input_shape:
        x = x.unsqueeze(0)
    if x.shape[0] != 1:
        raise InvalidInputError(f"predict takes one input, got a batch of {x.shape[0]}")
    x = x.to(net.dtype).to(net.device)
    with torch.no_grad():
        outs = net.trace(x)
        logits = outs[-1].reshape(-1)
        layers = []
        for i in net.relu_indices:
            on = (net.node_inputs(outs, x, i)[0] > 0).reshape(-1)
            active = int(on.sum())
            layers.append(LayerPattern(
                node=i, shape=net.shapes[i], neurons=on.numel(), active=active,
                fraction_active=active / max(1, on.numel()),
                pattern=on.to(torch.uint8).cpu().numpy(),
            ))
    logits = logits.cpu()
    scores = torch.softmax(logits.double(), dim=0)
    return Prediction(
        logits=logits.numpy(), scores=scores.numpy(), predicted=int(torch.argmax(logits)),
        layers=layers,
    )
