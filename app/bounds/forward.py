"""Forward linear bounds (symbolic intervals, as in ReluVal and Neurify): every node's output
between two linear functions of the input, carried forward layer by layer.

Per node and box the cost is ``n_node x n_input``, against CROWN's back-substitution of each
unstable neuron through every earlier layer. On a low-dimensional input (ACAS Xu: 5) that
is far cheaper, and on the small boxes of input splitting it leaves few neurons unstable, so
CROWN (``CrownAnalysis(..., splitting=True)``) back-substitutes only those: its
intermediate bounds are never looser than either method's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.layers import AffineLayer, ReLU
from app.network import Network

Bounds = tuple[Tensor, Tensor]


def supports(net: Network) -> bool:
    """Chains of affine layers and ReLUs, starting with an affine layer."""
    return (net.is_sequential and not isinstance(net.layers[0], ReLU)
            and all(isinstance(layer, AffineLayer | ReLU) for layer in net.layers))


class ForwardBounds:
    """``A_l x + c_l <= z <= A_u x + c_u`` for the current node ``z`` on each box
    ``[lo, hi]`` (``[B, *input_shape]``), moved one layer at a time."""

    def __init__(self, lo: Tensor, hi: Tensor) -> None:
        b = lo.shape[0]
        self.lo, self.hi = lo.reshape(b, -1), hi.reshape(b, -1)
        n = self.lo.shape[1]
        self.a_l = self.a_u = torch.eye(n, dtype=lo.dtype, device=lo.device).expand(b, n, n)
        self.c_l = self.c_u = lo.new_zeros(b, n)

    def affine(self, layer: AffineLayer, in_shape: tuple[int, ...]) -> Bounds:
        """Through ``layer``: positive weights keep each side, negative ones swap them.
        Returns the new node's bounds ``[B, n]`` over the boxes."""
        w, bias = (t.to(self.lo) for t in layer.matrix(in_shape))
        pos, neg = w.clamp(min=0), w.clamp(max=0)
        bias = bias.reshape(-1)
        self.a_l, self.a_u = pos @ self.a_l + neg @ self.a_u, pos @ self.a_u + neg @ self.a_l
        self.c_l, self.c_u = (self.c_l @ pos.T + self.c_u @ neg.T + bias,
                              self.c_u @ pos.T + self.c_l @ neg.T + bias)
        lo, hi = self.lo.unsqueeze(-1), self.hi.unsqueeze(-1)
        low = self.c_l + (self.a_l.clamp(min=0) @ lo + self.a_l.clamp(max=0) @ hi).squeeze(-1)
        up = self.c_u + (self.a_u.clamp(min=0) @ hi + self.a_u.clamp(max=0) @ lo).squeeze(-1)
        return low, up

    def relu(self, z_lo: Tensor, z_hi: Tensor) -> None:
        """Through a ReLU whose input lies in ``[z_lo, z_hi]`` (``[B, n]``): the lower
        function times CROWN's adaptive slope (0 or 1), the upper one through the chord
        ``u (z - l) / (u - l)``; both sound for every input in the box."""
        unstable = (z_lo < 0) & (z_hi > 0)
        active = (z_lo >= 0).to(z_lo.dtype)
        chord = torch.where(unstable, z_hi / torch.where(unstable, z_hi - z_lo, 1), active)
        slope = torch.where(unstable, (z_hi > -z_lo).to(z_lo.dtype), active)
        self.c_u = chord * (self.c_u - torch.where(unstable, z_lo, 0))
        self.a_u = self.a_u * chord.unsqueeze(-1)
        self.a_l, self.c_l = self.a_l * slope.unsqueeze(-1), self.c_l * slope
