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
    ``[lo, hi]`` (``[B, *input_shape]``), moved one layer at a time.

    The coefficients are kept input-major, ``[B, n_input, n]``, so that each affine layer is
    one matrix product for all boxes (``[B * n_input, 2n'] @ [2n', 2n]``)."""

    def __init__(self, lo: Tensor, hi: Tensor) -> None:
        b = lo.shape[0]
        self.lo, self.hi = lo.reshape(b, -1), hi.reshape(b, -1)
        n = self.lo.shape[1]
        eye = torch.eye(n, dtype=lo.dtype, device=lo.device).expand(b, n, n)
        self.a = torch.cat([eye, eye], 2)  # [B, n_input, 2n]: lower, then upper
        self.c_l = self.c_u = lo.new_zeros(b, n)

    def affine(self, layer: AffineLayer, in_shape: tuple[int, ...]) -> Bounds:
        """Through ``layer``: positive weights keep each side, negative ones swap them.
        Returns the new node's bounds ``[B, n]`` over the boxes."""
        w, bias = (t.to(self.lo) for t in layer.matrix(in_shape))
        pos, neg = w.clamp(min=0).T, w.clamp(max=0).T
        bias = bias.reshape(-1)
        both = torch.cat([torch.cat([pos, neg], 1), torch.cat([neg, pos], 1)])  # [2n', 2n]
        b, n_in = self.a.shape[:2]
        self.a = (self.a.reshape(b * n_in, -1) @ both).reshape(b, n_in, -1)
        self.c_l, self.c_u = (self.c_l @ pos + self.c_u @ neg + bias,
                              self.c_u @ pos + self.c_l @ neg + bias)
        mid, rad = (self.hi + self.lo) / 2, (self.hi - self.lo) / 2
        centre = (mid.unsqueeze(1) @ self.a).squeeze(1)
        spread = (rad.unsqueeze(1) @ self.a.abs()).squeeze(1)
        n = w.shape[0]
        return (self.c_l + centre[:, :n] - spread[:, :n],
                self.c_u + centre[:, n:] + spread[:, n:])

    def relu(self, z_lo: Tensor, z_hi: Tensor) -> None:
        """Through a ReLU whose input lies in ``[z_lo, z_hi]`` (``[B, n]``): the lower
        function times CROWN's adaptive slope (0 or 1), the upper one through the chord
        ``u (z - l) / (u - l)``; both sound for every input in the box."""
        unstable = (z_lo < 0) & (z_hi > 0)
        active = (z_lo >= 0).to(z_lo.dtype)
        chord = torch.where(unstable, z_hi / torch.where(unstable, z_hi - z_lo, 1), active)
        slope = torch.where(unstable, (z_hi > -z_lo).to(z_lo.dtype), active)
        self.c_u = chord * (self.c_u - torch.where(unstable, z_lo, 0))
        self.a = self.a * torch.cat([slope, chord], 1).unsqueeze(1)
        self.c_l = self.c_l * slope
