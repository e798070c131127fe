"""DeepZ: zonotope propagation (Singh et al., NeurIPS 2018), batched.

A node's output is ``center + sum_k gens[k] * e_k`` with every ``e_k`` in ``[-1, 1]``. The
first generators are the input box's; each unstable ReLU and each non-dominated MaxPool
output adds a fresh one. Generators are shared across nodes by position, so a residual
``Add`` sums two zonotopes term by term. Every node's bounds are intersected with its
interval bounds, which keeps DeepZ sound and never looser than IBP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from app.bounds.base import BoundAnalysis, box_lower, has_values, maxpool_choice
from app.layers import Add, AffineLayer, KindTable, MaxPool2d, ReLU
from app.network import INPUT, Network

Zonotope = tuple[Tensor, Tensor]  # center [B, *shape], generators [B, G, *shape]
# (layer, input zonotopes, input bounds) -> output zonotope; the layer is the entry's kind
ForwardRule = Callable[[Any, list[Zonotope], list], Zonotope]


class DeepZAnalysis(BoundAnalysis):
    """Zonotopes of every node up to ``upto`` (default: the whole network)."""

    def __init__(self, net: Network, lo: Tensor, hi: Tensor, upto: int | None = None) -> None:
        super().__init__(net, lo, hi)
        b, n = lo.shape[0], lo[0].numel()
        rad = ((hi - lo) / 2).reshape(b, n)
        gens = torch.diag_embed(rad).reshape(b, n, *net.input_shape)
        self.zono: dict[int, Zonotope] = {INPUT: ((lo + hi) / 2, gens)}
        self._bounds: dict[int, tuple[Tensor, Tensor]] = {INPUT: (lo, hi)}
        upto = len(net.layers) - 1 if upto is None else upto
        for i in range(upto + 1):
            layer, ins = net.layers[i], net.inputs[i]
            rule = _FORWARD(layer)
            self.zono[i] = rule(layer, [self.zono[j] for j in ins],
                                [self._bounds[j] for j in ins])
            self._bounds[i] = self._concretize(i)

    def _concretize(self, node: int) -> tuple[Tensor, Tensor]:
        c, g = self.zono[node]
        rad = g.abs().sum(1)
        ibp_lo, ibp_hi = self.box(node)
        return torch.maximum(c - rad, ibp_lo), torch.minimum(c + rad, ibp_hi)

    def bounds(self, node: int) -> tuple[Tensor, Tensor]:
        return self._bounds[node]

    def lower(self, node: int, spec: Tensor, bias: Tensor | None = None) -> Tensor:
        c, g = self.zono[node]
        dims = tuple(range(2, spec.dim()))
        centre = (spec * c.unsqueeze(1)).sum(dims)
        # [B, m, G]: the spec applied to each generator
        coeff = torch.einsum("bmn,bgn->bmg", spec.flatten(2), g.flatten(2))
        zono_lower = centre - coeff.abs().sum(-1)
        if bias is not None:
            zono_lower = zono_lower + bias
        return torch.maximum(zono_lower, box_lower(*self.bounds(node), spec, bias))


def _affine(layer: AffineLayer, zs: list[Zonotope], _bounds: list) -> Zonotope:
    c, g = zs[0]
    b, n_gen = g.shape[:2]
    out_c = layer(c)
    out_g = layer.linear(g.reshape(b * n_gen, *g.shape[2:]))
    return out_c, out_g.reshape(b, n_gen, *out_g.shape[1:])


def _relu(_layer: ReLU, zs: list[Zonotope], bounds: list) -> Zonotope:
    c, g = zs[0]
    lo, hi = bounds[0]
    unstable = (lo < 0) & (hi > 0)
    safe = torch.where(unstable, hi - lo, torch.ones_like(hi))
    slope = torch.where(unstable, hi / safe, (lo >= 0).to(c.dtype))
    shift = torch.where(unstable, -slope * lo / 2, torch.zeros_like(lo))
    return c * slope + shift, torch.cat([g * slope.unsqueeze(1), _fresh(shift, unstable)], 1)


def _maxpool(layer: MaxPool2d, zs: list[Zonotope], bounds: list) -> Zonotope:
    c, g = zs[0]
    lo, hi = bounds[0]
    index, dominant, upper = maxpool_choice(layer, lo, hi)
    b, ch, oh, ow = dominant.shape
    n_gen = g.shape[1]
    pick_c = c.flatten(2).gather(-1, index).reshape(b, ch, oh, ow)
    pick_g = g.flatten(3).gather(-1, index.unsqueeze(1).expand(b, n_gen, ch, oh * ow))
    pick_g = pick_g.reshape(b, n_gen, ch, oh, ow)
    low = layer.forward(lo)
    centre = torch.where(dominant, pick_c, (low + upper) / 2)
    half = torch.where(dominant, torch.zeros_like(upper), (upper - low) / 2)
    gens = torch.where(dominant.unsqueeze(1), pick_g, torch.zeros_like(pick_g))
    return centre, torch.cat([gens, _fresh(half, ~dominant)], 1)


def _add(_layer: Add, zs: list[Zonotope], _bounds: list) -> Zonotope:
    (ca, ga), (cb, gb) = zs
    n = max(ga.shape[1], gb.shape[1])
    return ca + cb, _pad(ga, n) + _pad(gb, n)


def _fresh(radius: Tensor, where: Tensor) -> Tensor:
    """One new generator ``[B, k, *shape]`` per position that is ``where`` in any sample."""
    b = radius.shape[0]
    flat_where = where.reshape(b, -1).any(0)
    idx = (flat_where.nonzero().squeeze(1) if has_values(flat_where)
           else torch.arange(flat_where.numel(), device=where.device))  # meta: every position
    new = radius.new_zeros(b, idx.numel(), flat_where.numel())
    vals = (radius * where).reshape(b, -1)[:, idx]
    new[:, torch.arange(idx.numel(), device=idx.device), idx] = vals
    return new.reshape(b, idx.numel(), *radius.shape[1:])


def _pad(g: Tensor, n: int) -> Tensor:
    if g.shape[1] == n:
        return g
    extra = g.new_zeros(g.shape[0], n - g.shape[1], *g.shape[2:])
    return torch.cat([g, extra], 1)


_FORWARD: KindTable[ForwardRule] = KindTable("no bound rule for",
                     {AffineLayer: _affine, ReLU: _relu, MaxPool2d: _maxpool, Add: _add})
