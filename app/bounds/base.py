"""What every bound propagator shares: the input box, specs, per-kind lookup, MaxPool choice.

A propagator analyses a network on a batch of input boxes ``[lo, hi]`` and answers two
questions about any node ``i``: elementwise bounds of its output (``bounds(i)``) and a lower
bound of a linear function ``spec . y_i + bias`` of that output (``lower(i, spec, bias)``).
Everything else (certification, proof features) is built from those two questions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from app.errors import InvalidInputError
from app.layers import AffineLayer, MaxPool2d
from app.network import INPUT, Network


class BoundAnalysis:
    """Bounds of a network's nodes on a batch of boxes; subclasses implement one method."""

    def __init__(self, net: Network, lo: Tensor, hi: Tensor) -> None:
        check_box(net, lo, hi)
        self.net, self.lo, self.hi = net, lo, hi
        self.ibp = net.interval_bounds(lo, hi)

    def bounds(self, node: int) -> tuple[Tensor, Tensor]:
        """Elementwise lower/upper bounds of node ``node``'s output (``-1``: the input box)."""
        raise NotImplementedError

    def lower(self, node: int, spec: Tensor, bias: Tensor | None = None) -> Tensor:
        """Lower bound ``[B, m]`` of ``spec . y + bias`` with ``spec`` ``[B, m, *shape]``."""
        raise NotImplementedError

    def box(self, node: int) -> tuple[Tensor, Tensor]:
        return (self.lo, self.hi) if node == INPUT else self.ibp[node]

    def shape(self, node: int) -> tuple[int, ...]:
        return self.net.input_shape if node == INPUT else self.net.shapes[node]


def check_box(net: Network, lo: Tensor, hi: Tensor) -> None:
    """Refuse a batch of boxes that is not ``[B, *input_shape]``, finite and ordered."""
    if lo.shape != hi.shape or lo.dim() < 1 or tuple(lo.shape[1:]) != net.input_shape:
        raise InvalidInputError(f"box of shapes {tuple(lo.shape)} and {tuple(hi.shape)} does "
                                f"not fit inputs of shape {net.input_shape}")
    if not has_values(lo):
        return  # a meta (shape-only) box has no values to check
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise InvalidInputError("box bounds must be finite (no NaN or infinity)")
    if (lo > hi).any():
        raise InvalidInputError("box has a lower bound above its upper bound")


def has_values(t: Tensor) -> bool:
    """Whether ``t`` holds numbers: a ``meta`` tensor (a shape-only stand-in for another
    device) has none, so value-dependent choices take their general branch there."""
    return t.device.type != "meta"


def check_eps(eps: float | Tensor) -> Tensor:
    """``eps`` as a tensor, refused unless every entry is finite and ``>= 0``."""
    eps_t = torch.as_tensor(eps, device=eps.device if isinstance(eps, Tensor) else "cpu")
    if eps_t.dim() > 1 or not torch.isfinite(eps_t).all() or (eps_t < 0).any():
        raise InvalidInputError(f"eps must be a finite number >= 0 (or one per sample), got {eps}")
    return eps_t


def box_lower(lo: Tensor, hi: Tensor, spec: Tensor, bias: Tensor | None = None) -> Tensor:
    """Exact minimum of ``spec . y + bias`` over the box ``lo <= y <= hi`` (``[B, m]``)."""
    mid, rad = ((hi + lo) / 2).unsqueeze(1), ((hi - lo) / 2).unsqueeze(1)
    dims = tuple(range(2, spec.dim()))
    out = (spec * mid).sum(dims) - (spec.abs() * rad).sum(dims)
    return out if bias is None else out + bias


def input_box(x: Tensor, eps: float | Tensor,
              domain: tuple[float, float] | None = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    """The L-infinity ball of radius ``eps`` around ``x``, clipped to the input domain.

    ``eps`` may be one number or one per sample (``[B]``). A negative, NaN or infinite
    ``eps``, a non-finite ``x`` or an empty domain raise :class:`InvalidInputError`.
    """
    eps_t = check_eps(eps).to(x)
    if has_values(x) and not torch.isfinite(x).all():
        raise InvalidInputError("input must be finite (no NaN or infinity)")
    if domain is not None and not (math.isfinite(domain[0]) and math.isfinite(domain[1])
                                   and domain[0] <= domain[1]):
        raise InvalidInputError(f"input domain {domain} is not a finite interval")
    if eps_t.dim() == 1:
        eps_t = eps_t.reshape(-1, *([1] * (x.dim() - 1)))
    wide = x.to(torch.float64)  # the exact ball, then rounded outward to x's precision
    lo, hi = wide - eps_t.to(torch.float64), wide + eps_t.to(torch.float64)
    if domain is not None:
        lo, hi = lo.clamp(*domain), hi.clamp(*domain)
    return round_outward(lo, hi, x.dtype)


def round_outward(lo: Tensor, hi: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The box ``[lo, hi]`` in ``dtype``, rounded so that it still contains the original."""
    return _round_down(lo, dtype), -_round_down(-hi, dtype)


def _round_down(v: Tensor, dtype: torch.dtype) -> Tensor:
    """``v`` in ``dtype``, one ulp lower wherever the cast rounded up (keeps gradients)."""
    out = v.to(dtype)
    if dtype == v.dtype:
        return out
    d = out.detach()
    step = torch.where(d.to(v.dtype) > v.detach(), d - torch.nextafter(d, d.new_tensor(-torch.inf)),
                       torch.zeros_like(d))
    return out - step


def margin_spec(num_outputs: int, labels: Tensor, dtype: torch.dtype,
                device: torch.device | str | None = None) -> Tensor:
    """Rows ``e_label - e_j`` for every ``j != label``: ``[B, num_outputs - 1, num_outputs]``.

    The property "``label`` wins" holds on a box when every row's lower bound is positive.
    """
    eye = torch.eye(num_outputs, dtype=dtype, device=device)
    rows = []
    for lab in labels.tolist():
        others = [j for j in range(num_outputs) if j != lab]
        rows.append(eye[lab].unsqueeze(0) - eye[others])
    return torch.stack(rows)


def maxpool_choice(layer: MaxPool2d, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A sound linear relaxation of max pooling from input bounds.

    Per output, ``k*`` is the window input with the largest lower bound; ``y >= x[k*]``
    always holds. When that input dominates (its lower bound is at least every other
    input's upper bound) ``y == x[k*]`` exactly; otherwise ``y <= max(hi)`` is used.
    Returns ``(index, dominant, upper)``: ``index`` ``[B, C, oh*ow]`` into the flattened
    ``H*W`` input, ``dominant`` and ``upper`` ``[B, C, oh, ow]``.
    """
    b, c, h, w = lo.shape
    wl, wh = layer.windows(lo), layer.windows(hi)
    best = wl.argmax(-1, keepdim=True)
    positions = torch.arange(h * w, dtype=lo.dtype, device=lo.device).reshape(1, 1, h, w).expand(b, c, h, w)
    index = layer.windows(positions).gather(-1, best).squeeze(-1).long()
    others = wh.scatter(-1, best, -torch.inf).amax(-1)
    dominant = wl.gather(-1, best).squeeze(-1) >= others
    return index.reshape(b, c, -1), dominant, wh.amax(-1)


def fold_last_layer(net: Network, spec: Tensor) -> tuple[int, Tensor, Tensor]:
    """Push an output spec ``[B, m, n_out]`` through the final affine layer.

    Returns ``(feature_node, spec_on_features, bias)``: the same linear function expressed on
    the final layer's input, so certification and proof features use one code path.
    """
    last = net.layers[-1]
    if not isinstance(last, AffineLayer):
        return len(net.layers) - 1, spec, spec.new_zeros(spec.shape[:2])
    node = net.inputs[-1][0]
    in_shape = net.input_shape if node == INPUT else net.shapes[node]
    b, m = spec.shape[:2]
    folded = last.transpose(spec.reshape(b * m, *net.shapes[-1]), in_shape)
    bias = (spec * last.bias_map(net.shapes[-1]).to(spec)).flatten(2).sum(-1)
    return node, folded.reshape(b, m, *in_shape), bias
