"""Bound propagators over the engine's network representation: interval, DeepZ, CROWN.

``analyze(net, lo, hi, method)`` returns a :class:`BoundAnalysis` answering ``bounds(node)``
and ``lower(node, spec, bias)`` for a batch of input boxes; ``property_lower_bounds`` is the
lower bound of ``y_label - y_j`` for every ``j != label`` (positive everywhere = certified).
"""

from __future__ import annotations

from torch import Tensor

from app.bounds.base import BoundAnalysis, box_lower, fold_last_layer, input_box, margin_spec
from app.bounds.crown import CrownAnalysis
from app.bounds.deepz import DeepZAnalysis
from app.bounds.interval import IntervalAnalysis
from app.errors import InvalidInputError
from app.network import Network

METHODS: dict[str, type[BoundAnalysis]] = {
    "interval": IntervalAnalysis,
    "deepz": DeepZAnalysis,
    "crown": CrownAnalysis,
}


def analyze(net: Network, lo: Tensor, hi: Tensor, method: str) -> BoundAnalysis:
    """Run the propagator ``method`` (one of :data:`METHODS`) on the boxes ``[lo, hi]``."""
    if method not in METHODS:
        raise InvalidInputError(f"unknown bound method {method!r}; use one of {list(METHODS)}")
    return METHODS[method](net, lo.to(net.dtype), hi.to(net.dtype))


def property_lower_bounds(net: Network, lo: Tensor, hi: Tensor, labels: Tensor,
                          method: str) -> Tensor:
    """Lower bounds ``[B, n_out - 1]`` of ``y_label - y_j`` (``j != label``) on each box."""
    spec = margin_spec(net.num_outputs, labels, net.dtype)
    node, folded, bias = fold_last_layer(net, spec)
    return analyze(net, lo, hi, method).lower(node, folded, bias)


__all__ = [
    "METHODS",
    "BoundAnalysis",
    "analyze",
    "box_lower",
    "fold_last_layer",
    "input_box",
    "margin_spec",
    "property_lower_bounds",
]
