"""The saliency tests' oracles: the first ReLU's input from a plain forward pass of the torch
module or from onnxruntime (the ONNX file run by another library), whether a mask keeps every
selected neuron at or above the threshold, and brute force over every group mask."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

TOL = 1e-9
PreFn = Callable[[torch.Tensor], torch.Tensor]


def first_pre(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The first ReLU's input, straight from the torch module (the oracle)."""
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.ReLU):
                return x.reshape(x.shape[0], -1)
            x = layer(x)
    raise AssertionError("no ReLU")


def onnx_first_pre(path: str) -> PreFn:
    """The first Relu's input computed by onnxruntime on the ONNX file (float32 weights)."""
    model = onnx.load(path)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        relu.input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def pre(x: torch.Tensor) -> torch.Tensor:
        out = session.run([relu.input[0]], {name: x.numpy().astype(np.float32)})[0]
        return torch.from_numpy(out.astype(np.float64)).reshape(x.shape[0], -1)
    return pre


def masked_pre(pre: PreFn, x: torch.Tensor, masks: torch.Tensor, res) -> torch.Tensor:
    """Selected neurons on ``baseline + mask * (x - baseline)`` for input-shaped masks."""
    base = torch.as_tensor(res.baseline, dtype=x.dtype).reshape(x.shape)
    idx = [n.index for n in res.neurons]
    return pre(base + masks.to(x.dtype) * (x - base))[:, idx]


def slack(pre: PreFn, x: torch.Tensor, masks: torch.Tensor, res,
          tol: float = TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mask, ``(surely holds, holds within tolerance)``: every selected neuron at or above
    threshold x its value, with a margin of ``tol`` times the neurons' magnitude either way."""
    idx = [n.index for n in res.neurons]
    orig = pre(x[None])[0, idx]
    base = torch.as_tensor(res.baseline, dtype=x.dtype).reshape(x[None].shape)
    scale = tol * (1 + orig.abs() + pre(base)[0, idx].abs())
    gap = masked_pre(pre, x, masks, res) - res.threshold * orig
    return (gap >= scale).all(1), (gap >= -scale).all(1)


def holds(model: nn.Sequential, x: torch.Tensor, masks: torch.Tensor, res) -> torch.Tensor:
    """Per input-shaped mask: do all selected neurons stay >= threshold (within tolerance)?"""
    return slack(lambda z: first_pre(model, z), x, masks, res)[1]


def every_mask(groups: int) -> torch.Tensor:
    """All ``2**groups`` group masks, ``[2**groups, groups]`` bool."""
    return torch.tensor(list(itertools.product([0, 1], repeat=groups)), dtype=torch.bool)
