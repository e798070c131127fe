"""Interval bound propagation (IBP): each layer's own ``interval`` method, node by node."""

from __future__ import annotations

from torch import Tensor

from app.bounds.base import BoundAnalysis, box_lower


class IntervalAnalysis(BoundAnalysis):
    """Boxes for every node from :meth:`Network.interval_bounds`; linear specs on a box."""

    def bounds(self, node: int) -> tuple[Tensor, Tensor]:
        return self.box(node)

    def lower(self, node: int, spec: Tensor, bias: Tensor | None = None) -> Tensor:
        return box_lower(*self.box(node), spec, bias)
