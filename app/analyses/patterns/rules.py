"""Pattern rules: a conjunction of neuron on/off decisions at one layer implying a class.

A neuron is *on* when its pre-activation is positive, *off* otherwise, as in
:meth:`app.Network.activation_patterns`. A distilled rule may also compare a pre-activation
with another threshold (``L2.n17 > 0.53``): on/off is the threshold 0. Layers are named by their ReLU ordinal: ``L1`` is the
network's first ReLU node, and neurons by their flat index, so ``L2.n17`` is the 18th unit of the
second ReLU layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from app.errors import InvalidInputError
from app.network import Network


@dataclass(frozen=True)
class Rule:
    """``if <literals> then class <target>``, with its held-out statistics.

    ``literals`` are ``(neuron, on)`` pairs at ReLU node ``node`` (ReLU layer ``layer``).
    ``lowest`` flips the output property from "highest score" to "lowest score" (ACAS Xu
    advisories are the lowest score). ``thresholds`` (one per literal, empty = all 0) make a
    literal ``pre > t`` (on) or ``pre <= t`` (off).
    """

    layer: int
    node: int
    literals: tuple[tuple[int, bool], ...]
    target: int
    lowest: bool = False
    support: int = 0
    precision: float = 0.0
    recall: float = 0.0
    thresholds: tuple[float, ...] = ()

    @property
    def is_pattern(self) -> bool:
        """Whether every literal is a plain on/off test (threshold 0)."""
        return not any(self.thresholds)

    def _threshold(self, k: int) -> float:
        return self.thresholds[k] if self.thresholds else 0.0

    @property
    def on(self) -> list[int]:
        return [n for n, is_on in self.literals if is_on]

    @property
    def off(self) -> list[int]:
        return [n for n, is_on in self.literals if not is_on]

    def condition(self) -> str:
        """The rule's premise, e.g. ``L2.n17 on and L2.n40 off`` (``always`` when empty)."""
        parts = []
        for k, (n, is_on) in enumerate(self.literals):
            t = self._threshold(k)
            test = ("on" if is_on else "off") if t == 0 else f"{'>' if is_on else '<='} {t:.3g}"
            parts.append(f"L{self.layer}.n{n} {test}")
        return " and ".join(parts) if parts else "always"

    def conclusion(self) -> str:
        return f"class {self.target}" + (" (lowest score)" if self.lowest else "")

    def __str__(self) -> str:
        return (
            f"if {self.condition()} then {self.conclusion()} "
            f"(support {self.support}, precision {self.precision:.0%})"
        )

    def fires_on_pattern(self, pattern: Tensor) -> Tensor:
        """Which rows of a flat on/off ``pattern`` ``[B, neurons]`` satisfy the premise
        (on/off rules; see :meth:`fires_on_values` for thresholds)."""
        if not self.is_pattern:
            raise InvalidInputError("a rule with thresholds needs pre-activation values")
        ok = torch.ones(pattern.shape[0], dtype=torch.bool)
        for n, is_on in self.literals:
            ok &= pattern[:, n] == is_on
        return ok

    def fires_on_values(self, pre: Tensor) -> Tensor:
        """Which rows of flat pre-activations ``[B, neurons]`` satisfy the premise."""
        ok = torch.ones(pre.shape[0], dtype=torch.bool)
        for k, (n, is_on) in enumerate(self.literals):
            ok &= (pre[:, n] > self._threshold(k)) == is_on
        return ok

    def fires(self, net: Network, x: Tensor) -> Tensor:
        """Which inputs of the batch ``x`` satisfy the premise (a forward pass)."""
        return self.fires_on_values(layer_values(net, x, self.node))

    def to_dict(self) -> dict:
        return {
            "text": str(self), "condition": self.condition(), "layer": self.layer,
            "node": self.node, "on": self.on, "off": self.off, "target": self.target,
            "lowest": self.lowest, "support": self.support, "precision": self.precision,
            "recall": self.recall, "thresholds": list(self.thresholds),
        }


def relu_node(net: Network, layer: int) -> tuple[int, int]:
    """``(ordinal, node)`` of ReLU layer ``layer`` (1-based; negative counts from the end)."""
    relus = net.relu_indices
    if not relus:
        raise InvalidInputError("the network has no ReLU layer to read patterns from")
    if not (1 <= layer <= len(relus) or -len(relus) <= layer <= -1):
        raise InvalidInputError(f"layer must be 1..{len(relus)} or -1..-{len(relus)}, got {layer}")
    ordinal = layer if layer > 0 else len(relus) + 1 + layer
    return ordinal, relus[ordinal - 1]


def layer_values(net: Network, x: Tensor, node: int) -> Tensor:
    """Flat pre-activations ``[B, neurons]`` of ReLU node ``node`` for the batch ``x``."""
    with torch.no_grad():
        outs = net.trace(x.to(net.dtype))
        pre = net.node_inputs(outs, x, node)[0]
    return pre.reshape(x.shape[0], -1)


def layer_pattern(net: Network, x: Tensor, node: int) -> Tensor:
    """Flat on/off pattern ``[B, neurons]`` of ReLU node ``node`` for the batch ``x``."""
    return layer_values(net, x, node) > 0


def decisions(net: Network, x: Tensor, lowest: bool = False) -> np.ndarray:
    """The network's decision per input: argmax of the logits, or argmin when ``lowest``."""
    with torch.no_grad():
        y = net(x.to(net.dtype)).reshape(x.shape[0], -1)
    return (y.argmin(1) if lowest else y.argmax(1)).numpy()


def rules_firing(net: Network, rules: list[Rule], x: Tensor) -> list[Rule]:
    """The rules whose premise holds on the single input ``x`` (shape ``input_shape``)."""
    batch = x.reshape(1, *net.input_shape)
    values: dict[int, Tensor] = {}
    fired = []
    for rule in rules:
        if rule.node not in values:
            values[rule.node] = layer_values(net, batch, rule.node)
        if bool(rule.fires_on_values(values[rule.node])[0]):
            fired.append(rule)
    return fired
