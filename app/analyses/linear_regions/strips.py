"""Class strips: where the predicted class changes along lines whose logits are piecewise
linear.

Where one class wins at both ends of a piece it wins throughout (the logits are affine
there). On the other pieces the upper envelope of the ``C`` logit lines is walked directly:
from the current winner, the next switch is the earliest crossing by a steeper class, and the
winner only gets steeper, so a piece needs at most ``C - 1`` steps, all pieces in lockstep.
"""

from __future__ import annotations

import numpy as np

from app.analyses.linear_regions.rules import tolerance


def _steepest_near_max(vals: np.ndarray, slope: np.ndarray, tol: float) -> np.ndarray:
    """The winner of the lines with values ``vals`` ``[K, C]`` and slopes ``slope`` just after
    the point: among the classes within ``tol`` of the maximum, the steepest."""
    near = vals >= vals.max(1, keepdims=True) - tol
    return np.where(near, slope, -np.inf).argmax(1)


def _one_switch(la: np.ndarray, d: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Pieces whose envelope is just the start's winner, then the end's: where the two cross,
    no class lies above them by more than ``tol``. Returns (which, where)."""
    rows = np.arange(len(la)) * la.shape[1]  # flat index of each row's first class
    a = rows + _steepest_near_max(la, d, tol)
    b = rows + _steepest_near_max(la + d, -d, tol)  # at r = 1, seen from the right
    flat_la, flat_d = la.ravel(), d.ravel()
    la_a, d_a = flat_la[a], flat_d[a]
    rise = flat_d[b] - d_a
    up = rise > 0
    r = np.where(up, (la_a - flat_la[b]) / np.where(up, rise, 1.0), np.nan)
    top = la_a + r * d_a
    ok = (r > 0) & (r < 1) & ((la + r[:, None] * d).max(1) <= top + tol)
    return ok, r


def _walk(la: np.ndarray, d: np.ndarray, span: np.ndarray, tol: float,
          min_gap: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The switches of the pieces ``la + r d`` ``[K, C]`` by walking their envelopes, all
    pieces in lockstep: from the current winner, the next switch is the earliest crossing by
    a steeper class. Returns one (piece, switch number, r) triple of arrays per step."""
    base = np.arange(len(la)) * la.shape[1]
    flat_la, flat_d = la.ravel(), d.ravel()
    top_end = (la + d).max(1)
    act = np.arange(len(la))
    cur = _steepest_near_max(la, d, tol)
    r0, last = np.zeros(len(la)), np.zeros(len(la))
    count = np.zeros(len(la), dtype=np.int64)
    found = []
    for _ in range(la.shape[1]):
        lead_la, lead_d = flat_la[base[act] + cur], flat_d[base[act] + cur]
        # a class beats the winner at r = 1 by more than tol: it crosses it before 1
        go = top_end[act] - (lead_la + lead_d) > tol
        act, lead_la, lead_d = act[go], lead_la[go], lead_d[go]
        if not len(act):
            break
        a_la, a_d = la[act], d[act]
        rise = a_d - lead_d[:, None]
        up = rise > 0
        r = (lead_la[:, None] - a_la) / np.where(up, rise, 1.0)
        r[~up | (r <= r0[act, None])] = np.inf
        nxt = r.min(1)
        go = nxt < 1
        act, nxt = act[go], nxt[go]
        if not len(act):
            break
        sp = span[act]
        rec = ((nxt - last[act]) * sp >= min_gap) & ((1 - nxt) * sp >= min_gap)
        k_rec = act[rec]
        count[k_rec] += 1
        last[k_rec] = nxt[rec]
        found.append((k_rec, count[k_rec], nxt[rec]))
        r0[act] = nxt
        cur = _steepest_near_max(la[act] + nxt[:, None] * d[act], d[act], tol)
    return found


def envelope_switches(la: np.ndarray, lb: np.ndarray, span: np.ndarray, tol: float,
                      min_gap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the arg-max of ``la + r (lb - la)`` ``[K, C]`` switches for ``r`` in (0, 1).

    Returns (piece ``k``, switch number ``j`` >= 1 within the piece, ``r``); switches closer
    than ``min_gap`` (in units of ``span[k] * r``) to the previous one or to the end are left
    out, so consecutive switches of a piece are numbered without gaps. Most pieces switch
    once, between their two end winners; only the others walk the envelope step by step."""
    d = lb - la
    one, r_one = _one_switch(la, d, tol)
    keep = one & (r_one * span >= min_gap) & ((1 - r_one) * span >= min_gap)
    k1 = np.flatnonzero(keep)
    found = [(k1, np.ones(len(k1), dtype=np.int64), r_one[k1])]
    act = np.flatnonzero(~one)
    if len(act):
        found += [(act[k], j, r) for k, j, r in _walk(la[act], d[act], span[act], tol, min_gap)]
    k, j, r = (np.concatenate(x) for x in zip(*found, strict=True))
    return k, j, r


def class_strips(ts: np.ndarray, line: np.ndarray, valid: np.ndarray, logits: np.ndarray,
                 n_lines: int, min_gap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class strips of ``n_lines`` lines from their points ``ts`` ``[P]`` (sorted by line,
    then t), ``line`` ``[P]``, segment validity ``valid`` ``[P - 1]`` and exact ``logits``
    ``[P, C]``.

    Returns ``(class_ts, labels, bounds)``: line ``k``'s strips start at
    ``class_ts[bounds[k] + k : bounds[k + 1] + k]`` and its last one ends at
    ``class_ts[bounds[k + 1] + k]`` = 1; their classes are ``labels[bounds[k]:bounds[k + 1]]``.
    """
    winner = logits.argmax(1)
    split = np.flatnonzero(valid & (winner[:-1] != winner[1:]))
    span = ts[split + 1] - ts[split]
    la, lb = logits[split], logits[split + 1]
    ev_k, ev_j, ev_r = envelope_switches(la, lb, span, tolerance(logits), min_gap)
    # entries: each valid segment's start with its winner, then its switches (if split)
    n_sub = np.bincount(ev_k, minlength=len(split)) + 1  # sub-pieces of each split segment
    count = valid.astype(np.int64)
    count[split] = n_sub
    t, lab = np.repeat(ts[:-1], count), np.repeat(winner[:-1], count)
    if len(split):  # sub-pieces of split segments take the class at their midpoint
        sub_first = np.cumsum(n_sub) - n_sub  # each split segment's first sub-piece
        owner = np.repeat(np.arange(len(split)), n_sub)
        pos = np.arange(len(owner)) + ((np.cumsum(count) - count)[split] - sub_first)[owner]
        at_ev = sub_first[ev_k] + ev_j  # the sub-piece that starts at each switch
        r_lo, r_hi = np.zeros(len(owner)), np.ones(len(owner))
        r_lo[at_ev] = r_hi[at_ev - 1] = ev_r
        t[pos[at_ev]] = ts[split[ev_k]] + ev_r * span[ev_k]
        mid = (r_lo + r_hi) / 2
        lab[pos] = (la[owner] + mid[:, None] * (lb - la)[owner]).argmax(1)
    ln = np.repeat(line[:-1], count)
    start = np.ones(len(t), dtype=bool)
    start[1:] = (lab[1:] != lab[:-1]) | (ln[1:] != ln[:-1])
    t, lab, ln = t[start], lab[start], ln[start]
    bounds = np.searchsorted(ln, np.arange(n_lines + 1))
    class_ts = np.empty(len(t) + n_lines)
    class_ts[np.arange(len(t)) + ln] = t
    class_ts[bounds[1:] + np.arange(n_lines)] = 1.0  # each line's last strip ends at t = 1
    return class_ts, lab, bounds
