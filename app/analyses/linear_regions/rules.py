"""How each layer kind bends a line or a plane: the ExactLine/ExactPlane math, once per kind.

A rule answers, for one layer, (1) where the layer's own linear behaviour changes inside the
current pieces (cuts), (2) which linear behaviour a piece gets (its code: ReLU on/off bits,
MaxPool arg-max), (3) for planes, how the layer maps per-polygon affine coefficients, and
(4) for exact gradients along a line, the layer's transposed Jacobian on a piece with a code.
Rules are looked up through the layer class' MRO, so every ``AffineLayer`` shares one rule.

Lines carry values at points as numpy arrays ``[P, *shape]`` (their bookkeeping is many small
index operations, where numpy's per-call cost is several times lower than torch's); segment
``s`` joins points ``s`` and ``s + 1`` and ``valid[s]`` says whether both points lie on the
same line. Planes carry per-polygon affine maps ``[3, Q, *shape]`` (offset, d/da, d/db) of the
2-D polygon coordinates as torch tensors.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

from app.layers import (
    Add,
    AffineLayer,
    Flatten,
    KindTable,
    Layer,
    Linear,
    MaxPool2d,
    ReLU,
    Reshape,
)

Cuts = tuple[np.ndarray, np.ndarray]  # (segment index [K], ratio in (0, 1) along it [K])
L = TypeVar("L", bound=Layer)  # the layer kind a rule is for
A = TypeVar("A", bound=AffineLayer)


def tolerance(values: Tensor | np.ndarray) -> float:
    """Values this close to zero count as zero: a few ulps of the layer's magnitude."""
    if isinstance(values, Tensor):
        scale = float(values.abs().max()) if values.numel() else 1.0
        eps = torch.finfo(values.dtype).eps
    else:  # max and -min: no |values| copy on the line walk's hot path
        scale = max(float(values.max()), -float(values.min())) if values.size else 1.0
        eps = float(np.finfo(values.dtype).eps)
    return 16 * eps * max(1.0, scale)


def envelope_cuts(wa: np.ndarray, wb: np.ndarray, valid: np.ndarray, tol: float) -> Cuts | None:
    """Cuts where the arg-max of linear candidates ``[S, U, k]`` switches inside a segment.

    ``wa``/``wb`` hold the candidates at each segment's start and end. When the winner at the
    start also wins at the end (or vice versa) it wins throughout; otherwise cut where the two
    winners cross. Repeating until nothing is cut traces the upper envelope exactly.
    """
    units, k = wa.shape[1], wa.shape[2]
    wa, wb = wa.reshape(-1, k), wb.reshape(-1, k)
    rows = np.arange(len(wa))
    win_a, win_b = wa.argmax(1), wb.argmax(1)
    gap_a = wa[rows, win_a] - wa[rows, win_b]  # how far the end's winner trails at the start
    gap_b = wb[rows, win_b] - wb[rows, win_a]
    flat = np.flatnonzero((gap_a > tol) & (gap_b > tol))
    flat = flat[valid[flat // units]]
    if not len(flat):
        return None
    return flat // units, gap_a[flat] / (gap_a[flat] + gap_b[flat])


def relu_crossings(pre: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """Segment, ratio and unit of every zero crossing of the pre-activations ``[P, n]``: a unit
    above ``tol`` at one end of a valid segment and below ``-tol`` at the other. Candidates are
    the sign changes, found on the flat array (a 2-D ``nonzero`` is several times slower), and
    are then checked against ``tol``."""
    units = pre.shape[1]
    neg = np.signbit(pre)
    flat = np.flatnonzero(neg[:-1] != neg[1:])  # index s * units + n: unit n on segment s
    seg, unit = np.divmod(flat, units)
    values = pre.ravel()
    pa, pb = values[flat], values[flat + units]
    tol = tolerance(pre)
    keep = valid[seg] & (np.abs(pa) > tol) & (np.abs(pb) > tol)
    pa, pb = pa[keep], pb[keep]
    return seg[keep], pa / (pa - pb), unit[keep]


class Rule(Generic[L]):
    """Default rule: the layer is affine in its inputs, so it never bends anything."""

    line_rounds = 0  # rounds of cuts until no segment bends (ReLU: one; arg-max: several)

    def line_cuts(self, layer: L, ins: list[np.ndarray], valid: np.ndarray) -> Cuts | None:
        return None

    def line_code(self, layer: L, ins: list[np.ndarray]) -> np.ndarray | None:
        """Per-segment code ``[S, n]`` of the layer's linear behaviour (None: always the same)."""
        return None

    def line_forward(self, layer: L, ins: list[np.ndarray]) -> np.ndarray:
        """The layer's output at the points (torch does the math, numpy shares the memory)."""
        with torch.no_grad():
            return layer(*(torch.from_numpy(v) for v in ins)).numpy()

    def line_backward(self, layer: L, grad: Tensor, code: np.ndarray | None,
                      in_shape: tuple[int, ...]) -> Tensor | None:
        """``J^T grad`` for rows ``grad`` ``[G, *out_shape]`` on pieces with codes ``[G, n]``;
        None where the rule has no closed form (callers fall back to autograd)."""
        return None

    def plane_split(self, layer: L, ins: list[Tensor], at: Tensor) -> Tensor | None:
        """Affine functions ``[3, Q, M]`` whose zero lines may cut polygons (None: no cuts).

        ``at`` ``[Q, V, 3]`` are the vertices in homogeneous form (1, a, b)."""
        return None

    def plane_code(self, layer: L, ins: list[Tensor], centre: Tensor) -> Tensor | None:
        """Per-polygon code, evaluated at an interior point ``centre`` ``[Q, 3]``."""
        return None

    def plane_forward(self, layer: L, ins: list[Tensor], code: Tensor | None) -> Tensor:
        raise NotImplementedError


class AffineRule(Rule[A]):
    def line_forward(self, layer: A, ins: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():  # ``A x + b`` as in ``forward``, the bias added in place
            out = layer.linear(torch.from_numpy(ins[0]))  # a new tensor (reshapes: below)
            out += layer.bias_map(tuple(out.shape[1:])).to(out)
            return out.numpy()

    def line_backward(self, layer: A, grad: Tensor, code: np.ndarray | None,
                      in_shape: tuple[int, ...]) -> Tensor:
        return layer.transpose(grad, in_shape)

    def plane_forward(self, layer: A, ins: list[Tensor], code: Tensor | None) -> Tensor:
        c = ins[0]
        offset = layer(c[0])
        lin = layer.linear(c[1:].reshape(-1, *c.shape[2:]))
        return torch.cat([offset.unsqueeze(0), lin.reshape(2, *offset.shape)])


class LinearRule(AffineRule[Linear]):
    """Fully connected layers on lines: one numpy matrix product (torch's per-call cost is
    several times numpy's, and tiny nets' walks are mostly per-call cost)."""

    def line_forward(self, layer: Linear, ins: list[np.ndarray]) -> np.ndarray:
        out = ins[0] @ layer.weight.detach().numpy().T
        out += layer.bias.detach().numpy()
        return out


class ReshapeRule(AffineRule[AffineLayer]):
    """Flatten/Reshape: a bias-free row-major reshape, done by numpy on lines (no torch call)."""

    def line_forward(self, layer: AffineLayer, ins: list[np.ndarray]) -> np.ndarray:
        x = ins[0]
        return x.reshape(len(x), *(layer.shape if isinstance(layer, Reshape) else (-1,)))


class AddRule(Rule[Add]):
    def line_forward(self, layer: Add, ins: list[np.ndarray]) -> np.ndarray:
        return ins[0] + ins[1]

    def plane_forward(self, layer: Add, ins: list[Tensor], code: Tensor | None) -> Tensor:
        return ins[0] + ins[1]


class ReLURule(Rule[ReLU]):
    """Cuts at the zero crossings of every pre-activation; code = on/off bits."""

    line_rounds = 1  # every zero crossing of an affine function is found at once

    def line_cuts(self, layer: ReLU, ins: list[np.ndarray], valid: np.ndarray) -> Cuts | None:
        seg, ratio, _ = relu_crossings(ins[0].reshape(ins[0].shape[0], -1), valid)
        return (seg, ratio) if len(seg) else None

    def line_code(self, layer: ReLU, ins: list[np.ndarray]) -> np.ndarray:
        pre = ins[0].reshape(ins[0].shape[0], -1)
        return (pre[:-1] + pre[1:]) > 0

    def line_forward(self, layer: ReLU, ins: list[np.ndarray]) -> np.ndarray:
        return np.maximum(ins[0], 0)

    def line_backward(self, layer: ReLU, grad: Tensor, code: np.ndarray | None,
                      in_shape: tuple[int, ...]) -> Tensor:
        assert code is not None
        return grad.masked_fill_(~torch.from_numpy(code).reshape(grad.shape), 0.0)

    def plane_split(self, layer: ReLU, ins: list[Tensor], at: Tensor) -> Tensor:
        return ins[0].reshape(3, ins[0].shape[1], -1)

    def plane_code(self, layer: ReLU, ins: list[Tensor], centre: Tensor) -> Tensor:
        c = ins[0].reshape(3, ins[0].shape[1], -1)
        return torch.einsum("kqn,qk->qn", c, centre) > 0

    def plane_forward(self, layer: ReLU, ins: list[Tensor], code: Tensor | None) -> Tensor:
        assert code is not None
        return ins[0] * code.reshape(1, *ins[0].shape[1:]).to(ins[0].dtype)


class MaxPoolRule(Rule[MaxPool2d]):
    """Cuts where a window's arg-max switches; code = the winning position per output."""

    line_rounds = 64  # arg-max tracing needs at most k - 1 rounds per window of k candidates

    @staticmethod
    def _windows(layer: MaxPool2d, x: Tensor) -> Tensor:
        w = layer.windows(x)
        return w.reshape(w.shape[0], -1, w.shape[-1])

    def line_cuts(self, layer: MaxPool2d, ins: list[np.ndarray], valid: np.ndarray) -> Cuts | None:
        w = self._windows(layer, torch.from_numpy(ins[0])).numpy()
        return envelope_cuts(w[:-1], w[1:], valid, tolerance(ins[0]))

    def line_code(self, layer: MaxPool2d, ins: list[np.ndarray]) -> np.ndarray:
        w = self._windows(layer, torch.from_numpy(ins[0])).numpy()
        return (w[:-1] + w[1:]).argmax(-1).astype(np.int16)

    def _coeff_windows(self, layer: MaxPool2d, c: Tensor) -> Tensor:
        """Window coefficients ``[3, Q, U, k]``; padding: offset -inf, slopes 0."""
        w = self._windows(layer, c.reshape(-1, *c.shape[2:]))
        w = w.reshape(3, c.shape[1], *w.shape[1:])
        slopes = torch.where(torch.isinf(w[1:]), torch.zeros_like(w[1:]), w[1:])
        return torch.cat([w[:1], slopes])

    def plane_split(self, layer: MaxPool2d, ins: list[Tensor], at: Tensor) -> Tensor:
        return argmax_split_functions(self._coeff_windows(layer, ins[0]), at.mean(1))

    def plane_code(self, layer: MaxPool2d, ins: list[Tensor], centre: Tensor) -> Tensor:
        return argmax_at(self._coeff_windows(layer, ins[0]), centre)

    def plane_forward(self, layer: MaxPool2d, ins: list[Tensor], code: Tensor | None) -> Tensor:
        assert code is not None
        w = self._coeff_windows(layer, ins[0])
        out = w.gather(-1, code.unsqueeze(0).unsqueeze(-1).expand(3, *code.shape, 1))
        q = ins[0].shape[1]
        c, h, wd = layer(ins[0][0, :1]).shape[1:]
        return out.reshape(3, q, c, h, wd)


def argmax_at(w: Tensor, centre: Tensor) -> Tensor:
    """Winner ``[Q, U]`` among affine candidates ``[3, Q, U, k]`` at points ``[Q, 3]``."""
    finite = torch.nan_to_num(w, neginf=torch.finfo(w.dtype).min / 4)
    return torch.einsum("kquc,qk->quc", finite, centre).argmax(-1)


def argmax_split_functions(w: Tensor, centre: Tensor) -> Tensor:
    """``winner - candidate`` ``[3, Q, U * k]`` for the winner at ``centre``: where one of them
    changes sign inside a polygon, another candidate overtakes the winner there."""
    j = argmax_at(w, centre).unsqueeze(-1)
    best = w.gather(-1, j.unsqueeze(0).expand(3, *j.shape))
    diff = best - w
    return diff.reshape(3, diff.shape[1], -1)


rule_for: KindTable[Rule[Any]] = KindTable("linear regions: no rule for", {
    AffineLayer: AffineRule(),
    Linear: LinearRule(),
    Flatten: ReshapeRule(),
    Reshape: ReshapeRule(),
    Add: AddRule(),
    ReLU: ReLURule(),
    MaxPool2d: MaxPoolRule(),
})

