"""The last word on "complete": prune, explain every critical point, validate where it matters.

A recovered network is only called complete when (1) every critical point the attack found lies
on the boundary of one of its hidden units (a point no unit explains belongs to a neuron that
was missed), and (2) its outputs agree with the oracle's to ``VALID_RTOL`` (relative to the
outputs' scale) on fresh queries aimed at every recovered unit's active region and around every
unexplained point, besides uniform ones. A missed neuron that is active on a tiny part of the
domain escapes uniform validation; its critical points, or the points beside them, do not.
Units whose outgoing weights are negligible (duplicates of a plane, leftovers of a fit) are
pruned first, so the layer sizes reported are the network's real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.analyses.extraction.oracle import Oracle

Dense = list[tuple[np.ndarray, np.ndarray]]

VALID_RTOL = 1e-6  # output error, relative to the largest output, still counted as agreement
PRUNE_RTOL = 1e-7  # a unit contributing less than this fraction of its layer's largest is dropped
EXPLAIN_RTOL = 1e-6  # a point this close to a unit's boundary (times the box size) lies on it
UNIFORM_QUERIES = 2000  # uniform validation queries at least
VERTEX_QUERIES = 2000  # random vertices of the box
MAX_UNIFORM = 50_000  # and at most (a region of fraction p is hit about p * n times)
PER_UNIT = 4  # aimed queries per recovered hidden unit
PER_POINT = 2  # aimed queries beside each unexplained critical point
MAX_UNEXPLAINED = 200  # unexplained points validated around
FINE_STEP = 1e-7  # (times the box size) a real critical point has its kink this close


@dataclass
class Verdict:
    """What the check found; ``notes`` name every reason the result is partial."""

    layers: Dense
    pruned: int
    unexplained: np.ndarray  # bool per critical point
    owner: np.ndarray  # first-layer unit each point lies on, -1 for none
    error: float  # worst relative output error on the validation queries
    queries: int
    notes: list[str] = field(default_factory=list)
    spurious: int = 0  # points the search took for critical where the oracle has no kink

    @property
    def passed(self) -> bool:
        return not self.notes


def forward(layers: Dense, x: np.ndarray) -> np.ndarray:
    """The dense network's outputs (ReLU between layers)."""
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x


def prune(layers: Dense, radius: float) -> tuple[Dense, int]:
    """Drop hidden units whose largest possible effect on the next layer is negligible.

    A unit's effect is bounded by ``|outgoing column| * (|row| * R + |bias|)`` with ``R`` a bound
    on its input's norm; units below ``PRUNE_RTOL`` of their layer's largest are removed.
    """
    layers = [(w.copy(), b.copy()) for w, b in layers]
    pruned = 0
    for i in range(len(layers) - 1):
        w, b = layers[i]
        nxt_w, nxt_b = layers[i + 1]
        effect = np.linalg.norm(nxt_w, axis=0) * (np.linalg.norm(w, axis=1) * radius + np.abs(b))
        keep = effect > PRUNE_RTOL * (effect.max(initial=0.0) + 1e-300)
        if keep.any() and not keep.all():
            pruned += int((~keep).sum())
            w, b = w[keep], b[keep]
            layers[i] = (w, b)
            layers[i + 1] = (nxt_w[:, keep], nxt_b)
        radius = float(np.linalg.norm(w, 2) * radius + np.linalg.norm(b))
    return layers, pruned


def _pre_activations(layers: Dense, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per hidden layer: pre-activations ``[m, n]`` and their gradient norms ``[m, n]``."""
    out = []
    jac = None  # [m, n, d] Jacobian of the current layer's input, None = identity
    h = x
    for w, b in layers[:-1]:
        pre = h @ w.T + b
        if jac is None:
            full = np.broadcast_to(w, (len(x), *w.shape))
        else:
            full = np.einsum("ij,mjd->mid", w, jac)
        out.append((pre, np.linalg.norm(full, axis=2)))
        jac = full * (pre > 0)[:, :, None]
        h = np.maximum(pre, 0.0)
    return out


def distances(layers: Dense, x: np.ndarray, chunk: int = 16) -> list[np.ndarray]:
    """Per hidden layer, the first-order distance ``[m, n]`` of each point to each boundary."""
    per_layer: list[list[np.ndarray]] = [[] for _ in layers[:-1]]
    for start in range(0, len(x), chunk):
        for i, (pre, grad) in enumerate(_pre_activations(layers, x[start:start + chunk])):
            with np.errstate(divide="ignore", invalid="ignore"):
                per_layer[i].append(np.where(grad > 0, np.abs(pre) / grad, np.inf))
    n = [len(b) for _, b in layers[:-1]]
    return [np.vstack(d) if d else np.zeros((0, k)) for d, k in zip(per_layer, n, strict=True)]


def aimed_points(layers: Dense, lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator,
                 per_unit: int = PER_UNIT) -> np.ndarray:
    """Points inside the box where each recovered hidden unit is active, near its boundary.

    Random points are pulled onto each unit's boundary by Newton steps on its (piecewise
    linear) pre-activation, then pushed a little into its active side.
    """
    scale = float(np.linalg.norm(hi - lo))
    found = []
    offset = 1e-3 * scale
    for layer in range(len(layers) - 1):
        n = len(layers[layer][1])
        x = rng.uniform(lo, hi, (n * per_unit, len(lo)))
        unit = np.repeat(np.arange(n), per_unit)
        for _ in range(4):
            pre, grad_dir = _unit_pre_and_grad(layers, layer, unit, x)
            norm = np.linalg.norm(grad_dir, axis=1)
            ok = norm > 0
            step = np.zeros_like(x)
            step[ok] = (-pre[ok] / norm[ok] ** 2)[:, None] * grad_dir[ok]
            step[ok] += offset * grad_dir[ok] / norm[ok, None]
            x = np.clip(x + step, lo, hi)
        pre, _ = _unit_pre_and_grad(layers, layer, unit, x)
        found.append(x[pre > 0])
    return np.vstack(found) if found else np.zeros((0, len(lo)))


def _unit_pre_and_grad(layers: Dense, layer: int, unit: np.ndarray, x: np.ndarray,
                       chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Pre-activation of hidden unit ``unit[i]`` of ``layer`` at ``x[i]`` and its gradient."""
    if layer and len(x) > chunk:
        parts = [_unit_pre_and_grad(layers, layer, unit[i:i + chunk], x[i:i + chunk])
                 for i in range(0, len(x), chunk)]
        return np.concatenate([p for p, _ in parts]), np.vstack([g for _, g in parts])
    h, jac = x, None
    for w, b in layers[:layer]:
        pre = h @ w.T + b
        on = pre > 0
        jac = w[None] * on[:, :, None] if jac is None else \
            np.einsum("ij,mjd->mid", w, jac) * on[:, :, None]
        h = np.maximum(pre, 0.0)
    w, b = layers[layer]
    pre = np.einsum("md,md->m", h, w[unit]) + b[unit]
    grad = w[unit] if jac is None else np.einsum("mj,mjd->md", w[unit], jac)
    return pre, grad


def check(layers: Dense, oracle: Oracle, points: np.ndarray, lo: np.ndarray, hi: np.ndarray,
          rng: np.random.Generator, max_queries: int, uniform: int = UNIFORM_QUERIES) -> Verdict:
    """Prune ``layers``, then explain ``points`` and validate on aimed and uniform queries.

    Uses at most ``max_queries`` oracle queries, ``uniform`` of them (within ``UNIFORM_QUERIES``
    and ``MAX_UNIFORM``) uniform in the box; fewer than the check needs makes it fail with a
    note saying so. A neuron that was never seen and is active on a fraction of the box well
    below ``1 / uniform`` can still escape.
    """
    scale = float(np.linalg.norm(hi - lo))
    radius = float(np.linalg.norm(np.maximum(np.abs(lo), np.abs(hi))))
    layers, pruned = prune(layers, radius)
    dist = distances(layers, points) if len(points) else []
    tol = EXPLAIN_RTOL * scale
    if len(points):
        nearest = np.min([d.min(axis=1) for d in dist], axis=0)
        unexplained = ~(nearest <= tol)
        first = dist[0]
        owner = np.where(first.min(axis=1) <= tol, first.argmin(axis=1), -1)
    else:
        unexplained, owner = np.zeros(0, dtype=bool), np.zeros(0, dtype=int)
    notes = []
    spurious = 0
    nearby = np.zeros(len(points), dtype=bool)
    if unexplained.any():  # a point where the oracle has no kink was a false alarm of the search
        tested = np.flatnonzero(unexplained)[:MAX_UNEXPLAINED]
        real, used = kinked(oracle, points[tested], 1e-5 * scale, rng, max_queries)
        max_queries -= used
        if real is None:
            notes.append("no queries left to test the unexplained critical points")
        else:
            spurious = int((~real).sum())
            unexplained[tested[~real]] = False
            # a kink within 1e-5 but not within FINE_STEP of the point: the search measured it
            # beside a boundary (two kinks close together); validated around, not counted
            tested = tested[real]
            sharp, used = kinked(oracle, points[tested], FINE_STEP * scale, rng, max_queries)
            max_queries -= used
            if sharp is not None:
                nearby[tested[~sharp]] = True
                unexplained[tested[~sharp]] = False
    beside = points[unexplained | nearby][:MAX_UNEXPLAINED]
    near = []
    for _ in range(PER_POINT):
        shift = rng.normal(size=beside.shape)
        shift *= 1e-3 * scale / (np.linalg.norm(shift, axis=1, keepdims=True) + 1e-300)
        near.append(np.clip(beside + shift, lo, hi))
    # a neuron's pre-activation peaks over the box at a vertex: one active on a sliver of the
    # box is active on a much larger share of its vertices
    vertices = lo + (hi - lo) * rng.integers(0, 2, (VERTEX_QUERIES, len(lo)))
    aimed = np.vstack([aimed_points(layers, lo, hi, rng), *near, vertices])
    uniform = int(np.clip(uniform, UNIFORM_QUERIES, MAX_UNIFORM))
    uniform = max(min(uniform, max_queries - len(aimed)), UNIFORM_QUERIES)
    x = np.vstack([aimed, rng.uniform(lo, hi, (uniform, len(lo)))])
    if len(x) > max_queries:
        notes.append(f"validation needs {len(x)} queries, only {max_queries} were left: "
                     "the result is not validated")
        x = x[:max(max_queries, 0)]
    y = oracle(x) if len(x) else np.zeros((0, layers[-1][0].shape[0]))
    err = float(np.abs(forward(layers, x) - y).max() / (np.abs(y).max() + 1e-300)) \
        if len(x) else float("inf")
    if unexplained.any():
        notes.append(f"{int(unexplained.sum())} of {len(points)} critical points lie on no "
                     "recovered neuron's boundary: at least one neuron is missing")
    if err > VALID_RTOL:
        notes.append(f"outputs differ from the oracle's by up to {err:.1e} (relative) on "
                     f"{len(x)} validation queries aimed at every recovered neuron and every "
                     "unexplained critical point")
    return Verdict(layers, pruned, unexplained, owner, err, len(x), notes, spurious)


def unchecked(layers: Dense, points: np.ndarray, lo: np.ndarray, hi: np.ndarray,
              reason: str) -> Verdict:
    """The verdict when the check could not run (time limit): pruned, owners found, failed."""
    scale = float(np.linalg.norm(hi - lo))
    layers, pruned = prune(layers, float(np.linalg.norm(np.maximum(np.abs(lo), np.abs(hi)))))
    owner = np.full(len(points), -1)
    if len(points):
        w, b = layers[0]
        first = np.abs(points @ w.T + b) / (np.linalg.norm(w, axis=1) + 1e-300)
        owner = np.where(first.min(axis=1) <= EXPLAIN_RTOL * scale, first.argmin(axis=1), -1)
    return Verdict(layers, pruned, np.zeros(len(points), dtype=bool), owner, float("inf"), 0,
                   [reason])


def kinked(oracle: Oracle, x: np.ndarray, step: float, rng: np.random.Generator,
            max_queries: int, directions: int = 2) -> tuple[np.ndarray | None, int]:
    """Whether the oracle has a kink at each point (on lines in random directions through it).

    The second difference centred on the point is far above those beside it only when a
    boundary passes within a step of it. ``None`` when the queries are not left.
    """
    if not len(x):
        return np.zeros(0, dtype=bool), 0
    n = len(x) * directions * 5
    if n > max_queries:
        return None, 0
    d = x.shape[1]
    v = rng.normal(size=(len(x), directions, d))
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    t = step * np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    probes = x[:, None, None, :] + t[None, None, :, None] * v[:, :, None, :]
    f = oracle(probes.reshape(-1, d)).reshape(len(x), directions, 5, -1)
    second = np.abs(f[:, :, :-2] - 2 * f[:, :, 1:-1] + f[:, :, 2:]).max(axis=3)
    floor = 1e-12 * (np.abs(f).max() + 1e-300)
    centre, side = second[:, :, 1], np.maximum(second[:, :, 0], second[:, :, 2])
    return ((centre > floor) & (centre > 100 * side)).any(axis=1), n
