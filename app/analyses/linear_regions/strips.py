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


def _leader(la: np.ndarray, d: np.ndarray, r: np.ndarray, tol: float) -> np.ndarray:
    """The winner just after ``r`` of the lines ``la + r d`` ``[K, C]``: among the classes
    within ``tol`` of the maximum at ``r``, the steepest."""
    vals = la + r[:, None] * d
    near = vals >= vals.max(1, keepdims=True) - tol
    return np.where(near, d, -np.inf).argmax(1)


def _one_switch(la: np.ndarray, d: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Pieces whose envelope is just the start's winner, then the end's: where the two cross,
    no class lies above them by more than ``tol``. Returns (which, where)."""
    rows = np.arange(len(la))
    a = _leader(la, d, np.zeros(len(la)), tol)
    b = _leader(la + d, -d, np.zeros(len(la)), tol)  # at r = 1, seen from the right
    rise = d[rows, b] - d[rows, a]
    up = rise > 0
    r = np.where(up, (la[rows, a] - la[rows, b]) / np.where(up, rise, 1.0), np.nan)
    top = la[rows, a] + r * d[rows, a]
    ok = (r > 0) & (r < 1) & ((la + r[:, None] * d).max(1) <= top + tol)
    return ok, r


def envelope_switches(la: np.ndarray, lb: np.ndarray, span: np.ndarray, tol: float,
                      min_gap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the arg-max of ``la + r (lb - la)`` ``[K, C]`` switches for ``r`` in (0, 1).

    Returns (piece ``k``, switch number ``j`` >= 1 within the piece, ``r``); switches closer
    than ``min_gap`` (in units of ``span[k] * r``) to the previous one or to the end are left
    out, so consecutive switches of a piece are numbered without gaps. Most pieces switch
    once, between their two end winners; only the others walk the envelope step by step."""
    k_all, c = la.shape
    d = lb - la
    one, r_one = _one_switch(la, d, tol)
    keep = one & (r_one * span >= min_gap) & ((1 - r_one) * span >= min_gap)
    k1 = np.flatnonzero(keep)
    found = [(k1, np.ones(len(k1), dtype=np.int64), r_one[k1])]
    act = np.flatnonzero(~one)
    r0, last = np.zeros(k_all), np.zeros(k_all)
    count = np.zeros(k_all, dtype=np.int64)
    cur = _leader(la[act], d[act], r0[act], tol)
    for _ in range(c if len(act) else 0):
        a_la, a_d = la[act], d[act]
        idx = np.arange(len(act))
        lead_la, lead_d = a_la[idx, cur], a_d[idx, cur]
        # a class beats the winner at r = 1 by more than tol: it crosses it before 1
        go = (a_la + a_d).max(1) - (lead_la + lead_d) > tol
        rise = a_d - lead_d[:, None]
        up = rise > 0
        r = (lead_la[:, None] - a_la) / np.where(up, rise, 1.0)
        r[~up | (r <= r0[act, None])] = np.inf
        nxt = r.min(1)
        go &= nxt < 1
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
        cur = _leader(la[act], d[act], nxt, tol)
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
    count = valid.astype(np.int64)  # entries per segment: 1, plus the switches inside it
    count[split] += np.bincount(ev_k, minlength=len(split))
    offset = np.cumsum(count) - count
    total = int(offset[-1] + count[-1]) if len(count) else 0
    t = np.empty(total)
    lab = np.empty(total, dtype=np.int64)
    seg = np.flatnonzero(valid)
    t[offset[seg]], lab[offset[seg]] = ts[seg], winner[seg]
    if len(split):  # pieces of split segments take the class at their midpoint
        r_at = np.zeros(total + 1)
        pos_ev = offset[split[ev_k]] + ev_j
        t[pos_ev] = ts[split[ev_k]] + ev_r * span[ev_k]
        r_at[pos_ev] = ev_r
        n_sub = count[split]
        owner = np.repeat(np.arange(len(split)), n_sub)
        within = np.arange(len(owner)) - np.repeat(np.cumsum(n_sub) - n_sub, n_sub)
        pos = offset[split][owner] + within
        r_end = np.where(within + 1 < n_sub[owner], r_at[pos + 1], 1.0)
        mid = (r_at[pos] + r_end) / 2
        lab[pos] = (la[owner] + mid[:, None] * (lb - la)[owner]).argmax(1)
    ln = np.repeat(line[:-1], count)
    start = np.ones(total, dtype=bool)
    start[1:] = (lab[1:] != lab[:-1]) | (ln[1:] != ln[:-1])
    t, lab, ln = t[start], lab[start], ln[start]
    bounds = np.searchsorted(ln, np.arange(n_lines + 1))
    class_ts = np.empty(len(t) + n_lines)
    class_ts[np.arange(len(t)) + ln] = t
    class_ts[bounds[1:] + np.arange(n_lines)] = 1.0  # each line's last strip ends at t = 1
    return class_ts, lab, bounds
