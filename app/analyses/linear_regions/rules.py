"""How each layer kind bends a line or a plane: the ExactLine/ExactPlane math, once per kind.

A rule answers, for one layer, (1) where the layer's own linear behaviour changes inside the
current pieces (cuts), (2) which linear behaviour a piece gets (its code: ReLU on/off bits,
MaxPool arg-max), and (3) for planes, how the layer maps per-polygon affine coefficients.
Rules are looked up through the layer class' MRO, so every ``AffineLayer`` shares one rule.

Lines carry values at points ``[P, *shape]``; segment ``s`` joins points ``s`` and ``s + 1``
and ``valid[s]`` says whether both points lie on the same line. Planes carry per-polygon
affine maps ``[3, Q, *shape]`` (offset, d/da, d/db) of the 2-D polygon coordinates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from app.errors import UnsupportedModelError
from app.layers import Add, AffineLayer, Layer, MaxPool2d, ReLU

Cuts = tuple[Tensor, Tensor]  # (segment index [K], ratio in (0, 1) along that segment [K])


def tolerance(values: Tensor) -> float:
    """Values this close to zero count as zero: a few ulps of the layer's magnitude."""
    scale = float(values.abs().max()) if values.numel() else 1.0
    return 16 * torch.finfo(values.dtype).eps * max(1.0, scale)


def envelope_cuts(wa: Tensor, wb: Tensor, valid: Tensor, tol: float) -> Cuts | None:
    """Cuts where the arg-max of linear candidates ``[S, U, k]`` switches inside a segment.

    ``wa``/``wb`` hold the candidates at each segment's start and end. When the winner at the
    start also wins at the end (or vice versa) it wins throughout; otherwise cut where the two
    winners cross. Repeating until nothing is cut traces the upper envelope exactly.
    """
    ma, j = wa.max(-1)
    mb, k = wb.max(-1)
    fj_b = wb.gather(-1, j.unsqueeze(-1)).squeeze(-1)
    fk_a = wa.gather(-1, k.unsqueeze(-1)).squeeze(-1)
    need = (fj_b < mb - tol) & (fk_a < ma - tol) & valid.unsqueeze(-1)
    seg, u = need.nonzero(as_tuple=True)
    if seg.numel() == 0:
        return None
    gap_a = ma[seg, u] - fk_a[seg, u]
    gap_b = mb[seg, u] - fj_b[seg, u]
    return seg, gap_a / (gap_a + gap_b)


class Rule:
    """Default rule: the layer is affine in its inputs, so it never bends anything."""

    def line_cuts(self, layer: Layer, ins: list[Tensor], valid: Tensor) -> Cuts | None:
        return None

    def line_code(self, layer: Layer, ins: list[Tensor]) -> Tensor | None:
        """Per-segment code ``[S, n]`` of the layer's linear behaviour (None: always the same)."""
        return None

    def plane_split(self, layer: Layer, ins: list[Tensor], at: Tensor) -> Tensor | None:
        """Affine functions ``[3, Q, M]`` whose zero lines may cut polygons (None: no cuts).

        ``at`` ``[Q, V, 3]`` are the vertices in homogeneous form (1, a, b)."""
        return None

    def plane_code(self, layer: Layer, ins: list[Tensor], centre: Tensor) -> Tensor | None:
        """Per-polygon code, evaluated at an interior point ``centre`` ``[Q, 3]``."""
        return None

    def plane_forward(self, layer: Layer, ins: list[Tensor], code: Tensor | None) -> Tensor:
        raise NotImplementedError


class AffineRule(Rule):
    def plane_forward(self, layer: Layer, ins: list[Tensor], code: Tensor | None) -> Tensor:
        assert isinstance(layer, AffineLayer)
        c = ins[0]
        offset = layer(c[0])
        lin = layer.linear(c[1:].reshape(-1, *c.shape[2:]))
        return torch.cat([offset.unsqueeze(0), lin.reshape(2, *offset.shape)])


class AddRule(Rule):
    def plane_forward(self, layer: Layer, ins: list[Tensor], code: Tensor | None) -> Tensor:
        return ins[0] + ins[1]


class ReLURule(Rule):
    """Cuts at the zero crossings of every pre-activation; code = on/off bits."""

    def line_cuts(self, layer: Layer, ins: list[Tensor], valid: Tensor) -> Cuts | None:
        pre = ins[0].reshape(ins[0].shape[0], -1)
        tol = tolerance(pre)
        a, b = pre[:-1], pre[1:]
        cross = ((a > tol) & (b < -tol)) | ((a < -tol) & (b > tol))
        seg, n = (cross & valid.unsqueeze(1)).nonzero(as_tuple=True)
        if seg.numel() == 0:
            return None
        pa, pb = a[seg, n], b[seg, n]
        return seg, pa / (pa - pb)

    def line_code(self, layer: Layer, ins: list[Tensor]) -> Tensor:
        pre = ins[0].reshape(ins[0].shape[0], -1)
        return (pre[:-1] + pre[1:]) > 0

    def plane_split(self, layer: Layer, ins: list[Tensor], at: Tensor) -> Tensor:
        return ins[0].reshape(3, ins[0].shape[1], -1)

    def plane_code(self, layer: Layer, ins: list[Tensor], centre: Tensor) -> Tensor:
        c = ins[0].reshape(3, ins[0].shape[1], -1)
        return torch.einsum("kqn,qk->qn", c, centre) > 0

    def plane_forward(self, layer: Layer, ins: list[Tensor], code: Tensor | None) -> Tensor:
        assert code is not None
        return ins[0] * code.reshape(1, *ins[0].shape[1:]).to(ins[0].dtype)


class MaxPoolRule(Rule):
    """Cuts where a window's arg-max switches; code = the winning position per output."""

    @staticmethod
    def _windows(layer: MaxPool2d, x: Tensor) -> Tensor:
        w = layer.windows(x)
        return w.reshape(w.shape[0], -1, w.shape[-1])

    def line_cuts(self, layer: Layer, ins: list[Tensor], valid: Tensor) -> Cuts | None:
        assert isinstance(layer, MaxPool2d)
        w = self._windows(layer, ins[0])
        return envelope_cuts(w[:-1], w[1:], valid, tolerance(ins[0]))

    def line_code(self, layer: Layer, ins: list[Tensor]) -> Tensor:
        assert isinstance(layer, MaxPool2d)
        w = self._windows(layer, ins[0])
        return (w[:-1] + w[1:]).argmax(-1).to(torch.int16)

    def _coeff_windows(self, layer: MaxPool2d, c: Tensor) -> Tensor:
        """Window coefficients ``[3, Q, U, k]``; padding: offset -inf, slopes 0."""
        w = self._windows(layer, c.reshape(-1, *c.shape[2:]))
        w = w.reshape(3, c.shape[1], *w.shape[1:])
        slopes = torch.where(torch.isinf(w[1:]), torch.zeros_like(w[1:]), w[1:])
        return torch.cat([w[:1], slopes])

    def plane_split(self, layer: Layer, ins: list[Tensor], at: Tensor) -> Tensor:
        assert isinstance(layer, MaxPool2d)
        return argmax_split_functions(self._coeff_windows(layer, ins[0]), at.mean(1))

    def plane_code(self, layer: Layer, ins: list[Tensor], centre: Tensor) -> Tensor:
        assert isinstance(layer, MaxPool2d)
        return argmax_at(self._coeff_windows(layer, ins[0]), centre)

    def plane_forward(self, layer: Layer, ins: list[Tensor], code: Tensor | None) -> Tensor:
        assert isinstance(layer, MaxPool2d) and code is not None
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


_RULES: dict[type, Rule] = {
    AffineLayer: AffineRule(),
    Add: AddRule(),
    ReLU: ReLURule(),
    MaxPool2d: MaxPoolRule(),
}


def rule_for(layer: Layer) -> Rule:
    """The rule of the nearest registered class in ``layer``'s MRO."""
    for klass in type(layer).__mro__:
        if klass in _RULES:
            return _RULES[klass]
    raise UnsupportedModelError(f"linear regions: no rule for layer kind '{layer.kind}'")
