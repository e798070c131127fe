"""The saliency tests' oracle: the first ReLU's input from a plain forward pass of the torch
module, and whether a mask keeps every selected neuron at or above the threshold."""

from __future__ import annotations

import torch
from torch import nn

TOL = 1e-9


def first_pre(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The first ReLU's input, straight from the torch module (the oracle)."""
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.ReLU):
                return x.reshape(x.shape[0], -1)
            x = layer(x)
    raise AssertionError("no ReLU")


def holds(model: nn.Sequential, x: torch.Tensor, masks: torch.Tensor, res) -> torch.Tensor:
    """Per input-shaped mask (baseline 0): do all selected neurons stay >= threshold?"""
    idx = [n.index for n in res.neurons]
    orig = first_pre(model, x[None])[0, idx]
    pre = first_pre(model, x[None] * masks.to(x.dtype))[:, idx]
    return (pre >= res.threshold * orig - TOL * (1 + orig.abs())).all(1)
