"""Bound propagators over the engine's network representation: interval, DeepZ, CROWN,
alpha-CROWN.

``analyze(net, lo, hi, method)`` returns a :class:`BoundAnalysis` answering ``bounds(node)``
and ``lower(node, spec, bias)`` for a batch of input boxes; ``property_lower_bounds`` is the
lower bound of ``y_label - y_j`` for every ``j != label`` (positive everywhere = certified).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from app.bounds.alpha_crown import AlphaCrownAnalysis
from app.bounds.base import (
    BoundAnalysis,
    box_lower,
    check_box,
    check_eps,
    fold_last_layer,
    input_box,
    margin_spec,
    round_outward,
)
from app.bounds.crown import CrownAnalysis
from app.bounds.deepz import DeepZAnalysis
from app.bounds.interval import IntervalAnalysis
from app.errors import InvalidInputError
from app.network import Network

METHODS: dict[str, type[BoundAnalysis]] = {
    "interval": IntervalAnalysis,
    "deepz": DeepZAnalysis,
    "crown": CrownAnalysis,
    "alpha-crown": AlphaCrownAnalysis,
}
# One pass each, no optimisation: the methods quick enough for bisections and comparisons.
QUICK_METHODS = ("interval", "deepz", "crown")
# Optimising methods run in float64 from the start (no float32 screen to repeat).
FLOAT64_METHODS = {"alpha-crown"}


# Relative slack subtracted from a margin bound, times the largest magnitude any node reaches
# on the box (IBP): far above the rounding error of the bound's own float64 (or float32) sums.
SLACK = {torch.float64: 1e-10, torch.float32: 1e-5}
_FLOAT64: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def analyze(net: Network, lo: Tensor, hi: Tensor, method: str, **options) -> BoundAnalysis:
    """Run the propagator ``method`` (one of :data:`METHODS`) on the boxes ``[lo, hi]``.

    The box is rounded outward to the network's precision; a box that is not finite,
    ordered and of the network's input shape raises :class:`InvalidInputError`.
    ``options`` go to the method (e.g. alpha-CROWN's ``iterations`` and ``time_limit``).
    """
    if method not in METHODS:
        raise InvalidInputError(f"unknown bound method {method!r}; use one of {list(METHODS)}")
    check_box(net, lo, hi)
    return METHODS[method](net, *round_outward(lo, hi, net.dtype), **options)


def property_lower_bounds(net: Network, lo: Tensor, hi: Tensor, labels: Tensor,
                          method: str) -> Tensor:
    """Float-safe lower bounds ``[B, n_out - 1]`` of ``y_label - y_j`` (``j != label``)."""
    labels = _check_labels(net, labels)
    spec = margin_spec(net.num_outputs, labels, torch.float64, lo.device)
    return spec_lower_bounds(net, lo, hi, spec, spec.new_zeros(spec.shape[:2]), method)


def spec_lower_bounds(net: Network, lo: Tensor, hi: Tensor, spec: Tensor, offset: Tensor,
                      method: str, **options) -> Tensor:
    """Float-safe lower bounds ``[B, m]`` of ``spec . y + offset`` (``spec`` ``[B, m, n_out]``).

    A positive entry holds in exact arithmetic for the network's weights: a float32 network
    is screened in float32 and, where anything looks proven, bounded again in float64; the
    result is lowered by :data:`SLACK` times the box's largest node magnitude.
    """
    if method in FLOAT64_METHODS:
        net, lo, hi = float64(net), lo.to(torch.float64), hi.to(torch.float64)
    screen = _spec_lower(net, lo, hi, spec, offset, method, **options)
    return float_safe(net, lo, hi, spec, offset, method, screen, **options)


def float_safe(net: Network, lo: Tensor, hi: Tensor, spec: Tensor, offset: Tensor,
               method: str, screen: Tensor, **options) -> Tensor:
    """``screen`` (bounds of ``spec . y + offset`` in ``net``'s precision) made float-safe."""
    if net.dtype != torch.float64 and bool((screen > 0).any()):
        # boxes with nothing positive keep their screened (non-proving) bounds
        net, rows = float64(net), (screen > 0).any(1).nonzero().squeeze(1)
        lo, hi = lo.to(torch.float64), hi.to(torch.float64)
        screen = screen.to(torch.float64).index_copy(0, rows, _spec_lower(
            net, lo[rows], hi[rows], spec[rows], offset[rows], method, **options))
    with torch.no_grad():
        lo_r, hi_r = round_outward(lo, hi, net.dtype)
        scale = torch.stack([torch.maximum(a.abs(), b.abs()).flatten(1).amax(1)
                             for a, b in net.interval_bounds(lo_r, hi_r)]).amax(0)
        scale = torch.maximum(scale.to(screen.dtype), offset.abs().amax(1).to(screen.dtype))
    return screen - SLACK.get(net.dtype, 1e-3) * scale.unsqueeze(1)


def float64(net: Network) -> Network:
    """A float64 copy of ``net``, cached while its parameters are unchanged."""
    if net.dtype == torch.float64:
        return net
    version = tuple(p._version for p in net.parameters())
    cached = _FLOAT64.get(net)
    if cached is None or cached[0] != version:
        cached = (version, net.with_dtype(torch.float64))
        _FLOAT64[net] = cached
    return cached[1]


def _spec_lower(net: Network, lo: Tensor, hi: Tensor, spec: Tensor, offset: Tensor,
                method: str, **options) -> Tensor:
    node, folded, bias = fold_last_layer(net, spec.to(net.dtype))
    return analyze(net, lo, hi, method, **options).lower(node, folded, bias + offset.to(net.dtype))


def _check_labels(net: Network, labels: Tensor) -> Tensor:
    labels = torch.as_tensor(labels, device="cpu").long().reshape(-1)  # tolist()ed
    if ((labels < 0) | (labels >= net.num_outputs)).any():
        raise InvalidInputError(f"labels must lie in [0, {net.num_outputs})")
    return labels


__all__ = [
    "METHODS",
    "QUICK_METHODS",
    "BoundAnalysis",
    "analyze",
    "box_lower",
    "check_eps",
    "float64",
    "float_safe",
    "fold_last_layer",
    "input_box",
    "margin_spec",
    "property_lower_bounds",
    "spec_lower_bounds",
]
