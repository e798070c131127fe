"""The engine's one network representation: an ordered graph of layers.

Node ``i`` applies ``layers[i]`` to the outputs of the nodes listed in ``inputs[i]``; the
index ``-1`` stands for the network input. Nodes are in topological order and the last node
is the output (logits). Sequential networks have ``inputs[i] == (i - 1,)`` for every node.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from app.errors import InvalidInputError
from app.layers import AffineLayer, Layer, MaxPool2d, ReLU

INPUT = -1


@dataclass(frozen=True)
class NodeInfo:
    """A read-only view of one node, for listings and the UI."""

    index: int
    kind: str
    inputs: tuple[int, ...]
    out_shape: tuple[int, ...]
    description: str


class Network(nn.Module):
    """A piecewise-linear network: callable on a batch, returns logits.

    ``input_shape`` excludes the batch dimension. ``shapes[i]`` is node ``i``'s output shape.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        input_shape: Sequence[int],
        inputs: Sequence[Sequence[int]] | None = None,
        name: str = "network",
    ) -> None:
        super().__init__()
        if not layers:
            raise InvalidInputError("a network needs at least one layer")
        self.layers = nn.ModuleList(layers)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.inputs: list[tuple[int, ...]] = (
            [tuple(e) for e in inputs] if inputs is not None
            else [(i - 1,) for i in range(len(layers))]
        )
        self.name = name
        for i, (layer, ins) in enumerate(zip(self.layers, self.inputs, strict=True)):
            if len(ins) != layer.arity or any(j >= i or j < INPUT for j in ins):
                raise InvalidInputError(f"node {i} ({layer.kind}) has bad inputs {ins}")
        with torch.no_grad():
            outs = self.trace(torch.zeros((1, *self.input_shape), dtype=self.dtype,
                                          device=self.device))
        self.shapes: list[tuple[int, ...]] = [tuple(o.shape[1:]) for o in outs]

    # -- evaluation -------------------------------------------------------------------------

    def trace(self, x: Tensor) -> list[Tensor]:
        """Outputs of every node for the batch ``x`` (shape ``[B, *input_shape]``)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise InvalidInputError(
                f"input shape {tuple(x.shape[1:])} does not match the model's {self.input_shape}"
            )
        outs: list[Tensor] = []
        for layer, ins in zip(self.layers, self.inputs, strict=True):
            outs.append(layer(*(x if j == INPUT else outs[j] for j in ins)))
        return outs

    def forward(self, x: Tensor) -> Tensor:
        return self.trace(x)[-1]

    def node_inputs(self, outs: Sequence[Tensor], x: Tensor, i: int) -> list[Tensor]:
        """The tensors node ``i`` consumes, given every node's outputs and the input."""
        return [x if j == INPUT else outs[j] for j in self.inputs[i]]

    def pre_activations(self, x: Tensor) -> dict[int, Tensor]:
        """Input of every ReLU node, keyed by node index."""
        outs = self.trace(x)
        return {i: self.node_inputs(outs, x, i)[0] for i in self.relu_indices}

    def activation_patterns(self, x: Tensor) -> dict[int, Tensor]:
        """On/off (``pre > 0``) pattern of every ReLU node, keyed by node index."""
        return {i: pre > 0 for i, pre in self.pre_activations(x).items()}

    def interval_bounds(self, lo: Tensor, hi: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Interval (IBP) bounds of every node for the input box ``[lo, hi]`` (batched)."""
        bounds: list[tuple[Tensor, Tensor]] = []
        for layer, ins in zip(self.layers, self.inputs, strict=True):
            bounds.append(layer.interval(*((lo, hi) if j == INPUT else bounds[j] for j in ins)))
        return bounds

    # -- structure --------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def num_outputs(self) -> int:
        return math.prod(self.shapes[-1])

    @property
    def is_sequential(self) -> bool:
        return all(ins == (i - 1,) for i, ins in enumerate(self.inputs))

    @property
    def consumers(self) -> dict[int, list[int]]:
        """The nodes reading each node's output (``INPUT`` for the network's input)."""
        out: dict[int, list[int]] = {}
        for i, ins in enumerate(self.inputs):
            for j in ins:
                out.setdefault(j, []).append(i)
        return out

    @property
    def last_readers(self) -> dict[int, int]:
        """The last node reading each node's output: after it, the output can be dropped."""
        return {j: readers[-1] for j, readers in self.consumers.items()}

    @property
    def relu_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, ReLU)]

    @property
    def maxpool_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, MaxPool2d)]

    @property
    def affine_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, AffineLayer)]

    def in_shape(self, i: int) -> tuple[int, ...]:
        """Shape of node ``i``'s first input."""
        j = self.inputs[i][0]
        return self.input_shape if j == INPUT else self.shapes[j]

    def nodes(self) -> Iterator[NodeInfo]:
        for i, layer in enumerate(self.layers):
            yield NodeInfo(i, layer.kind, self.inputs[i], self.shapes[i], layer.describe())

    def num_neurons(self) -> int:
        """Number of ReLU units (the usual measure of a network's size)."""
        return sum(math.prod(self.shapes[i]) for i in self.relu_indices)

    def summary(self) -> dict:
        """A JSON-ready description: input shape, outputs, layers, neuron count."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_outputs": self.num_outputs,
            "num_relu_neurons": self.num_neurons(),
            "sequential": self.is_sequential,
            "layers": [
                {"index": n.index, "kind": n.kind, "inputs": list(n.inputs),
                 "out_shape": list(n.out_shape), "description": n.description}
                for n in self.nodes()
            ],
        }

    def with_dtype(self, dtype: torch.dtype) -> Network:
        """A copy in ``dtype`` (e.g. ``torch.float64`` for exact analyses)."""
        import copy

        return copy.deepcopy(self).to(dtype)
