"""ExactPlane: the exact partition of a triangle or parallelogram into linear regions.

A polygon carries, per live node, the node's output as an affine map of the polygon's 2-D
coordinates ``(a, b)`` (input ``p0 + a (p1 - p0) + b (p2 - p0)``). Before a ReLU or MaxPool
node, every polygon that one of the node's switching functions crosses is cut along that
function's zero line (one cut per polygon per round, all polygons at once) until none is
crossed; the node then maps the coefficients with the polygon's fixed code. A last stage cuts
by the arg-max of the logits, so every polygon has one activation pattern and one class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import ConvexHull
from torch import Tensor

from app.analyses.linear_regions.codes import first_appearance_ids, pack_codes
from app.analyses.linear_regions.points import as_batch, on_host
from app.analyses.linear_regions.rules import (
    argmax_at,
    argmax_split_functions,
    rule_for,
    tolerance,
)
from app.errors import InvalidInputError
from app.network import INPUT, Network
from app.progress import ProgressFn, report

MAX_ROUNDS = 10_000
SHAPES = {
    "triangle": [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)],
    "parallelogram": [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)],
}


@dataclass
class ExactPlane:
    """Convex polygons (in ``(a, b)`` coordinates) on each of which the network is affine.

    The input at ``(a, b)`` is ``p0 + a (p1 - p0) + b (p2 - p0)``. Every polygon is all of
    the triangle's or parallelogram's points with one activation pattern and one predicted
    class, so neighbours differ in pattern or class (and share a pattern only across a class
    boundary).
    """

    p0: np.ndarray
    p1: np.ndarray
    p2: np.ndarray
    shape: str
    polygons: list[np.ndarray]  # each [n_i, 2], counter-clockwise
    pattern_ids: np.ndarray  # [Q]
    classes: np.ndarray  # [Q]
    relu_pattern: np.ndarray  # [Q, n_relu]

    @property
    def num_polygons(self) -> int:
        return len(self.polygons)

    @property
    def num_regions(self) -> int:
        """Distinct activation patterns met in the plane."""
        return int(self.pattern_ids.max()) + 1 if len(self.pattern_ids) else 0

    def areas(self) -> np.ndarray:
        """Shoelace area of every polygon, in ``(a, b)`` units."""
        return np.array([0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], -1))
                                   - np.dot(p[:, 1], np.roll(p[:, 0], -1))) for p in self.polygons])

    def points(self, ab: np.ndarray) -> np.ndarray:
        """Inputs at the coordinates ``ab`` ``[N, 2]``."""
        ab = np.asarray(ab, dtype=np.float64)
        expand = (slice(None),) + (None,) * self.p0.ndim
        return (self.p0[None] + ab[:, 0][expand] * (self.p1 - self.p0)[None]
                + ab[:, 1][expand] * (self.p2 - self.p0)[None])


class _Polygons:
    """Convex polygons padded to ``V`` vertices by repeating vertex 0 (zero-length edges)."""

    def __init__(self, verts: Tensor, counts: Tensor, coeffs: dict[int, Tensor],
                 codes: list[Tensor]) -> None:
        self.verts = verts  # [Q, V, 2] float64
        self.counts = counts  # [Q] real vertices
        self.coeffs = coeffs  # node -> [3, Q, *shape]
        self.codes = codes  # per bending node so far: [Q, ...]

    def __len__(self) -> int:
        return len(self.verts)

    def take(self, rows: Tensor) -> _Polygons:
        return _Polygons(self.verts[rows], self.counts[rows],
                         {k: c[:, rows] for k, c in self.coeffs.items()},
                         [c[rows] for c in self.codes])

    @staticmethod
    def concat(parts: list[_Polygons]) -> _Polygons:
        width = max(p.verts.shape[1] for p in parts)
        return _Polygons(
            torch.cat([_pad(p.verts, width) for p in parts]),
            torch.cat([p.counts for p in parts]),
            {k: torch.cat([p.coeffs[k] for p in parts], 1) for k in parts[0].coeffs},
            [torch.cat(cs) for cs in zip(*(p.codes for p in parts), strict=True)],
        )

    def homogeneous(self, dtype: torch.dtype) -> Tensor:
        """Vertices as ``(1, a, b)`` rows ``[Q, V, 3]``."""
        ones = torch.ones(*self.verts.shape[:2], 1, dtype=torch.float64)
        return torch.cat([ones, self.verts], -1).to(dtype)

    def centres(self, dtype: torch.dtype) -> Tensor:
        """An interior point ``(1, a, b)`` of each polygon: the mean of its padded vertices."""
        return self.homogeneous(dtype).mean(1)

    def refine(self, split: Callable[[_Polygons], Tensor | None]) -> _Polygons:
        """Cut along ``split(polygons)``'s functions ``[3, Q, M]`` (affine in ``(a, b)``)
        until none crosses any polygon; each round cuts every crossed polygon once."""
        done: list[_Polygons] = []
        work: _Polygons = self
        gen = torch.Generator().manual_seed(0)
        for _ in range(MAX_ROUNDS):
            funcs = split(work) if len(work) else None
            if funcs is None:
                break
            need, s = _crossings(funcs, work.homogeneous(funcs.dtype), gen)
            done.append(work.take(~need))
            if not bool(need.any()):
                break
            work = work.take(need)._halves(s)
        else:
            done.append(work)
        return _Polygons.concat(done) if done else self

    def _halves(self, s: Tensor) -> _Polygons:
        """Both halves of every polygon cut by the zero line of its vertex values ``s``."""
        v = self.verts
        s = s.to(torch.float64)
        tol = tolerance(s)
        s_next, v_next = s.roll(-1, 1), v.roll(-1, 1)
        pos, neg = s > tol, s < -tol
        cross = (pos & (s_next < -tol)) | (neg & (s_next > tol))
        r = torch.where(cross, s / torch.where(cross, s - s_next, torch.ones_like(s)), 0.0)
        slots = torch.stack([v, v + r.unsqueeze(-1) * (v_next - v)], 2).reshape(len(v), -1, 2)
        (va, ca), (vb, cb) = (_compact(slots, torch.stack([keep, cross], 2).reshape(len(v), -1))
                              for keep in (~neg, ~pos))
        width = max(va.shape[1], vb.shape[1])
        rows = torch.arange(len(v)).repeat(2)
        both = self.take(rows)
        both.verts = torch.cat([_pad(va, width), _pad(vb, width)])
        both.counts = torch.cat([ca, cb])
        return both


def _crossings(funcs: Tensor, at: Tensor, gen: torch.Generator,
               chunk_elems: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """Which polygons some function crosses, and one crossing function's vertex values.

    The function is picked at random among the crossing ones (seeded), which keeps the cut
    tree shallow like a randomised binary space partition."""
    q, v, m = funcs.shape[1], at.shape[1], funcs.shape[2]
    step = max(1, chunk_elems // max(1, v * m))
    finite = funcs.abs().nan_to_num(posinf=0.0).sum(0)
    tol = 16 * torch.finfo(funcs.dtype).eps * max(1.0, float(finite.max()) if m else 1.0)
    needs, values = [], []
    for lo in range(0, q, step):
        vals = torch.einsum("kqm,qvk->qvm", funcs[:, lo:lo + step], at[lo:lo + step])
        mixed = (vals.amax(1) > tol) & (vals.amin(1) < -tol)
        score = mixed * torch.rand(mixed.shape, generator=gen, dtype=torch.float32).add_(0.5)
        which = score.argmax(1)
        needs.append(mixed.any(1))
        values.append(vals.gather(2, which.view(-1, 1, 1).expand(-1, v, 1))[..., 0])
    need = torch.cat(needs)
    return need, torch.cat(values)[need]


def _compact(slots: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Move kept vertex slots to the front (order preserved), pad with vertex 0."""
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    v = slots.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
    count = keep.sum(1)
    width = int(count.max())
    v = v[:, :width]
    valid = torch.arange(width).unsqueeze(0) < count.unsqueeze(1)
    return torch.where(valid.unsqueeze(-1), v, v[:, :1]), count


def _pad(v: Tensor, width: int) -> Tensor:
    if v.shape[1] == width:
        return v
    return torch.cat([v, v[:, :1].expand(-1, width - v.shape[1], -1)], 1)


def exact_plane(
    net: Network,
    p0: Tensor | np.ndarray,
    p1: Tensor | np.ndarray,
    p2: Tensor | np.ndarray,
    *,
    shape: str = "triangle",
    dtype: torch.dtype = torch.float64,
    progress: ProgressFn | None = None,
) -> ExactPlane:
    """Linear regions of the triangle ``p0 p1 p2`` or the parallelogram ``p0, p1, p1 + p2 - p0,
    p2`` (``shape="parallelogram"``), as convex polygons with pattern and class."""
    if shape not in SHAPES:
        raise InvalidInputError(f"shape must be one of {sorted(SHAPES)}")
    net = on_host(net, dtype)
    a, b, c = (as_batch(net, p, dtype)[0] for p in (p0, p1, p2))
    corners = torch.tensor(SHAPES[shape], dtype=torch.float64).unsqueeze(0)
    polys = _Polygons(corners, torch.tensor([corners.shape[1]]),
                      {INPUT: torch.stack([a, b - a, c - a]).unsqueeze(1)}, [])
    code_nodes: list[int] = []
    last_use = net.last_readers
    for i, layer in enumerate(net.layers):
        rule = rule_for(layer)

        polys = polys.refine(lambda p, rule=rule, layer=layer, i=i: rule.plane_split(
            layer, [p.coeffs[j] for j in net.inputs[i]], p.homogeneous(dtype)))
        code = rule.plane_code(layer, [polys.coeffs[j] for j in net.inputs[i]], polys.centres(dtype))
        if code is not None:
            polys.codes.append(code)
            code_nodes.append(i)
        with torch.no_grad():
            polys.coeffs[i] = rule.plane_forward(layer, [polys.coeffs[j] for j in net.inputs[i]], code)
        for j in net.inputs[i]:
            if last_use[j] == i:
                del polys.coeffs[j]
        report(progress, (i + 1) / (len(net.layers) + 1),
               f"layer {i + 1}/{len(net.layers)} ({layer.kind}): {len(polys.verts)} polygons")
    out = len(net.layers) - 1

    def class_funcs(p: _Polygons) -> Tensor:
        return argmax_split_functions(p.coeffs[out].reshape(3, len(p), 1, -1), p.centres(dtype))

    polys = polys.refine(class_funcs)
    report(progress, 1.0, f"{len(polys.verts)} polygons")
    logits = polys.coeffs[out].reshape(3, len(polys.verts), 1, -1)
    classes = argmax_at(logits, polys.centres(dtype))[:, 0]
    relu = set(net.relu_indices)
    relu_codes = [c.reshape(len(c), -1) for n, c in zip(code_nodes, polys.codes,
                                                        strict=True) if n in relu]
    q = len(polys.verts)
    pattern_ids = first_appearance_ids(pack_codes([c.numpy() for c in polys.codes], q))
    cells = [polys.verts[k, : int(polys.counts[k])].numpy() for k in range(q)]
    regions, first = _merge_cells(cells, pattern_ids, classes.numpy())
    relu_pattern = (torch.cat(relu_codes, 1) if relu_codes
                    else torch.zeros(q, 0, dtype=torch.bool)).numpy()
    return ExactPlane(
        p0=a.numpy(), p1=b.numpy(), p2=c.numpy(), shape=shape, polygons=regions,
        pattern_ids=pattern_ids[first], classes=classes.numpy()[first],
        relu_pattern=relu_pattern[first],
    )


def _merge_cells(cells: list[np.ndarray], pattern_ids: np.ndarray,
                 classes: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """One polygon per (pattern, class): the convex hull of its cells, and its first cell.

    The cutting also splits regions along lines where nothing changes (an arg-max candidate
    that loses on both sides), which would draw spurious edges. The points with one pattern
    and one class form a convex set (linear inequalities), which its cells tile, so their
    union is exactly their convex hull."""
    key = pattern_ids * (int(classes.max()) + 1 if len(classes) else 1) + classes
    _, first, group = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first)  # regions in order of their first cell
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    members: list[list[np.ndarray]] = [[] for _ in order]
    for cell, g in zip(cells, rank[group.ravel()], strict=True):
        members[g].append(cell)
    return [cells[first[g]] if len(m) == 1 else _hull(np.concatenate(m))
            for g, m in zip(order, members, strict=True)], first[order]


def _hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise convex hull of 2-D ``points`` (scipy's Qhull; corners only)."""
    return points[ConvexHull(points).vertices]
