"""CROWN: backward linear relaxation (Zhang et al., NeurIPS 2018; DeepPoly-equivalent).

A lower bound of ``spec . y_i`` is found by walking the graph backwards from node ``i``: each
layer kind turns the coefficients on its output into coefficients on its inputs plus a
constant (the per-kind rules in ``_BACKWARD``, as auto_LiRPA's ``bound_backward``). At the
input the linear function is minimised over the box exactly. Upper bounds are lower bounds
of ``-spec``. The relaxations of ReLU and MaxPool need bounds of their inputs, which are
computed the same way, node by node in topological order, and intersected with the interval
bounds (so CROWN is never looser than IBP on any node).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from app.bounds.base import BoundAnalysis, box_lower, has_values, maxpool_choice
from app.layers import Add, AffineLayer, KindTable, MaxPool2d, ReLU
from app.network import INPUT, Network

Bounds = tuple[Tensor, Tensor]
# (layer, coefficients [B, m, *out_shape], input shapes, input bounds, out_shape) ->
# (coefficients on each input, constant [B, m]); the layer is the entry's own kind
BackwardRule = Callable[[Any, Tensor, list, list[Bounds], tuple[int, ...]],
                        tuple[list[Tensor], Tensor]]


class CrownAnalysis(BoundAnalysis):
    """CROWN bounds, computed lazily for the nodes a question needs.

    Bounds that only feed a relaxation are back-substituted for the neurons the interval
    bounds leave unstable: a stable ReLU is relaxed exactly whatever its bounds, so the
    relaxation is the same as with full CROWN bounds, at a fraction of the cost.
    """

    def __init__(self, net: Network, lo: Tensor, hi: Tensor) -> None:
        super().__init__(net, lo, hi)
        self._relax: dict[int, Bounds] = {INPUT: (lo, hi)}  # bounds for relaxations
        self._full: dict[int, Bounds] = {INPUT: (lo, hi)}

    def bounds(self, node: int) -> Bounds:
        if node not in self._full:
            self._prepare(node)
            layer, ins = self.net.layers[node], self.net.inputs[node]
            if needs_input_bounds(layer):
                found = layer.interval(*(self.bounds(j) for j in ins))
            else:
                found = self._back_substitute(node, only_unstable=False)
            ibp_lo, ibp_hi = self.box(node)
            self._full[node] = torch.maximum(found[0], ibp_lo), torch.minimum(found[1], ibp_hi)
        return self._full[node]

    def lower(self, node: int, spec: Tensor, bias: Tensor | None = None) -> Tensor:
        self._prepare(node + 1)
        out = self._backward(node, spec)
        if bias is not None:
            out = out + bias
        return torch.maximum(out, box_lower(*self.bounds(node), spec, bias))

    # -- internals --------------------------------------------------------------------------

    def _prepare(self, node: int) -> None:
        """Bounds of every relaxed layer's input before ``node``, in topological order."""
        net = self.net
        needed = {net.inputs[k][0] for k in range(node) if needs_input_bounds(net.layers[k])}
        for j in sorted(needed - set(self._relax)):
            self._relax[j] = self._relaxation_bounds(j)

    def _relaxation_bounds(self, node: int) -> Bounds:
        layer, ins = self.net.layers[node], self.net.inputs[node]
        ibp_lo, ibp_hi = self.box(node)
        if needs_input_bounds(layer):
            lo, hi = layer.interval(*(self._relax[j] for j in ins))
        else:
            lo, hi = self._back_substitute(node, only_unstable=not self._needs_values(node))
        return torch.maximum(lo, ibp_lo), torch.minimum(hi, ibp_hi)

    def _needs_values(self, node: int) -> bool:
        """Whether a relaxation uses this node's bounds beyond their signs (e.g. MaxPool)."""
        net = self.net
        for k in range(node + 1, len(net.layers)):
            if node in net.inputs[k] and needs_input_bounds(net.layers[k]):
                if not isinstance(net.layers[k], ReLU) or self._needs_values(k):
                    return True
        return False

    def _back_substitute(self, node: int, only_unstable: bool) -> Bounds:
        """CROWN bounds of node ``node``'s neurons (the IBP-unstable ones, or all)."""
        ibp_lo, ibp_hi = self.box(node)
        b, shape = ibp_lo.shape[0], ibp_lo.shape[1:]
        flat_lo, flat_hi = ibp_lo.reshape(b, -1), ibp_hi.reshape(b, -1)
        dev = ibp_lo.device
        if self.net.inputs[node] == (INPUT,) and isinstance(self.net.layers[node], AffineLayer):
            rows = torch.zeros(0, dtype=torch.long, device=dev)  # one affine map: IBP is exact
        elif only_unstable and has_values(flat_lo):
            rows = ((flat_lo < 0) & (flat_hi > 0)).any(0).nonzero().squeeze(1)
        else:
            rows = torch.arange(flat_lo.shape[1], device=dev)
        lo, hi = flat_lo.clone(), flat_hi.clone()
        if rows.numel():
            n = flat_lo.shape[1]
            eye = torch.zeros(rows.numel(), n, dtype=ibp_lo.dtype, device=dev)
            eye[torch.arange(rows.numel(), device=dev), rows] = 1
            spec = torch.cat([eye, -eye]).reshape(1, 2 * rows.numel(), *shape)
            both = self._backward(node, spec.expand(b, *spec.shape[1:]))
            lo[:, rows], hi[:, rows] = both[:, : rows.numel()], -both[:, rows.numel():]
        return lo.reshape(ibp_lo.shape), hi.reshape(ibp_hi.shape)

    def _backward(self, node: int, spec: Tensor, relax: dict[int, Bounds] | None = None,
                  slopes: dict[int, Tensor] | None = None) -> Tensor:
        """Lower bound ``[B, m]`` of ``spec . y_node`` by back-substitution to the input.

        ``relax`` replaces the relaxations' input bounds and ``slopes`` (per ReLU node,
        ``[B, m, *shape]`` in ``[0, 1]``) CROWN's lower lines of unstable ReLUs (alpha-CROWN).
        """
        net = self.net
        relax = self._relax if relax is None else relax
        slopes = slopes or {}
        coeffs: dict[int, Tensor] = {node: spec}
        const = spec.new_zeros(spec.shape[:2])
        for i in range(node, -1, -1):
            if i not in coeffs:
                continue
            a = coeffs.pop(i)
            layer, ins = net.layers[i], net.inputs[i]
            in_bounds = [relax[j] for j in ins] if needs_input_bounds(layer) else []
            if i in slopes:
                a_ins, c = relu_backward(a, *in_bounds[0], slopes[i])
            else:
                rule = _BACKWARD(layer)
                a_ins, c = rule(layer, a, [self.shape(j) for j in ins], in_bounds, net.shapes[i])
            const = const + c
            for j, a_j in zip(ins, a_ins, strict=True):
                coeffs[j] = coeffs[j] + a_j if j in coeffs else a_j
        a = coeffs.get(INPUT)
        if a is None:
            return const
        return const + box_lower(self.lo, self.hi, a)


def needs_input_bounds(layer) -> bool:
    """Whether the layer's relaxation depends on bounds of its input."""
    return isinstance(layer, _RELAXED)


def _affine(layer: AffineLayer, a: Tensor, in_shapes: list, _b: list,
            out_shape: tuple[int, ...]) -> tuple[list[Tensor], Tensor]:
    b, m = a.shape[:2]
    a_in = layer.transpose(a.reshape(b * m, *out_shape), in_shapes[0])
    const = (a * layer.bias_map(out_shape).to(a)).flatten(2).sum(-1)
    return [a_in.reshape(b, m, *in_shapes[0])], const


def _relu(_layer: ReLU, a: Tensor, _s: list, in_bounds: list[Bounds],
          _o: tuple[int, ...]) -> tuple[list[Tensor], Tensor]:
    return relu_backward(a, *in_bounds[0])


def relu_backward(a: Tensor, lo: Tensor, hi: Tensor,
                  lower_slope: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
    """Coefficients ``a`` ``[B, m, *shape]`` on a ReLU's output moved to its input.

    Upper line: the chord of unstable neurons. Lower line ``y >= s x``: any ``s`` in
    ``[0, 1]`` is sound; ``lower_slope`` (per spec row) or CROWN's adaptive choice (1 when
    the positive side is larger, else 0).
    """
    unstable = (lo < 0) & (hi > 0)
    safe = torch.where(unstable, hi - lo, torch.ones_like(hi))
    active = (lo >= 0).to(a.dtype)
    up_slope = torch.where(unstable, hi / safe, active)
    up_const = torch.where(unstable, -up_slope * lo, torch.zeros_like(lo))
    if lower_slope is None:
        lo_slope = torch.where(unstable, (hi > -lo).to(a.dtype), active).unsqueeze(1)
    else:
        lo_slope = torch.where(unstable.unsqueeze(1), lower_slope, active.unsqueeze(1))
    pos, neg = a.clamp(min=0), a.clamp(max=0)
    a_in = pos * lo_slope + neg * up_slope.unsqueeze(1)
    const = (neg * up_const.unsqueeze(1)).flatten(2).sum(-1)
    return [a_in], const


def _maxpool(layer: MaxPool2d, a: Tensor, in_shapes: list, in_bounds: list[Bounds],
             _o: tuple[int, ...]) -> tuple[list[Tensor], Tensor]:
    lo, hi = in_bounds[0]
    index, dominant, upper = maxpool_choice(layer, lo, hi)
    dom = dominant.unsqueeze(1)
    pos, neg = a.clamp(min=0), a.clamp(max=0)
    through = pos + torch.where(dom, neg, torch.zeros_like(neg))
    const = (torch.where(dom, torch.zeros_like(neg), neg) * upper.unsqueeze(1)).flatten(2).sum(-1)
    b, m, c = a.shape[:3]
    h, w = in_shapes[0][-2:]
    a_in = a.new_zeros(b, m, c, h * w)
    a_in = a_in.scatter_add(-1, index.unsqueeze(1).expand(b, m, c, -1), through.flatten(3))
    return [a_in.reshape(b, m, *in_shapes[0])], const


def _add(_layer: Add, a: Tensor, _s: list, _b: list,
         _o: tuple[int, ...]) -> tuple[list[Tensor], Tensor]:
    return [a, a], a.new_zeros(a.shape[:2])


_RELAXED = (ReLU, MaxPool2d)
_BACKWARD: KindTable[BackwardRule] = KindTable("no bound rule for",
                      {AffineLayer: _affine, ReLU: _relu, MaxPool2d: _maxpool, Add: _add})
