"""Exact Integrated Gradients of a conv net by sweeping the path's events unit by unit.

A unit of a conv layer sees a small window of the layer below, so along a path it bends only
where a unit of its window switches: a few percent of the path's breakpoints. The piece walk
(``line``) carries every unit through every breakpoint; this sweep keeps, for each unit of the
second ReLU, only its own knots, and meets the dense layers above only as sparse slope
changes. IG needs no values at the pieces, only integrals of the gradient, and the same
per-unit knots give those in closed form.

Forward, on ``t`` in ``[0, 1]``:

* first ReLU: its input is affine in ``t``, so each unit is on over one interval and switches
  at most once (``_Switches``);
* second ReLU (after one affine layer ``A2`` with gathered columns): unit ``k`` is piecewise
  linear, its slope changing by ``|a_j| A2[k, j]`` where a unit ``j`` of its window switches;
  its own zero crossings follow per unit (``_Knots``);
* dense tail (affine + ReLU, ...): every unit's slope changes at every event below it; the
  changes are one sparse matrix times the weights, and crossings are found on dense rows.

Backward: ``grad(t) = A1^T D1(t) A2^T D2(t) u(t)``, where ``u(t)`` is the tail's backward and
is constant between the tail's own switches. With ``Phi_k(tau) = int_0^tau D2_k u_k dt`` (per
unit, in closed form from its switches), a first-ReLU unit on over ``[lo, hi]`` integrates to
``sum_k A2[k, j] (Phi_k(hi) - Phi_k(lo))``: one lookup per (switching unit, window entry), and
one transposed layer of ``Phi(1)`` for the units that never switch.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from app.analyses.linear_regions.crossings import (
    column_entries,
    column_size,
    cumsum_down,
    cumsum_rows,
)
from app.layers import AffineLayer, Flatten, ReLU, Reshape
from app.network import Network

SMALL_PRODUCT = 1 << 21  # multiply-adds below which a dense product beats scipy's set-up
DENSE_RATIO = 4  # the middle layer's columns must be this sparse (a dense one: the walk wins)
_PLANS: weakref.WeakKeyDictionary[Network, _Plan | None] = weakref.WeakKeyDictionary()


@dataclass
class _Plan:
    """Where a network's parts sit: the first two ReLUs, the sparse affine layer between
    them, and the dense tail's weight matrices (any affine layers before the first ReLU are
    run forward and transposed as they are)."""

    relu1: int
    middle: int  # the affine node between the ReLUs (reshapes around it skipped)
    relu2: int
    tail_relus: list[int]  # ReLU nodes after the second one
    weights: list[np.ndarray]  # dense [out, in] of each affine layer after relu2 (last: logits)


def sweep_plan(net: Network) -> _Plan | None:
    """The plan for ``net``, or None when it is not ``affine+ -> ReLU -> affine (sparse
    columns) -> ReLU -> (affine -> ReLU)* -> affine`` with reshapes anywhere; remembered."""
    if net not in _PLANS:
        _PLANS[net] = _make_plan(net)
    return _PLANS[net]


def _make_plan(net: Network) -> _Plan | None:
    if not net.is_sequential:
        return None
    relus = net.relu_indices
    kinds = [isinstance(layer, ReLU | AffineLayer) for layer in net.layers]
    if len(relus) < 2 or not all(kinds) or relus[0] == 0:
        return None
    gaps = [_affine_between(net, lo, hi) for lo, hi in
            zip([-1, *relus], [*relus, len(net.layers)], strict=True)]
    if any(len(g) != 1 for g in gaps[1:]):
        return None
    middle = gaps[1][0]
    if DENSE_RATIO * column_size(net.layers[middle], net.in_shape(middle)) > int(
            np.prod(net.shapes[middle])):
        return None  # dense columns: the piece walk's matrix products win
    dtype = net.dtype
    with torch.no_grad():
        weights = [net.layers[g[0]].matrix(net.in_shape(g[0]))[0].to(dtype).numpy()
                   for g in gaps[2:]]
    return _Plan(relu1=relus[0], middle=middle, relu2=relus[1],
                 tail_relus=relus[2:], weights=weights)


def _affine_between(net: Network, lo: int, hi: int) -> list[int]:
    """The non-reshape affine nodes strictly between nodes ``lo`` and ``hi``."""
    return [i for i in range(lo + 1, hi) if not isinstance(net.layers[i], Flatten | Reshape)]


@dataclass
class _Switches:
    """Crossings of one layer's units, sorted by time: ``on0`` is the state just after 0."""

    t: np.ndarray
    unit: np.ndarray
    on0: np.ndarray


@dataclass
class SweptPath:
    """``mean_gradient = int_0^1 grad logit_target(start + t (end - start)) dt``
    (input-shaped), the path's number of linear pieces and the logits at its two ends."""

    mean_gradient: np.ndarray
    target: int
    num_pieces: int
    logits: np.ndarray  # [2, C]


@torch.no_grad()
def sweep_path(net: Network, plan: _Plan, start: np.ndarray, end: np.ndarray,
               target: int | None) -> SweptPath:
    """Sweep the segment ``start -> end`` (default target: the class predicted at ``end``)."""
    outs = net.trace(torch.from_numpy(np.stack([start, end])))
    flat = [o.reshape(2, -1).numpy() for o in outs]
    target = int(flat[-1][1].argmax()) if target is None else target
    z1 = flat[net.inputs[plan.relu1][0]]
    first, a, on1 = _affine_switches(z1[0], z1[1])
    knots = _Knots.through(net, plan.middle, first, a, flat[net.inputs[plan.relu2][0]][0])
    times, dz, slope = knots.tail_input(first, plan.weights[0])
    tail = []
    for k, node in enumerate(plan.tail_relus):
        feeds_relu = k + 1 < len(plan.tail_relus)
        switches, times, rows, post_slope = _dense_sweep(
            times, dz, flat[net.inputs[node][0]][0], slope, feeds_relu)
        tail.append(switches)
        if feeds_relu:
            dz, slope = rows @ plan.weights[k + 1].T, plan.weights[k + 1] @ post_slope

    phi, phi_end = knots.integrals(*_tail_backward(plan.weights, tail, target))
    # a first-ReLU unit on over [lo, hi] gets sum_k A2[k, j] (Phi_k(hi) - Phi_k(lo))
    layer2, in2 = net.layers[plan.middle], net.in_shape(plan.middle)
    events = ~knots.first
    at_switch = np.bincount(knots.row[events], (knots.delta * phi)[events].sum(axis=1),
                            minlength=len(first.t)) / np.abs(a[first.unit])
    whole = layer2.transpose(torch.from_numpy(phi_end).to(net.dtype).reshape(
        1, *net.shapes[plan.middle]), in2).reshape(-1).numpy()
    m = on1 * whole
    m[first.unit] += np.where(on1[first.unit], -at_switch, at_switch)
    grad = torch.from_numpy(m).to(net.dtype).reshape(1, *net.in_shape(plan.relu1))
    for node in reversed(range(plan.relu1)):
        grad = net.layers[node].transpose(grad, net.in_shape(node))
    return SweptPath(grad.reshape(start.shape).numpy(), target,
                     len(np.unique(times)) + 1, flat[-1])  # equal times: one breakpoint


def _affine_switches(z_start: np.ndarray, z_end: np.ndarray
                     ) -> tuple[_Switches, np.ndarray, np.ndarray]:
    """Switches of a ReLU whose input is affine in ``t`` (each unit switches at most once),
    the input's slope, and the units on just before ``t = 1``."""
    a = z_end - z_start
    on0, on1 = _on_after(z_start, a), _on_before(z_end, a)
    unit = np.flatnonzero(on0 != on1)
    tau = -z_start[unit] / a[unit]
    order = np.argsort(tau, kind="stable")
    return _Switches(tau[order], unit[order], on0), a, on1


def _on_after(z: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """On just after a point with value ``z`` and slope ``slope`` to its right."""
    return (z > 0) | ((z == 0) & (slope > 0))


def _on_before(z: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """On just before a point with value ``z``, approached with slope ``slope``."""
    return (z > 0) | ((z == 0) & (slope < 0))


@dataclass
class _Knots:
    """The second ReLU's input along the path. Its units come in blocks that read the same
    window (a conv's channels at one position): a row is a knot of one block, rows sorted by
    (block, t), columns the block's units. A block's ``first`` row is at ``t = 0``; the others
    are where a unit of its window switches (``row``: that switch in the first ReLU's
    ``_Switches``)."""

    units: np.ndarray  # [blocks, width] the blocks' unit ids
    block: np.ndarray  # [rows]
    t: np.ndarray  # [rows]
    row: np.ndarray  # [rows]
    first: np.ndarray  # [rows]
    delta: np.ndarray  # [rows, width] slope change (first rows: the slope at 0)
    slope: np.ndarray  # [rows, width] just after the knot
    on: np.ndarray  # [rows, width] just after the knot
    cross: tuple[np.ndarray, np.ndarray]  # (row, column) of the intervals with a zero crossing
    cross_t: np.ndarray  # where

    @classmethod
    def build(cls, units: np.ndarray, z0: np.ndarray, slope0: np.ndarray, block: np.ndarray,
              t: np.ndarray, delta: np.ndarray, row: np.ndarray) -> _Knots:
        """Knots from the values ``z0`` and slopes ``slope0`` at 0 (per unit) and the slope
        changes ``delta`` of ``block`` at ``t`` (rows in time order)."""
        k = len(units)
        blocks = np.concatenate([np.arange(k), block])
        # stable: each block's knots stay in time order; on int16 numpy sorts by radix
        order = np.argsort(blocks.astype(np.int16) if k < 1 << 15 else blocks, kind="stable")
        block = blocks[order]
        t = np.concatenate([np.zeros(k, dtype=t.dtype), t])[order]
        row = np.concatenate([np.full(k, -1), row])[order]
        delta = np.concatenate([slope0[units], delta])[order]
        first = np.ones(len(block), dtype=bool)
        first[1:] = block[1:] != block[:-1]
        slope = delta.copy()
        cumsum_rows(slope, first)
        gap = np.diff(t, prepend=0.0)
        gap[first] = 0.0
        value = (slope - delta) * gap[:, None]
        cumsum_rows(value, first)
        value += z0[units][block]
        following = np.append(t[1:], 1.0)
        following[np.append(first[1:], True)] = 1.0
        on = _on_after(value, slope)
        r, c = np.nonzero(on != _on_before(value + slope * (following - t)[:, None], slope))
        return cls(units, block, t, row, first, delta, slope, on, (r, c),
                   t[r] - value[r, c] / slope[r, c])

    @classmethod
    def through(cls, net: Network, node: int, first: _Switches, a: np.ndarray,
                z0: np.ndarray) -> _Knots:
        """Knots of affine node ``node`` (value ``z0`` at 0) fed by the first ReLU, whose
        input has slope ``a`` and switches ``first``."""
        layer, in_shape = net.layers[node], net.in_shape(node)
        width, stride = layer.shared_windows(in_shape)
        n = len(z0)
        bases = np.flatnonzero((np.arange(n) // stride) % width == 0)
        block_of = np.empty(n, dtype=np.int64)
        block_of[bases] = np.arange(len(bases))
        index, value = column_entries(layer, in_shape, first.unit, z0.dtype)
        taps = index.shape[1] // width
        index = index.reshape(len(index), width, taps)[:, 0, :]  # [switches, taps]: the base
        value = value.reshape(len(value), width, taps).transpose(0, 2, 1)  # [.., taps, width]
        j, tap = np.nonzero((value != 0).any(axis=2))
        slope = layer.linear(torch.from_numpy(first.on0 * a).reshape(1, *in_shape))
        return cls.build(bases[:, None] + np.arange(width) * stride, z0,
                         slope.reshape(-1).numpy(), block_of[index[j, tap]], first.t[j],
                         value[j, tap] * np.abs(a[first.unit[j]])[:, None], j)

    def tail_input(self, first: _Switches, w: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the dense layer ``w`` ``[out, units]`` after this ReLU: the sorted times at
        which its input's slope changes (first-ReLU switches and this layer's own crossings),
        the changes ``[times, out]`` (one sparse product), and its slope at 0."""
        times = np.concatenate([first.t, self.cross_t])
        rank = np.empty(len(times), dtype=np.int64)
        rank[np.argsort(times, kind="stable")] = np.arange(len(times))
        r, c = np.nonzero(self.on & ~self.first[:, None])
        cr, cc = self.cross
        n = self.units.size
        value = np.concatenate([self.delta[r, c], np.abs(self.slope[cr, cc])])
        at = (np.concatenate([rank[self.row[r]], rank[len(first.t):]]),
              np.concatenate([self.units[self.block[r], c], self.units[self.block[cr], cc]]))
        if len(times) * w.size <= SMALL_PRODUCT:  # (each time and unit has at most one entry)
            changes = np.zeros((len(times), n), dtype=value.dtype)
            changes[at] = value
        else:
            changes = _csr(value, *at, shape=(len(times), n))
        slope = np.zeros(n, dtype=self.slope.dtype)
        slope[self.units] = (self.delta * self.on)[self.first]
        return np.sort(times), changes @ w.T, w @ slope

    def integrals(self, u: np.ndarray, left: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``Phi_k(tau) = int_0^tau D_k(t) u_k(t) dt`` at every knot ``[rows, width]`` and at
        ``tau = 1`` ``[units]``, for ``u`` ``[pieces, units]`` constant on the pieces that
        start at ``left``."""
        width = np.diff(np.append(left, 1.0))
        table = cumsum_down(np.vstack([np.zeros((1, u.shape[1])), width[:, None] * u]))
        u_b, psi_b = u[:, self.units], table[:, self.units]  # [pieces, blocks, width]

        def psi(block: np.ndarray, t: np.ndarray) -> np.ndarray:  # int_0^t u dt, per unit
            p = np.searchsorted(left, t, side="right") - 1
            return psi_b[p, block] + u_b[p, block] * (t - left[p])[:, None]

        at = psi(self.block, self.t)
        last = np.append(self.first[1:], True)
        following = np.vstack([at[1:], at[:1]])
        following[last] = psi_b[-1]
        gained = (following - at) * self.on
        r, c = self.cross  # the state flips inside the interval
        mid = psi(self.block[r], self.cross_t)[np.arange(len(r)), c]
        gained[r, c] = np.where(self.on[r, c], mid - at[r, c], following[r, c] - mid)
        phi = gained.copy()
        cumsum_rows(phi, self.first)
        phi_end = np.zeros(u.shape[1])
        phi_end[self.units] = phi[last]
        return phi - gained, phi_end


def _csr(value: np.ndarray, row: np.ndarray, col: np.ndarray, shape: tuple[int, int]
         ) -> scipy.sparse.csr_matrix:
    """A CSR matrix of entries at distinct (``row``, ``col``), built directly: scipy's own
    constructor from coordinates also sorts every row's columns, which a product skips."""
    order = np.argsort(row.astype(np.int16) if shape[0] < 1 << 15 else row, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=shape[0]))])
    return scipy.sparse.csr_matrix((value[order], col[order], indptr), shape=shape)


def _dense_sweep(times: np.ndarray, dz: np.ndarray, z0: np.ndarray, s0: np.ndarray,
                 feeds_relu: bool) -> tuple[_Switches, np.ndarray, np.ndarray, np.ndarray]:
    """A dense layer's ReLU along the path: its input has value ``z0`` and slope ``s0`` at 0
    and changes slope by ``dz[r]`` at ``times[r]`` (sorted). Returns its crossings and, when
    it ``feeds_relu`` (another ReLU above reads it), the ReLU output's event times, slope
    changes and slope at 0."""
    slope = cumsum_down(np.vstack([s0, dz]))  # row r: after event r - 1 (row 0: after t = 0)
    width = np.diff(np.concatenate([[0.0], times, [1.0]]))
    value = cumsum_down(np.vstack([z0, slope * width[:, None]]))  # at 0, the events and 1
    on = _on_after(value[:-1], slope)
    r, k = np.nonzero(on != _on_before(value[1:], slope))
    left = np.concatenate([[0.0], times])
    t = left[r] - value[r, k] / slope[r, k]
    order = np.argsort(t, kind="stable")
    switches = _Switches(t[order], k[order], on[0])
    if not feeds_relu:
        return switches, np.sort(np.concatenate([times, t])), np.zeros(0), np.zeros(0)
    rows = np.vstack([dz * on[1:], np.zeros((len(t), dz.shape[1]))])
    rows[len(times) + np.arange(len(t)), k] = np.abs(slope[r, k])
    merged = np.argsort(np.concatenate([times, t]), kind="stable")
    return switches, np.concatenate([times, t])[merged], rows[merged], s0 * on[0]


def _tail_backward(weights: list[np.ndarray], tail: list[_Switches], target: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The tail's backward ``u = A3^T D3 ... A_L^T e_target`` on each piece between the tail
    ReLUs' switches: ``[pieces, n2]``, and the pieces' left ends."""
    times = np.concatenate([s.t for s in tail]) if tail else np.zeros(0)
    order = np.argsort(times, kind="stable")
    piece = np.empty(len(times), dtype=np.int64)
    piece[order] = np.arange(1, len(times) + 1)  # the piece a switch starts
    r = np.broadcast_to(weights[-1][target], (len(times) + 1, weights[-1].shape[1]))
    offset = len(times)
    for w, s in zip(reversed(weights[:-1]), reversed(tail), strict=True):
        offset -= len(s.t)
        flips = np.zeros((len(times) + 1, len(s.on0)), dtype=bool)
        flips[piece[offset:offset + len(s.t)], s.unit] = True
        r = r * (np.logical_xor.accumulate(flips, axis=0) ^ s.on0)
        r = _rows_times(r, w) if w is weights[0] else r @ w
    return np.asarray(r), np.concatenate([[0.0], times[order]])


def _rows_times(r: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``r @ w`` from ``r``'s first row and its row differences, sparse when consecutive rows
    differ in one unit (a single tail ReLU): one row of ``w`` per switch instead of all."""
    steps = np.diff(r, axis=0)
    steps = (steps if steps.shape[0] * w.size <= SMALL_PRODUCT else
             scipy.sparse.csr_matrix(steps)) @ w
    return cumsum_down(np.vstack([r[:1] @ w, steps]))
