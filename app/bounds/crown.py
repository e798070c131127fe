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

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from app.bounds import forward
from app.bounds.base import BoundAnalysis, box_lower, has_values, maxpool_choice
from app.layers import (
    Add,
    AffineLayer,
    Conv2d,
    ElementwiseAffine,
    Flatten,
    KindTable,
    MaxPool2d,
    ReLU,
    Reshape,
    transposed_conv,
)
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
    relaxation is the same as with full CROWN bounds, at a fraction of the cost. The
    neurons of a convolution's output are back-substituted as windows (``_unit_rows_local``,
    auto_LiRPA's patches mode): the same numbers, without full-size coefficient maps.

    ``splitting=True`` serves input splitting's many small boxes: forward linear bounds pick
    the neurons to back-substitute (``app.bounds.forward``: few stay unstable on a small
    box), each (box, neuron) pair is back-substituted on its own where the boxes are unstable
    on different neurons (not the union over the batch), and ``lower`` is the
    back-substitution alone (not also intersected with the interval bounds of the node's
    CROWN bounds, which would back-substitute all its neurons).
    """

    def __init__(self, net: Network, lo: Tensor, hi: Tensor, splitting: bool = False) -> None:
        super().__init__(net, lo, hi)
        self._relax: dict[int, Bounds] = {INPUT: (lo, hi)}  # bounds for relaxations
        self._full: dict[int, Bounds] = {INPUT: (lo, hi)}
        self.splitting = splitting
        if splitting and forward.supports(net) and has_values(lo):
            self._forward_pass()

    def _forward_pass(self) -> None:
        """Every ReLU's input bounds, in order: forward linear bounds (on the previous
        ReLUs' final bounds) intersected with IBP choose and bound the neurons, then CROWN
        back-substitutes the ones still unstable (``app.bounds.forward``)."""
        net, b = self.net, self.lo.shape[0]
        fwd = forward.ForwardBounds(self.lo, self.hi)
        shape = net.input_shape
        for i, layer in enumerate(net.layers):
            if isinstance(layer, ReLU):
                j = net.inputs[i][0]
                self._relax[j] = self._relaxation_bounds(j)
                fwd.relu(*(t.reshape(b, -1) for t in self._relax[j]))
            else:
                low, up = fwd.affine(layer, shape)
                ibp_lo, ibp_hi = self.ibp[i]
                self.ibp[i] = (torch.maximum(low.reshape(ibp_lo.shape), ibp_lo),
                               torch.minimum(up.reshape(ibp_hi.shape), ibp_hi))
            shape = net.shapes[i]

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
        if self.splitting:  # the node's own bounds would back-substitute all its neurons
            return out
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
        both = self._unit_rows_local(node, rows) if rows.numel() else None
        pairs = (((flat_lo < 0) & (flat_hi > 0)).nonzero()
                 if both is None and self.splitting and only_unstable and rows.numel()
                 and has_values(flat_lo) else None)
        if both is not None:
            lo[:, rows], hi[:, rows] = both[:, : rows.numel()], -both[:, rows.numel():]
        elif pairs is not None and 2 * pairs.shape[0] < b * rows.numel():
            # boxes of a batch unstable on different units: each (box, unit) on its own
            found = self._back_substitute_pairs(node, pairs)
            lo[pairs[:, 0], pairs[:, 1]], hi[pairs[:, 0], pairs[:, 1]] = found[:, 0], -found[:, 1]
        elif rows.numel():
            n = flat_lo.shape[1]
            eye = torch.zeros(rows.numel(), n, dtype=ibp_lo.dtype, device=dev)
            eye[torch.arange(rows.numel(), device=dev), rows] = 1
            spec = torch.cat([eye, -eye]).reshape(1, 2 * rows.numel(), *shape)
            both = self._backward(node, spec.expand(b, *spec.shape[1:]))
            lo[:, rows], hi[:, rows] = both[:, : rows.numel()], -both[:, rows.numel():]
        return lo.reshape(ibp_lo.shape), hi.reshape(ibp_hi.shape)

    def _back_substitute_pairs(self, node: int, pairs: Tensor) -> Tensor:
        """``[P, 2]`` lower bounds of ``z`` and ``-z`` for each (box, unit) of ``pairs``
        ``[P, 2]``: one back-substitution per pair, over its own box's relaxations (where
        the boxes of a batch are unstable on different units, the union of their unstable
        units would mostly be work on stable ones)."""
        box, unit = pairs[:, 0], pairs[:, 1]
        n = math.prod(self.shape(node))
        spec = self.lo.new_zeros(pairs.shape[0], 2, n)
        spec[torch.arange(pairs.shape[0], device=spec.device), 0, unit] = 1
        spec[torch.arange(pairs.shape[0], device=spec.device), 1, unit] = -1
        relax = {j: (b_lo[box], b_hi[box]) for j, (b_lo, b_hi) in self._relax.items()}
        return self._backward(node, spec.reshape(-1, 2, *self.shape(node)), relax)

    def _unit_rows_local(self, node: int, rows: Tensor) -> Tensor | None:
        """``_backward`` of the rows ``[e_k; -e_k]`` (``k`` in ``rows``) of a convolution's
        output by windows (auto_LiRPA's patches mode); None where that does not apply.

        A unit of a convolution's output depends on a window of each earlier feature map
        only, so its coefficients are kept as a window ``[B, R, C, ph, pw]`` at a per-row
        offset and moved back through convolutions (a transposed convolution of the window),
        ReLUs and elementwise affine layers. Once a window would cover its whole map, or at
        any other layer kind, they are written into full maps and the dense walk takes over.
        """
        net = self.net
        while isinstance(net.layers[node], (Flatten, Reshape)) and len(net.inputs[node]) == 1:
            node = net.inputs[node][0]  # same flat units, seen on the map before the reshape
        if (node == INPUT or not has_values(self.lo) or not isinstance(net.layers[node], Conv2d)
                or not self._local(node)):
            return None
        c, h, w = self.shape(node)
        r, b = rows.numel(), self.lo.shape[0]
        chan, pos = rows.repeat(2) // (h * w), rows.repeat(2) % (h * w)
        spots, inv = torch.unique(pos, return_inverse=True)
        where = _Windows(spots // w, spots % w, inv)
        a = self.lo.new_zeros(1, 2 * r, c, 1, 1)
        a[0, torch.arange(2 * r, device=a.device), chan, 0, 0] = torch.cat(
            [a.new_ones(r), -a.new_ones(r)])
        const = a.new_zeros(1, 2 * r)
        i, clean = node, True  # clean: zero wherever a window leaves its map
        while i != INPUT:
            layer, j = net.layers[i], net.inputs[i][0]
            in_shape = self.shape(j)
            win = tuple(a.shape[-2:])
            if isinstance(layer, Conv2d) and self._local(i):
                size = tuple((n - 1) * s + d * (k - 1) + 1 for n, s, d, k in zip(
                    win, layer.stride, layer.dilation, layer.weight.shape[2:], strict=True))
                if size[0] * size[1] < in_shape[1] * in_shape[2]:
                    if not clean:
                        a = where.crop(a, self.shape(i)[1:])
                    const = const + (a.sum((-2, -1)) * layer.bias.to(a)).sum(-1)
                    a = _conv_back(layer, a, size)
                    where, i, clean = where.through(layer), j, False
                    continue
            elif isinstance(layer, ReLU) and self._local(i):
                lines = where.gather(torch.cat(relu_lines(*self._relax[j]), 1), win)
                lo_s, up_s, up_c = lines.chunk(3, dim=2)
                neg_a = a.clamp(max=0)
                const = const + (neg_a * up_c).flatten(2).sum(-1)
                a = torch.mul(a.clamp(min=0), lo_s).addcmul_(neg_a, up_s)
                i, clean = j, True
                continue
            elif isinstance(layer, ElementwiseAffine) and self._local(i):
                full = a.new_zeros(1, *in_shape)
                maps = torch.cat([full + layer.scale.to(a), full + layer.bias_map(in_shape).to(a)])
                scale, shift = where.gather(maps, win).unbind(0)
                const = const + (a * shift).flatten(2).sum(-1)
                a, i, clean = a * scale, j, True
                continue
            dense = where.place(a, self.shape(i))
            return const + self._backward(i, dense.expand(b, *dense.shape[1:]))
        box = where.gather(torch.cat([(self.hi + self.lo) / 2, (self.hi - self.lo) / 2], 1),
                           tuple(a.shape[-2:]))
        mid, rad = box.chunk(2, dim=2)
        out = const + (a * mid).flatten(2).sum(-1) - (a.abs() * rad).flatten(2).sum(-1)
        return out.expand(b, -1)

    def _local(self, node: int) -> bool:
        """Whether windows can pass node ``node``: one input, both it and the node 3-D maps."""
        ins = self.net.inputs[node]
        return len(ins) == 1 and len(self.shape(node)) == 3 and len(self.shape(ins[0])) == 3

    def linear_lower(self, node: int, spec: Tensor, bias: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
        """``(A, c)``: ``spec . y_node + bias >= A . x + c`` for every ``x`` in the box, the
        linear function whose minimum over the box is CROWN's bound (``A`` ``[B, m,
        *input_shape]``; e.g. to split the input where ``|A|`` times the width is largest)."""
        self._prepare(node + 1)
        a, const = self._linear(node, spec)
        a = spec.new_zeros(*spec.shape[:2], *self.lo.shape[1:]) if a is None else a
        return a, const if bias is None else const + bias

    def _backward(self, node: int, spec: Tensor, relax: dict[int, Bounds] | None = None,
                  slopes: dict[int, Tensor] | None = None) -> Tensor:
        """Lower bound ``[B, m]`` of ``spec . y_node`` by back-substitution to the input.

        ``relax`` replaces the relaxations' input bounds and ``slopes`` (per ReLU node,
        ``[B, m, *shape]`` in ``[0, 1]``) CROWN's lower lines of unstable ReLUs (alpha-CROWN).
        """
        relax = self._relax if relax is None else relax
        a, const = self._linear(node, spec, relax, slopes)
        return const if a is None else const + box_lower(*relax[INPUT], a)

    def _linear(self, node: int, spec: Tensor, relax: dict[int, Bounds] | None = None,
                slopes: dict[int, Tensor] | None = None) -> tuple[Tensor | None, Tensor]:
        """``_backward``'s coefficients on the input (None: none reach it) and constant."""
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
        return coeffs.get(INPUT), const


def needs_input_bounds(layer) -> bool:
    """Whether the layer's relaxation depends on bounds of its input."""
    return isinstance(layer, _RELAXED)


def _affine(layer: AffineLayer, a: Tensor, in_shapes: list, _b: list,
            out_shape: tuple[int, ...]) -> tuple[list[Tensor], Tensor]:
    b, m = a.shape[:2]
    a_in = layer.transpose(a.reshape(b * m, *out_shape), in_shapes[0])
    if isinstance(layer, Conv2d):  # one bias per channel: no full-size temporary
        const = (a.sum((-2, -1)) * layer.bias.to(a)).sum(-1)
    else:
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
    if lower_slope is None:
        lo_slope, up_slope, up_const = relu_lines(lo, hi)
        lo_slope = lo_slope.unsqueeze(1)
    else:
        _, up_slope, up_const = relu_lines(lo, hi)
        unstable, active = (lo < 0) & (hi > 0), (lo >= 0).to(a.dtype)
        lo_slope = torch.where(unstable.unsqueeze(1), lower_slope, active.unsqueeze(1))
    neg = a.clamp(max=0)
    const = (neg * up_const.unsqueeze(1)).flatten(2).sum(-1)
    # in place on fresh results: fewer full-size temporaries (allocation is much of the cost)
    a_in = torch.mul(a.clamp(min=0), lo_slope).addcmul_(neg, up_slope.unsqueeze(1))
    return [a_in], const


def relu_lines(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CROWN's lines of ReLUs with input bounds ``[lo, hi]``: ``(lower slope, upper slope,
    upper constant)``, each shaped like ``lo``. Upper line: the chord of unstable neurons;
    lower line ``y >= s x`` with ``s`` 1 when the positive side is larger, else 0."""
    unstable = (lo < 0) & (hi > 0)
    safe = torch.where(unstable, hi - lo, torch.ones_like(hi))
    active = (lo >= 0).to(lo.dtype)
    up_slope = torch.where(unstable, hi / safe, active)
    up_const = torch.where(unstable, -up_slope * lo, torch.zeros_like(lo))
    lo_slope = torch.where(unstable, (hi > -lo).to(lo.dtype), active)
    return lo_slope, up_slope, up_const


class _Windows:
    """Where each row's window lies on the current feature map: the top-left corner
    (``oy``, ``ox`` ``[U]``) of each distinct spot, and each row's spot (``inv`` ``[R]``)."""

    def __init__(self, oy: Tensor, ox: Tensor, inv: Tensor) -> None:
        self.oy, self.ox, self.inv = oy, ox, inv

    def through(self, conv: Conv2d) -> _Windows:
        """The corners on the convolution's input map."""
        return _Windows(self.oy * conv.stride[0] - conv.padding[0],
                        self.ox * conv.stride[1] - conv.padding[1], self.inv)

    def _grid(self, win: tuple[int, ...], h: int, w: int
              ) -> tuple[tuple[int, ...], Tensor, Tensor]:
        """Zero padding ``(left, right, top, bottom)`` that puts every window inside the map,
        and the rows ``[U, ph, 1]`` and columns ``[U, 1, pw]`` of each window there."""
        pad = (max(0, -int(self.ox.min())), max(0, int(self.ox.max()) + win[1] - w),
               max(0, -int(self.oy.min())), max(0, int(self.oy.max()) + win[0] - h))
        ys = (self.oy + pad[2])[:, None] + torch.arange(win[0], device=self.oy.device)
        xs = (self.ox + pad[0])[:, None] + torch.arange(win[1], device=self.ox.device)
        return pad, ys[:, :, None], xs[:, None, :]

    def gather(self, maps: Tensor, win: tuple[int, ...]) -> Tensor:
        """Each row's window ``[B, R, C, ph, pw]`` of ``maps`` ``[B, C, H, W]``; zero where
        the window leaves the map."""
        pad, ys, xs = self._grid(win, *maps.shape[-2:])
        spots = F.pad(maps, pad)[:, :, ys, xs]  # [B, C, U, ph, pw]
        return spots.index_select(2, self.inv).transpose(1, 2)

    def crop(self, a: Tensor, hw: tuple[int, ...]) -> Tensor:
        """Windows ``a`` ``[B, R, C, ph, pw]`` with their entries outside the map zeroed."""
        ys = self.oy[:, None] + torch.arange(a.shape[-2], device=a.device)
        xs = self.ox[:, None] + torch.arange(a.shape[-1], device=a.device)
        inside = ((ys >= 0) & (ys < hw[0]))[:, :, None] & ((xs >= 0) & (xs < hw[1]))[:, None, :]
        return a * inside.index_select(0, self.inv)[:, None].to(a.dtype)

    def place(self, a: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Windows ``a`` ``[B, R, C, ph, pw]`` written into full maps ``[B, R, *shape]`` (the
        entries outside the map dropped: they fall on a convolution's zero padding)."""
        c, h, w = shape
        bb, r = a.shape[:2]
        pad, ys, xs = self._grid(tuple(a.shape[-2:]), h, w)
        out = a.new_zeros(bb, r, c, h + pad[2] + pad[3], w + pad[0] + pad[1])
        rows = torch.arange(r, device=a.device)[:, None, None]
        out[:, rows, :, ys[self.inv], xs[self.inv]] = a.permute(1, 3, 4, 0, 2)
        return out[..., pad[2]:pad[2] + h, pad[0]:pad[0] + w]


# Transposed convolutions of a window as one dense matrix while it has at most this many
# entries (a matrix product is several times faster than a transposed convolution of a few
# thousand small windows on a CPU); built once per layer, window size, dtype and device.
WINDOW_MATRIX_ENTRIES = 1 << 22
_WINDOW_MATRICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _conv_back(conv: Conv2d, a: Tensor, size: tuple[int, ...]) -> Tensor:
    """``A^T`` of the convolution on windows ``a`` ``[B, R, O, ph, pw]`` of its output: the
    windows ``[B, R, C, *size]`` of its input that they read."""
    lead, (o, ph, pw) = a.shape[:2], a.shape[2:]
    c = conv.weight.shape[1] * conv.groups
    weight = conv.weight
    tracked = torch.is_grad_enabled() and (a.requires_grad or weight.requires_grad)
    if o * ph * pw * c * size[0] * size[1] > WINDOW_MATRIX_ENTRIES or tracked:
        flat = transposed_conv(a.reshape(-1, o, ph, pw), weight.to(a), conv.stride,
                               conv.dilation, conv.groups)
        return flat.reshape(*lead, c, *size)
    known = _WINDOW_MATRICES.get(conv)
    if known is None or known[0] is not weight or known[1] != weight._version:
        known = (weight, weight._version, {})
        _WINDOW_MATRICES[conv] = known
    key = (ph, pw, a.dtype, a.device)
    if key not in known[2]:
        with torch.no_grad():
            eye = torch.eye(o * ph * pw, dtype=a.dtype, device=a.device).reshape(-1, o, ph, pw)
            known[2][key] = transposed_conv(eye, weight.to(a), conv.stride, conv.dilation,
                                            conv.groups).reshape(o * ph * pw, -1)
    return (a.reshape(-1, o * ph * pw) @ known[2][key]).reshape(*lead, c, *size)


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
