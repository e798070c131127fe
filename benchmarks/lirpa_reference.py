"""auto_LiRPA's CROWN output bounds on an ONNX network: the reference for ``bench_proof_features``.

Runs under the separate benchmark environment (Python 3.10, torch 1.12.1, numpy < 2,
auto_LiRPA 0.3, onnx; see ``bench_proof_features``'s docstring), never the product's. It
rebuilds the network as torch modules from the ONNX graph (Sub/Div/Mul/Add by constants,
Conv, Relu, Flatten, Gemm, MatMul: what the shared CIFAR ConvSmall nets use), then times
``BoundedModule.compute_bounds(method="CROWN")`` (lower and upper bounds of every output,
auto_LiRPA's defaults: patches mode for convolutions, sparse intermediate bounds) on one
L-infinity box per image, one thread, after one untimed warm-up call. Prints one JSON object:
``{"seconds": [...], "cpu_seconds": [...], "lower": [[...]], "upper": [[...]]}`` (wall-clock
and process CPU seconds per box).

    .venv-lirpa/bin/python benchmarks/lirpa_reference.py NET.onnx BOXES.npz
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnx
import torch
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from onnx import numpy_helper
from torch import nn


class Step(nn.Module):
    """One ONNX node on one running tensor (the other operand a constant)."""

    def __init__(self, op: str, const: torch.Tensor | None = None, module: nn.Module | None = None,
                 ) -> None:
        super().__init__()
        self.op, self.module = op, module
        if const is not None:
            self.register_buffer("const", const)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            return self.module(x)
        if self.op == "Sub":
            return x - self.const
        if self.op == "Div":
            return x / self.const
        if self.op == "Mul":
            return x * self.const
        if self.op == "Add":
            return x + self.const
        if self.op == "Flatten":
            return x.flatten(1)
        raise ValueError(self.op)


def torch_model(path: str) -> nn.Sequential:
    """The ONNX chain as ``nn.Sequential`` (one running tensor, constants from the file)."""
    graph = onnx.load(path).graph
    consts = {i.name: torch.tensor(numpy_helper.to_array(i)) for i in graph.initializer}
    steps: list[nn.Module] = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            consts[node.output[0]] = torch.tensor(numpy_helper.to_array(attrs["value"]))
            continue
        args = [consts.get(name) for name in node.input]
        if node.op_type == "Conv":
            w, b = args[1], args[2] if len(args) > 2 else None
            pads = attrs.get("pads", [0, 0, 0, 0])
            conv = nn.Conv2d(w.shape[1] * attrs.get("group", 1), w.shape[0], tuple(w.shape[2:]),
                             stride=tuple(attrs.get("strides", [1, 1])),
                             padding=(pads[0], pads[1]),
                             dilation=tuple(attrs.get("dilations", [1, 1])),
                             groups=attrs.get("group", 1), bias=b is not None)
            conv.weight.data = w.float()
            if b is not None:
                conv.bias.data = b.float()
            steps.append(Step("Conv", module=conv))
        elif node.op_type in ("Gemm", "MatMul"):
            w = args[1].float()
            if node.op_type == "MatMul" or not attrs.get("transB", 0):
                w = w.T
            lin = nn.Linear(w.shape[1], w.shape[0], bias=len(args) > 2)
            lin.weight.data = (w * attrs.get("alpha", 1.0)).contiguous()
            if len(args) > 2:
                lin.bias.data = args[2].float() * attrs.get("beta", 1.0)
            steps.append(Step(node.op_type, module=lin))
        elif node.op_type == "Relu":
            steps.append(Step("Relu", module=nn.ReLU()))
        elif node.op_type == "Flatten":
            steps.append(Step("Flatten", module=nn.Flatten()))
        elif node.op_type in ("Sub", "Div", "Mul", "Add"):
            steps.append(Step(node.op_type, const=args[1].float()))
        else:
            raise ValueError(f"operator {node.op_type} not handled by the reference loader")
    return nn.Sequential(*steps).eval()


def main() -> None:
    torch.set_num_threads(1)
    net_path, boxes_path = sys.argv[1], sys.argv[2]
    boxes = np.load(boxes_path)
    lo, hi = torch.tensor(boxes["lo"]).float(), torch.tensor(boxes["hi"]).float()
    model = torch_model(net_path)
    bounded = BoundedModule(model, torch.zeros(1, *lo.shape[1:]), device="cpu")
    seconds, cpu, lowers, uppers = [], [], [], []
    for i in range(-1, lo.shape[0]):  # i = -1: the untimed warm-up on the first box
        k = max(i, 0)
        x = BoundedTensor((lo[k:k + 1] + hi[k:k + 1]) / 2,
                          PerturbationLpNorm(norm=np.inf, x_L=lo[k:k + 1], x_U=hi[k:k + 1]))
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            lb, ub = bounded.compute_bounds(x=(x,), method="CROWN")
        if i >= 0:
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            lowers.append(lb[0].tolist())
            uppers.append(ub[0].tolist())
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "lower": lowers, "upper": uppers}))


if __name__ == "__main__":
    main()
