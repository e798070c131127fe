"""The second hidden layer from its critical points, without inverting the first layer.

A first layer with more neurons than inputs cannot be inverted (and an ill-conditioned one
should not be), and its rows are only known up to sign. The sign does not have to be known
first: ``relu(-z) = relu(z) - z``, so with rows of arbitrary sign every
second-layer pre-activation is still exactly

    u(x) = a . relu(z(x)) + e . x + c,       e = -sum over flipped rows i of a_i w_i,

linear in the unknowns ``(a, e, c)``. A critical point ``x_p`` of that neuron gives ``d + 1``
linear equations: the Jacobian jump across it, ``+-(W^T D_p a + e)`` (``D_p``: which first-layer
units are on at ``x_p``; the sign says which side is active and is not observable locally), and
``u(x_p) = 0``. Points are grouped into neurons by growing consistent sets from random triples
(the output direction of a jump, which is the neuron's output weight column, splits them first).
Then ``e`` yields the first-layer signs, and a least-squares fit of the outputs on
``[relu(u_j), u_j, 1]`` yields the output layer and the sign of each ``u_j``
(``relu(-u) = relu(u) - u`` again).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from app.analyses.extraction.lines import Hyperplane

FIT_RTOL = 1e-7  # output fit counted exact below this relative residual (as for one layer)
MAX_OPEN_FLIPS = 10  # first-layer signs left open that are searched exhaustively
FIT_TOL = 1e-6  # relative residual of a neuron's equations still counted as consistent
NULL_RTOL = 1e-6  # singular values below this fraction of the largest span a null space
SAME_OUTPUT_COS = 1 - 1e-6  # jumps of one neuron share their output direction
SEED_RCOND = 1e-3  # seeds fit without their weak directions, so a wrong triple cannot hide
LEVERAGE_GAP = 1e-6  # a member with leverage this close to one is unchecked by the others
OUTLIER_RTOL = 1e-4  # a member the others mispredict by more than this is dropped
TIGHT_RTOL = 1e-7  # and from a followed boundary, when few are, by more than this
MAX_MISSES = 25  # seeds in a row that grow into no neuron end a round
NEAR_CANDIDATES = 24  # while a set has a null space, candidates tried per round
MIN_CHECKS = 2  # equations of a candidate point that the members' freedom cannot absorb


@dataclass
class Critical:
    """Critical points of deeper neurons with their Jacobian jumps.

    ``g[p]`` is the jump mixed along its own output direction ``out[p]`` (sign fixed by the
    slope jump along the line, which always has the sign of the output weights), so points of
    one neuron have ``g = +-|v| grad u``.
    """

    x: np.ndarray  # [m, d]
    g: np.ndarray  # [m, d]
    out: np.ndarray  # [m, k], unit rows


@dataclass
class Neuron:
    """One recovered second-layer neuron: ``u = a . relu(z) + e . x + c`` and its points."""

    a: np.ndarray
    e: np.ndarray
    c: float
    members: np.ndarray
    signs: np.ndarray
    rank_deficit: int


def critical_points(planes: list[Hyperplane]) -> Critical:
    """The points of deeper boundaries with what the equations need."""
    xs, gs, outs = [], [], []
    for plane in planes:
        if plane.jump is None or plane.slope_jump is None:
            continue
        out = plane.slope_jump / np.linalg.norm(plane.slope_jump)
        g = plane.jump.T @ out
        for x in plane.points:
            xs.append(x)
            gs.append(g)
            outs.append(out)
    d = planes[0].normal.shape[0] if planes else 0
    if not xs:
        return Critical(np.zeros((0, d)), np.zeros((0, d)), np.zeros((0, 1)))
    return Critical(np.stack(xs), np.stack(gs), np.stack(outs))


class _System:
    """Per-point equation blocks ``M_p theta = [sigma_p g_p, 0]`` for ``theta = [a, e, c]``."""

    def __init__(self, pts: Critical, weight: np.ndarray, bias: np.ndarray,
                 deadline: float | None = None) -> None:
        m, d = pts.x.shape
        n = len(bias)
        z = pts.x @ weight.T + bias
        on = (z > 0).astype(np.float64)
        mg = np.zeros((m, d, n + d + 1))
        mg[:, :, :n] = weight.T[None] * on[:, None, :]
        mg[:, :, n:n + d] = np.eye(d)[None]
        mz = np.hstack([np.maximum(z, 0.0), pts.x, np.ones((m, 1))])
        scale = np.linalg.norm(pts.g, axis=1) / np.linalg.norm(mz, axis=1)
        self.rows = torch.from_numpy(np.concatenate([mg, (scale[:, None] * mz)[:, None]], 1))
        self.rhs = torch.from_numpy(np.hstack([pts.g, np.zeros((m, 1))]))
        self.n, self.d = n, d
        self.on = z > 0
        self.deadline = deadline

    def late(self) -> bool:
        """Past the deadline: every loop of the grouping stops with what it has."""
        return self.deadline is not None and time.perf_counter() > self.deadline

    def fit(self, sets: torch.Tensor, signs: torch.Tensor,
            rcond: float | None = SEED_RCOND) -> tuple[torch.Tensor, torch.Tensor]:
        """Least squares for each row of ``sets`` ``[B, s]`` with ``signs`` ``[B, s]``.

        Returns ``theta`` ``[B, P]`` and the relative residual ``[B]``.
        """
        b, s = sets.shape
        a = self.rows[sets].reshape(b, s * (self.d + 1), -1)
        rhs = (self.rhs[sets] * signs[..., None]).reshape(b, -1, 1)
        theta = torch.linalg.lstsq(a, rhs, rcond=rcond, driver="gelsd").solution
        res = torch.linalg.vector_norm(a @ theta - rhs, dim=(1, 2))
        return theta[..., 0], res / torch.linalg.vector_norm(rhs, dim=(1, 2))


def group_neurons(pts: Critical, weight: np.ndarray, bias: np.ndarray,
                  start: list[Neuron] = (), min_members: int = 8,
                  deadline: float | None = None) -> list[Neuron]:
    """Partition the critical points into neurons whose equations are jointly consistent.

    Neurons in ``start`` (found on a prefix of the same points) first take the new points
    that fit them. Seeds are triples of points with one output direction whose equations
    (under one of the four relative signs) are consistent; the most consistent seeds are grown
    first, rounds repeat on the points left over, and sets of one neuron are merged. Past
    ``deadline`` (a ``time.perf_counter()`` value) every loop stops with the sets it has.
    """
    if not len(pts.x):
        return list(start)
    system = _System(pts, weight, bias, deadline)
    on = system.on
    free = np.ones(len(pts.x), dtype=bool)
    for n in start:
        free[n.members] = False
    neurons: list[Neuron] = []
    for group in _output_groups(pts.out):
        sets: list[tuple[np.ndarray, np.ndarray]] = []
        for n in start:
            if np.isin(n.members, group).all():
                free[n.members] = True
                sets.append(_verified(system, *_grow(system, group[free[group]], n.members,
                                                     n.signs)))
                free[sets[-1][0]] = False
        found = True
        while found and free[group].sum() >= min_members and not system.late():
            found = False
            pool = group[free[group]]
            triples, signs = _consistent_triples(system, pool, on[pool])
            misses = 0
            for triple, sign in zip(triples, signs, strict=True):
                if system.late():
                    break
                if not free[triple].all():
                    continue
                members, member_signs = _verified(
                    system, *_grow(system, group[free[group]], triple, sign))
                if len(members) >= min_members:
                    free[members] = False
                    sets.append((members, member_signs))
                    found, misses = True, 0
                elif (misses := misses + 1) >= MAX_MISSES:
                    break
        for members, member_signs in _merged(system, sets):
            free[members] = True
            members, member_signs = _verified(
                system, *_grow(system, group[free[group]], members, member_signs))
            free[members] = False
            neurons.append(_neuron(system, members, member_signs))
    return neurons


def _merged(system: _System, sets: list[tuple[np.ndarray, np.ndarray]]
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Join sets whose points are jointly consistent (one neuron seen from two seeds)."""
    sets = list(sets)
    i = 0
    while i < len(sets):
        j = i + 1
        while j < len(sets) and not system.late():
            (mi, si), (mj, sj) = sets[i], sets[j]
            joint = np.concatenate([mi, mj])
            signs = next((np.concatenate([si, flip * sj]) for flip in (1.0, -1.0)
                          if _consistent(system, joint, np.concatenate([si, flip * sj]))), None)
            if signs is None:
                j += 1
            else:
                sets[i] = (joint, signs)
                del sets[j]
        i += 1
    return sets


def _consistent(system: _System, members: np.ndarray, signs: np.ndarray,
                tol: float = FIT_TOL) -> bool:
    _, res = system.fit(torch.from_numpy(members[None]), torch.from_numpy(signs[None]),
                        rcond=None)
    return float(res[0]) <= tol


def _output_groups(out: np.ndarray) -> list[np.ndarray]:
    """Points whose jumps point the same way in output space (one neuron or several)."""
    left = np.arange(len(out))
    groups = []
    while len(left):
        same = out[left] @ out[left[0]] >= SAME_OUTPUT_COS
        groups.append(left[same])
        left = left[~same]
    return groups


def _consistent_triples(system: _System, pool: np.ndarray, on: np.ndarray,
                        near: int = 6, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Triples of ``pool`` whose equations fit, best first, with their signs.

    Each point is tried with pairs of its ``near`` nearest points by first-layer pattern: two
    points of one neuron in neighbouring regions differ in few units, so such triples are
    far more often of one neuron than random ones.
    """
    hamming = (on[:, None, :] != on[None, :, :]).sum(2) + np.eye(len(pool), dtype=int) * on.size
    nearest = np.argsort(hamming, axis=1)[:, :min(near, len(pool) - 1)]
    pairs = np.array([(i, j) for i in range(nearest.shape[1]) for j in range(i)])
    local = np.hstack([np.repeat(np.arange(len(pool)), len(pairs))[:, None],
                       nearest[:, pairs].reshape(-1, 2)])
    triples = np.unique(np.sort(pool[local], axis=1), axis=0)
    triples = triples[(triples[:, 0] < triples[:, 1]) & (triples[:, 1] < triples[:, 2])]
    combos = np.array([[1.0, s1, s2] for s1 in (1.0, -1.0) for s2 in (1.0, -1.0)])
    parts = []
    for i in range(0, len(triples), chunk):  # in chunks: the deadline is checked between them
        if system.late():
            triples = triples[:i]
            break
        sets = torch.from_numpy(np.repeat(triples[i:i + chunk], 4, axis=0))
        _, res = system.fit(sets, torch.from_numpy(np.tile(combos, (len(sets) // 4, 1))))
        parts.append(res.numpy())
    res = np.concatenate(parts).reshape(len(triples), 4) if parts else np.zeros((0, 4))
    best = res.argmin(1)
    res = res.min(1)
    order = np.argsort(res)
    order = order[res[order] <= FIT_TOL]
    return triples[order], combos[best[order]]


def _grow(system: _System, pool: np.ndarray, members: np.ndarray,
          signs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add the points of ``pool`` whose equations agree with the members' (either sign).

    A candidate agrees when adding its equations raises the least-squares residual by no more
    than ``FIT_TOL`` of its own size. While the members leave a null space, candidates that
    lean on it could each use it differently, so then only the best one joins per round.
    """
    members, signs = members.copy(), signs.copy()
    null_dim = 1
    while not system.late():
        rest = pool[~np.isin(pool, members)]
        if not len(rest):
            return members, signs
        if null_dim:  # try the points nearest to the members first: they are tested best
            near = (system.on[rest][:, None, :] != system.on[members][None]).sum(2).min(1)
            cand = rest[np.argsort(near, kind="stable")[:NEAR_CANDIDATES]]
            res, absorbed, null_dim = _added_residual(system, members, signs, cand)
            if not (res.min(1) <= FIT_TOL).any() and len(cand) < len(rest):
                cand = rest
                res, absorbed, null_dim = _added_residual(system, members, signs, cand)
        else:
            cand = rest
            res, absorbed, null_dim = _added_residual(system, members, signs, cand)
        ok = res.min(1) <= FIT_TOL
        if not ok.any():
            return members, signs
        if null_dim and not (ok & (absorbed == 0)).any():
            ok = np.arange(len(cand)) == np.argmin(res.min(1))
        elif null_dim:  # these do not lean on the null space: all of them can join
            ok &= absorbed == 0
        members = np.concatenate([members, cand[ok]])
        signs = np.concatenate([signs, np.where(res[ok, 0] <= res[ok, 1], 1.0, -1.0)])
    return members, signs


def _added_residual(system: _System, members: np.ndarray, signs: np.ndarray,
                    cand: np.ndarray) -> tuple[np.ndarray, int]:
    """How much each candidate (with sign +1, -1) raises the members' least-squares residual.

    With ``A = U S V^T`` the members' system, ``theta`` its solution and ``N`` its null space,
    a candidate ``R theta' = r`` adds ``min_{w,n} |w|^2 + |B w + C n - gap|^2`` where
    ``B = R V S^-1``, ``C = R N``, ``gap = r - R theta``. Returned relative to ``|r|``, as
    ``[len(cand), 2]``, with inf where fewer than ``MIN_CHECKS`` equations escape the null space;
    also how many of each candidate's equations the null space absorbs, and its dimension.
    """
    a = system.rows[torch.from_numpy(members)].reshape(-1, system.rows.shape[-1])
    rhs = (system.rhs[torch.from_numpy(members)] * torch.from_numpy(signs)[:, None]).reshape(-1)
    u, sv, vt = torch.linalg.svd(a, full_matrices=True)
    rank = int((sv > NULL_RTOL * sv[0]).sum())
    theta = vt[:rank].T @ ((u[:, :rank].T @ rhs) / sv[:rank])
    rows = system.rows[torch.from_numpy(cand)]  # [r, d + 1, P]
    b = rows @ (vt[:rank].T / sv[:rank])
    q = torch.linalg.inv(torch.eye(rows.shape[1], dtype=rows.dtype) + b @ b.transpose(1, 2))
    # the directions of the candidate's equations that the null space moves (clearly)
    uc, svc, _ = torch.linalg.svd(rows @ vt[rank:].T, full_matrices=False)
    strong = svc > NULL_RTOL * torch.linalg.vector_norm(rows, dim=(1, 2))[:, None]
    uc = uc * strong[:, None, :]
    out = []
    for sign in (1.0, -1.0):
        r = sign * system.rhs[torch.from_numpy(cand)]
        gap = (r - rows @ theta)[..., None]
        if uc.shape[2]:  # min over m of (gap - Uc m)^T Q (gap - Uc m)
            ucq = uc.transpose(1, 2) @ q
            m = torch.linalg.lstsq(ucq @ uc, ucq @ gap, rcond=1e-12, driver="gelsd").solution
            gap = gap - uc @ m
        extra = (gap.transpose(1, 2) @ q @ gap)[:, 0, 0].clamp(min=0.0)
        out.append(extra.sqrt() / torch.linalg.vector_norm(r, dim=1))
    res = torch.stack(out, 1)
    res[rows.shape[1] - strong.sum(1) < MIN_CHECKS] = torch.inf
    return res.numpy(), strong.sum(1).numpy(), rows.shape[2] - rank


def _verified(system: _System, members: np.ndarray, signs: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """The members whose equations the other members predict (leave-one-out residual).

    A point measured badly (another kink inside its finite-difference probes) can slip in
    while the set still has a null space. Once the others pin its equations it stands out;
    while it alone pins some direction (leverage one) nothing can check it, so it is left out
    until a larger set can.
    """
    while len(members):
        err, alone = _leave_one_out(system, members, signs)
        keep = ~(alone | (err > OUTLIER_RTOL))
        if bool(keep.all()):
            break
        members, signs = members[keep], signs[keep]
    return members, signs


def _leave_one_out(system: _System, members: np.ndarray, signs: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Each member's relative leave-one-out residual, and which members pin a direction
    alone (leverage one: no residual to speak of)."""
    a = system.rows[torch.from_numpy(members)]  # [m, d + 1, P]
    rhs = system.rhs[torch.from_numpy(members)] * torch.from_numpy(signs)[:, None]
    u, sv, vt = torch.linalg.svd(a.reshape(-1, a.shape[-1]), full_matrices=False)
    rank = int((sv > NULL_RTOL * sv[0]).sum())
    u, sv, vt = u[:, :rank], sv[:rank], vt[:rank]
    resid = rhs - a @ (vt.T @ ((u.T @ rhs.reshape(-1)) / sv))
    hat = (a @ vt.T) / sv**2 @ (vt @ a.transpose(1, 2))  # diagonal blocks of A A^+
    lev = torch.linalg.eigvalsh(hat).max(1).values
    alone = lev >= 1 - LEVERAGE_GAP
    eye = torch.eye(a.shape[1], dtype=a.dtype)
    safe = torch.where(alone[:, None, None], eye, eye - hat)
    loo = torch.linalg.solve(safe, resid[..., None])[..., 0]
    err = torch.linalg.vector_norm(loo, dim=1) / torch.linalg.vector_norm(rhs, dim=1)
    return err.numpy(), alone.numpy()


def _trimmed(system: _System, members: np.ndarray, signs: np.ndarray,
             share: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Drop the worst-predicted member, one at a time, while its leave-one-out residual is
    above ``TIGHT_RTOL``, the rank stays and at most ``share`` of the members go: most points
    of a followed boundary are measured to ~1e-10, a few beside another boundary to ~1e-5,
    and those spoil the fit of the rest."""
    rank = _rank(system, members)
    for _ in range(int(share * len(members))):
        err, alone = _leave_one_out(system, members, signs)
        err[alone] = 0.0
        worst = int(np.argmax(err))
        if err[worst] <= TIGHT_RTOL:
            break
        keep = np.arange(len(members)) != worst
        if _rank(system, members[keep]) < rank:
            break
        members, signs = members[keep], signs[keep]
    return members, signs


def _neuron(system: _System, members: np.ndarray, signs: np.ndarray,
            rcond: float | None = SEED_RCOND) -> Neuron:
    theta, _ = system.fit(torch.from_numpy(members[None]), torch.from_numpy(signs[None]),
                          rcond=rcond)
    theta = theta[0].numpy()
    a = system.rows[torch.from_numpy(members)].reshape(-1, theta.shape[0]).numpy()
    deficit = theta.shape[0] - int(np.linalg.matrix_rank(a, tol=1e-9 * np.abs(a).max()))
    n, d = system.n, system.d
    return Neuron(theta[:n], theta[n:n + d], float(theta[-1]), members, signs, deficit)


def traced_neuron(pts: Critical, weight: np.ndarray, bias: np.ndarray, members: np.ndarray,
                  signs: np.ndarray, min_members: int = 4) -> Neuron | None:
    """The neuron of points found by following one boundary (:mod:`.trace`), signs known.

    Members the others mispredict are dropped (:func:`_verified`); ``None`` unless at least
    ``min_members`` remain and their equations are jointly consistent to ``OUTLIER_RTOL``
    (membership was checked cell by cell while following; a neuron with small outgoing
    weights has jumps measured to fewer digits than the grouping's ``FIT_TOL``).
    """
    sub = Critical(pts.x[members], pts.g[members], pts.out[members])
    system = _System(sub, weight, bias)
    local, local_signs = _verified(system, np.arange(len(members)), np.asarray(signs, float))
    if len(local) < min_members or not _consistent(system, local, local_signs, OUTLIER_RTOL):
        return None
    local, local_signs = _trimmed(system, local, local_signs)
    neuron = _neuron(system, local, local_signs, rcond=None)
    neuron.members = np.asarray(members)[local]
    return neuron


def _rank(system: _System, members: np.ndarray) -> int:
    a = system.rows[torch.from_numpy(members)].reshape(-1, system.rows.shape[-1]).numpy()
    return int(np.linalg.matrix_rank(a, tol=1e-9 * np.abs(a).max()))


def first_layer_flips(pts: Critical, neurons: list[Neuron], weight: np.ndarray,
                      bias: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Which first-layer rows have the wrong sign: ``e_j = -sum_i a_ji flip_i w_i``.

    A unit in one state at every point of neuron ``j`` leaves ``a_ji`` (and, when on, ``e_j``
    along ``w_i``) undetermined, so each neuron's equation is taken orthogonally to the rows of
    those units. Returns the flips, the relative misfit and which flips the equations fix.
    """
    n1, d = weight.shape
    cols, target = [], []
    for n in neurons:
        z = pts.x[n.members] @ weight.T + bias
        fixed = (z > 0).all(0) | (z < 0).all(0)
        basis = np.linalg.svd(weight[fixed], full_matrices=True)[2][int(fixed.sum()):] \
            if fixed.any() else np.eye(d)
        if not len(basis):
            continue
        a = np.where(fixed, 0.0, n.a)
        cols.append(-(basis @ (a[:, None] * weight).T))  # [d', n1]
        target.append(basis @ n.e)
    if not cols:
        return np.zeros(n1, dtype=bool), float("inf"), np.zeros(n1, dtype=bool)
    cols_m, target_v = np.vstack(cols), np.concatenate(target)
    share, *_ = np.linalg.lstsq(cols_m, target_v, rcond=None)
    flips = share > 0.5
    misfit = np.linalg.norm(cols_m @ flips - target_v) / (np.linalg.norm(target_v) + 1e-300)
    _, sv, vt = np.linalg.svd(cols_m, full_matrices=True)
    null = vt[int((sv > 1e-6 * sv.max()).sum()):] if sv.size and sv.max() > 0 else vt
    fixed = (np.abs(null).max(axis=0, initial=0.0) < 1e-6) & (np.abs(share - 0.5) > 0.25)
    return flips, float(misfit), fixed


def refit_without_skip(pts: Critical, neuron: Neuron, weight: np.ndarray,
                       bias: np.ndarray) -> tuple[np.ndarray, float, int]:
    """``(a, c)`` of ``u = a . relu(W x + b) + c`` from the neuron's points, signs corrected.

    Returns the row, the bias and how many directions of ``(a, c)`` its points leave
    undetermined (a first-layer unit off at every one of them, or too few distinct regions).
    """
    x, g = pts.x[neuron.members], pts.g[neuron.members] * neuron.signs[:, None]
    z = x @ weight.T + bias
    on = (z > 0).astype(np.float64)
    rows_g = (weight.T[None] * on[:, None, :]).reshape(-1, len(bias))
    rows_g = np.hstack([rows_g, np.zeros((len(rows_g), 1))])
    rows_z = np.hstack([np.maximum(z, 0.0), np.ones((len(x), 1))])
    scale = np.linalg.norm(g, axis=1) / np.linalg.norm(rows_z, axis=1)
    rows = np.vstack([rows_g, scale[:, None] * rows_z])
    rhs = np.concatenate([g.reshape(-1), np.zeros(len(x))])
    theta, _, rank, sv = np.linalg.lstsq(rows, rhs, rcond=None)
    deficit = rows.shape[1] - int((sv > NULL_RTOL * sv[0]).sum()) if rank else rows.shape[1]
    return theta[:-1], float(theta[-1]), deficit


@dataclass
class TwoLayers:
    """A recovered ``d -> n1 -> n2 -> k`` network as dense matrices, and how well it fits."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray
    residual: float
    sign_misfit: float
    stand_ins: int
    undetermined: int
    deficits: list[int] = field(default_factory=list)  # per second-layer neuron
    searched_signs: int = 0

    def dense(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.w1, self.b1), (self.w2, self.b2), (self.w3, self.b3)]

    def forward(self, x: np.ndarray) -> np.ndarray:
        h = np.maximum(x @ self.w1.T + self.b1, 0.0)
        u = np.maximum(h @ self.w2.T + self.b2, 0.0)
        return u @ self.w3.T + self.b3

    def relative_error(self, x: np.ndarray, y: np.ndarray) -> float:
        """Largest output error on ``x`` relative to the largest output."""
        return float(np.abs(self.forward(x) - y).max() / (np.abs(y).max() + 1e-300))


def assemble(pts: Critical, neurons: list[Neuron], normals: np.ndarray, offsets: np.ndarray,
             x: np.ndarray, y: np.ndarray, deadline: float | None = None) -> TwoLayers:
    """First-layer signs, second-layer rows and the output layer, fitted on queries ``x, y``.

    Flips the second-layer equations leave open (few inputs: each neuron's boundary crosses few
    first-layer planes) are searched exhaustively for the best output fit, up to
    ``2^MAX_OPEN_FLIPS`` combinations, until ``deadline``.
    """
    flips, misfit, fixed = first_layer_flips(pts, neurons, normals, offsets)
    best = _assemble_with(pts, neurons, normals, offsets, x, y, flips, misfit)
    open_units = np.flatnonzero(~fixed)
    if best.residual <= FIT_RTOL or not 0 < len(open_units) <= MAX_OPEN_FLIPS:
        return best
    for combo in itertools.product((False, True), repeat=len(open_units)):
        if deadline is not None and time.perf_counter() > deadline:
            break
        trial = flips.copy()
        trial[open_units] = combo
        net = _assemble_with(pts, neurons, normals, offsets, x, y, trial, misfit)
        if net.residual < best.residual:
            best = net
    best.searched_signs = len(open_units)
    return best


def _assemble_with(pts: Critical, neurons: list[Neuron], normals: np.ndarray,
                   offsets: np.ndarray, x: np.ndarray, y: np.ndarray, flips: np.ndarray,
                   misfit: float) -> TwoLayers:
    """The network for given first-layer flips.

    Second-layer neurons whose boundary never crosses the sampled domain are on or off all
    over it; the ones that are on add an affine function of the first layer to the outputs,
    which one always-on *stand-in* neuron per output direction reproduces exactly there.
    """
    sign = np.where(flips, -1.0, 1.0)
    w1, b1 = sign[:, None] * normals, sign * offsets
    rows = [refit_without_skip(pts, n, w1, b1) for n in neurons]
    w2 = np.stack([r[0] for r in rows])
    b2 = np.array([r[1] for r in rows])
    h = np.maximum(x @ w1.T + b1, 0.0)
    u = h @ w2.T + b2
    theta, *_ = np.linalg.lstsq(np.hstack([np.maximum(u, 0.0), h, np.ones((len(x), 1))]), y,
                                rcond=None)
    n2, n1 = w2.shape
    alpha, gamma = theta[:n2], theta[n2:n2 + n1]
    # flipping u_j moves -alpha_j a_j into the linear part: choose the flips that empty it
    cols = -np.einsum("ji,jk->ikj", w2, alpha).reshape(-1, n2)
    share, *_ = np.linalg.lstsq(cols, gamma.reshape(-1), rcond=None)
    flip = share > 0.5
    w2[flip], b2[flip] = -w2[flip], -b2[flip]
    rest = gamma - (cols @ flip).reshape(gamma.shape)
    w2, b2, stand_ins = _stand_ins(w2, b2, rest, h)
    u = np.maximum(h @ w2.T + b2, 0.0)
    features = np.hstack([u, np.ones((len(x), 1))])
    out, *_ = np.linalg.lstsq(features, y, rcond=None)
    residual = np.abs(features @ out - y).max() / (np.abs(y).max() + 1e-300)
    return TwoLayers(w1, b1, w2, b2, out[:-1].T.copy(), out[-1].copy(), float(residual),
                     misfit, stand_ins, sum(r[2] for r in rows), [r[2] for r in rows])


def _stand_ins(w2: np.ndarray, b2: np.ndarray, rest: np.ndarray,
               h: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Append always-on rows for the part of the outputs linear in ``h`` (``rest`` [n1, k])."""
    if not rest.size:
        return w2, b2, 0
    u, sv, _ = np.linalg.svd(rest, full_matrices=False)
    keep = sv > 1e-6 * max(np.abs(w2).max(), 1e-300)
    if not keep.any():
        return w2, b2, 0
    rows = (u[:, keep] * sv[keep]).T
    vals = h @ rows.T
    span = vals.max(axis=0) - vals.min(axis=0)
    bias = -vals.min(axis=0) + span + 1.0
    return np.vstack([w2, rows]), np.concatenate([b2, bias]), int(keep.sum())
