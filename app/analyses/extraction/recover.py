"""Layer by layer: first-layer hyperplanes, their signs, then the layers behind them.

1. Sample lines through the domain box and collect critical points (:mod:`.lines`). A kink
   that lies on an already known hyperplane costs nothing more; a new one costs ``2 d``
   queries for its normal.
2. A hyperplane belongs to the first layer when it *extends*: a kink shows up where random
   other lines cross it (Rolnick & Kording 2020), in more than one region of the others. The
   rest are bent boundaries of deeper neurons. Planes few random lines cross (near a corner)
   are looked for where a one-layer fit misfits a few fresh queries.
3. Last hidden layer: ``relu(s z) = (s z + |z|) / 2``, so a least-squares fit of the outputs on
   ``[|z_j|, x, 1]`` gives the output weights and the linear part ``A = sum_j s_j a_j u_j^T``,
   which fixes the signs ``s_j`` (least squares, or exhaustive search when underdetermined).
4. Deeper layers (first layer contractive, ``n1 <= d``): a deeper neuron's normal is a
   combination of the *active* first-layer rows only, which gives each first-layer sign. Then
   the first layer is inverted (``x = W^+ (h - b)``) and the same procedure runs on the map
   ``h -> logits`` over a box of positive hidden activations.
5. Two hidden layers with an expansive first layer (``n1 > d``), or where peeling gave a
   partial result: the second layer's equations in sign-free form (:mod:`.second_layer`),
   which also give the first layer's signs. Boundary pieces off the first-layer planes do not
   by themselves mean a deeper layer (two close planes can fake one): when one ReLU layer fits
   the outputs exactly on fresh queries, that is the answer. Second-layer neurons the
   grouping missed (one active on a sliver of the box: found where the network of the others
   misfits the box's vertices, or from a critical point no unit explains) or left
   undetermined are followed from cell to cell of the first layer (:mod:`.trace`), out of
   the box where units take states they never take on the boundary inside it. A peeled
   result that misfits the box's vertices gets the second-layer equations too.
6. A final check (:mod:`.verify`) prunes negligible units and alone may call the result
   complete. The search stops at the query budget or the time limit with a partial result.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from app.analyses.extraction.lines import (
    Hyperplane,
    boundary_normals,
    kinks_on_line,
)
from app.analyses.extraction.oracle import Budget, BudgetExhausted, Oracle
from app.analyses.extraction.refine import cell_centre, remeasure
from app.analyses.extraction.second_layer import (
    assemble,
    critical_points,
    group_neurons,
    traced_neuron,
)
from app.analyses.extraction.trace import trace
from app.analyses.extraction.verify import (
    EXPLAIN_RTOL,
    VALID_RTOL,
    check,
    distances,
    kinked,
    unchecked,
)
from app.errors import InvalidInputError
from app.layers import Layer, Linear, ReLU
from app.network import Network
from app.progress import ProgressFn

FIT_RTOL = 1e-7  # output fit counted exact below this relative residual
SIGN_RTOL = 1e-6  # relative misfit of the sign equations still counted as exact
MAX_EXHAUSTIVE_SIGNS = 20
MAX_UNKNOWNS = 100  # per deeper neuron in the second-layer equations (n1 + d + 1)
VALIDATION_QUERIES = 2000  # fresh queries that check a recovered two-layer network
MAX_DEEP_CHECKED = 200  # deeper boundary points checked beside by the one-layer test
VERIFY_RESERVE = 10_000  # queries kept back for the final check (at most a tenth of the budget)
PROBE_ROUNDS = 3  # rounds of short lines near rare neurons and undetermined weights
EXPANSIVE_ROUNDS = 8  # rounds of lines collecting critical points behind an expansive layer
EXPANSIVE_SHARE = 0.5  # of the budget left, for those lines and probes (the rest: following)
TRACE_ROUNDS = 3  # rounds of following the boundaries of second-layer neurons the grouping missed
TRACE_SEEDS = 6  # boundaries followed per round at most
TRACE_QUERIES_PER_UNKNOWN = 1000  # a boundary is followed for at most this many queries per
# unknown of its neuron (n1 + d + 1)
MAX_SEEDS_TESTED = 60  # unexplained critical points tested for a kink per round
MAX_ALL_VERTICES_DIM = 10  # up to this input size every vertex of the box is checked
SEARCH_SHARE = 0.9  # of the time limit for the search; the rest for the output layer and check


@dataclass
class ExtractionResult:
    """What the attack recovered, and what it cost.

    ``network`` is ``None`` only when the budget ran out before a first layer was fitted.
    ``critical_points`` are the boundary points found in input space (on every level);
    ``point_neuron[i]`` is the recovered first-layer neuron point ``i`` lies on, or ``-1`` for
    none. ``first_layer`` holds the recovered first-layer ``(W, b)`` (signed). ``complete`` only
    when the final check (:mod:`.verify`) explained every point and validated the outputs.
    """

    network: Network | None
    layer_sizes: list[int]
    queries: int
    seconds: float
    log: list[dict]
    critical_points: np.ndarray
    point_neuron: np.ndarray
    first_layer: tuple[np.ndarray, np.ndarray]
    notes: list[str]
    complete: bool


Sampler = Callable[[np.random.Generator, int], np.ndarray]


@dataclass
class _Level:
    """Search state of one layer: its oracle, where to draw points, the hyperplanes found."""

    oracle: Oracle
    sample: Sampler
    dim: int
    first: list[Hyperplane] = field(default_factory=list)
    deep: list[Hyperplane] = field(default_factory=list)
    to_input: Callable[[np.ndarray], np.ndarray] = lambda p: p  # this level's points as inputs
    anywhere: bool = True  # the oracle may be queried outside the sampled domain
    vertices: Sampler | None = None  # random vertices of the domain box, where it is a box
    box: tuple[np.ndarray, np.ndarray] | None = None  # (lo, hi) where the domain is a box

    def points(self) -> np.ndarray:
        """Every critical point found on this level, in input space."""
        pts = [p for plane in self.first + self.deep for p in plane.points]
        return self.to_input(np.stack(pts)) if pts else np.zeros((0, 0))

    def scale(self, rng: np.random.Generator) -> float:
        """The typical extent of the sampled domain (for tolerances and probe steps)."""
        pts = self.sample(rng, 256)
        return float(np.linalg.norm(pts.max(axis=0) - pts.min(axis=0)))


@dataclass
class _Run:
    budget: Budget
    rng: np.random.Generator
    log: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    found: list[int] = field(default_factory=list)
    complete: bool = True
    levels: list[_Level] = field(default_factory=list)
    check_rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(1))


def extract(
    oracle: Oracle,
    input_dim: int,
    budget: int = 200_000,
    *,
    lo: float | np.ndarray = -1.0,
    hi: float | np.ndarray = 1.0,
    max_hidden_layers: int = 3,
    seed: int = 0,
    progress: ProgressFn | None = None,
    time_limit_s: float | None = None,
) -> ExtractionResult:
    """Recover a fully connected ReLU network from ``oracle`` (``[B, input_dim] -> [B, k]``).

    Only the oracle is called; lines are sampled in the box ``[lo, hi]``. Neurons whose
    boundary never crosses the box cannot be seen and are reported in ``notes``. ``progress``
    hears queries spent and neurons found and may raise :class:`app.Cancelled`. The search
    stops at ``SEARCH_SHARE`` of ``time_limit_s`` seconds (and at the budget) with a partial
    result; a share of the budget and the rest of the time are kept for the final check
    (:mod:`.verify`), which alone may call it complete (unchecked when the time runs out).
    """
    if input_dim < 1 or budget < 1:
        raise InvalidInputError("input_dim and budget must be positive")
    if time_limit_s is not None and time_limit_s <= 0:
        raise InvalidInputError("time_limit_s must be positive")
    lo_v = np.broadcast_to(np.asarray(lo, dtype=np.float64), (input_dim,)).copy()
    hi_v = np.broadcast_to(np.asarray(hi, dtype=np.float64), (input_dim,)).copy()
    if np.any(hi_v <= lo_v):
        raise InvalidInputError("the domain box needs lo < hi in every coordinate")
    start = time.perf_counter()
    reserve = min(budget // 10, VERIFY_RESERVE)
    deadline = end = None
    if time_limit_s is not None:  # a share of the time is kept for the output layer and check
        deadline, end = start + SEARCH_SHARE * time_limit_s, start + time_limit_s
    run = _Run(Budget(oracle, budget - reserve, progress, deadline, end),
               np.random.default_rng(seed))
    top = _Level(run.budget, lambda rng, n: rng.uniform(lo_v, hi_v, (n, input_dim)), input_dim,
                 vertices=lambda rng, n: lo_v + (hi_v - lo_v) * rng.integers(0, 2, (n, input_dim)),
                 box=(lo_v, hi_v))
    run.levels.append(top)
    layers: list[Layer] | None
    try:
        layers = _extract_level(top, run, max_hidden_layers)
    except BudgetExhausted as exc:
        run.notes.append(f"{exc}: stopped after {len(run.found)} layer(s)")
        run.complete = False
        layers = None
    except np.linalg.LinAlgError as exc:  # an ill-conditioned layer spoilt a deeper solve
        run.notes.append(f"numerical failure in {run.budget.phase} ({exc}): stopped after "
                         f"{len(run.found)} layer(s)")
        run.complete = False
        layers = None
    run.budget.finishing()
    if not layers and top.first:
        run.budget.budget += reserve
        reserve = 0
        normals = np.stack([p.normal for p in top.first])
        offsets = np.array([p.offset for p in top.first])
        try:
            layers = _output_layer(top, normals, offsets, run, 1)
            run.notes.append(f"returning one hidden layer of {len(offsets)} neurons found so "
                             "far with a least-squares output layer")
        except BudgetExhausted:
            layers = None
    if not layers:
        run.log.append(_entry(run, "stopped"))
        points, owner = _points(top)
        first_w, first_b = _first_layer(top)
        return ExtractionResult(
            network=None, layer_sizes=list(run.found), queries=run.budget.used,
            seconds=time.perf_counter() - start, log=run.log, critical_points=points,
            point_neuron=owner, first_layer=(first_w, first_b), notes=run.notes,
            complete=False,
        )
    run.budget.phase = "validation"
    run.budget.budget += reserve
    points = np.vstack([p for p in (lv.points() for lv in run.levels) if p.size]
                       or [np.zeros((0, input_dim))])
    try:
        verdict = check(_dense(layers), run.budget, points, lo_v, hi_v, run.rng,
                        run.budget.left, uniform=run.budget.used // 4)
    except BudgetExhausted as exc:  # the time limit: the result is returned unchecked
        verdict = unchecked(_dense(layers), points, lo_v, hi_v,
                            f"{exc}: the recovered network is not validated")
    if verdict.pruned:
        run.notes.append(f"{verdict.pruned} redundant unit(s) with negligible outgoing "
                         "weights pruned")
    run.notes += verdict.notes
    sizes = [len(b) for _, b in verdict.layers[:-1]]
    run.budget.neurons = sum(sizes)
    run.log.append(_entry(run, "done"))
    network = Network(_torch_layers(verdict.layers), (input_dim,), name="recovered")
    return ExtractionResult(
        network=network, layer_sizes=sizes, queries=run.budget.used,
        seconds=time.perf_counter() - start, log=run.log, critical_points=points,
        point_neuron=verdict.owner, first_layer=verdict.layers[0], notes=run.notes,
        complete=run.complete and verdict.passed,
    )


def _dense(layers: list[Layer]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy())
            for lin in layers if isinstance(lin, Linear)]


def _torch_layers(dense: list[tuple[np.ndarray, np.ndarray]]) -> list[Layer]:
    out: list[Layer] = []
    for i, (w, b) in enumerate(dense):
        out.append(Linear(torch.from_numpy(w.copy()), torch.from_numpy(b.copy())))
        if i < len(dense) - 1:
            out.append(ReLU())
    return out


def _extract_level(level: _Level, run: _Run, layers_left: int) -> list[Layer]:
    depth = len(run.found) + 1
    _search(level, run, f"layer {depth}", stop_at=run.budget.used + 0.6 * run.budget.left)
    _split_first_layer(level, run)
    n1 = len(level.first)
    run.found.append(n1)
    run.budget.neurons = sum(run.found)
    run.log.append(_entry(run, f"layer {depth} identified"))
    if n1 == 0:
        raise BudgetExhausted(f"no boundary of layer {depth} crosses the domain")
    if level.anywhere and _repair_first_layer(level, run):
        n1 = len(level.first)
        run.found[-1] = n1
    normals = np.stack([p.normal for p in level.first])
    offsets = np.array([p.offset for p in level.first])
    if level.deep and layers_left > 1 and _one_layer_suffices(level, normals, offsets, run):
        run.notes.append(f"layer {depth}: the outputs are one ReLU layer of its {n1} neurons "
                         f"(checked on fresh queries); {len(level.deep)} boundary piece(s) "
                         "off its planes are taken for measurement artefacts")
        level.deep = []
    if not level.deep or layers_left == 1:
        if level.anywhere and not level.deep:
            _sharpen(level, run)
            normals = np.stack([p.normal for p in level.first])
            offsets = np.array([p.offset for p in level.first])
        if level.deep:
            run.notes.append(f"layer {depth}: deeper boundaries seen but max_hidden_layers reached")
            run.complete = False
        return _output_layer(level, normals, offsets, run, depth)
    if n1 > level.dim:
        if not _equations_solvable(n1, level.dim):
            run.notes.append(
                f"layer {depth} is expansive ({n1} neurons > {level.dim} inputs) and each deeper "
                f"neuron has {n1 + level.dim + 1} unknowns (at most {MAX_UNKNOWNS} are solved "
                "for): the returned network fits one hidden layer only")
            run.complete = False
            return _output_layer(level, normals, offsets, run, depth)
        return _expansive(level, normals, offsets, run, depth)
    signs = _vote_signs(normals, offsets, level.deep, run, depth)
    weight, bias = signs[:, None] * normals, signs * offsets
    inner = _peel(level, weight, bias, run)
    head = [Linear(torch.from_numpy(weight), torch.from_numpy(bias)), ReLU()]
    before = (list(run.found), list(run.notes))
    try:
        layers = head + _extract_level(inner, run, layers_left - 1)
    except BudgetExhausted as exc:
        run.notes.append(f"{exc} in layer {depth + 1}: returning the {depth}-hidden-layer part "
                         "with a least-squares output layer")
        run.complete = False
        del run.found[depth:]
        layers = head + [_least_squares_output(inner, run)]
    if run.complete and level.box is not None and len(layers) == 5 \
            and run.budget.left >= 0.2 * run.budget.budget and _misfits(level, layers, run):
        run.notes.append(f"layer {depth + 1}: the peeled layers misfit the outputs at some of "
                         "the box's vertices or uniform points")
        run.complete = False
    if (run.complete or run.budget.left < 0.2 * run.budget.budget
            or not _equations_solvable(n1, level.dim)):
        return layers
    return _second_opinion(level, normals, offsets, run, depth, layers, before)


def _misfits(level: _Level, layers: list[Layer], run: _Run) -> bool:
    """Whether ``layers`` misfit the oracle on the box's vertices or uniform points."""
    x = np.vstack([_vertices(level, run), level.sample(run.rng, VALIDATION_QUERIES)])
    y = level.oracle(x)
    with torch.no_grad():
        ours = Network(layers, (level.dim,))(torch.from_numpy(x)).numpy()
    return float(np.abs(ours - y).max() / (np.abs(y).max() + 1e-300)) > VALID_RTOL


def _vertices(level: _Level, run: _Run) -> np.ndarray:
    """Every vertex of the box up to ``MAX_ALL_VERTICES_DIM`` inputs, else that many random."""
    lo, hi = level.box
    d = level.dim
    if d <= MAX_ALL_VERTICES_DIM:
        return lo + (hi - lo) * ((np.arange(2**d)[:, None] >> np.arange(d)) & 1)
    return level.vertices(run.rng, 2**MAX_ALL_VERTICES_DIM)


def _one_layer_suffices(level: _Level, normals: np.ndarray, offsets: np.ndarray,
                        run: _Run) -> bool:
    """Whether one ReLU layer of the found neurons reproduces the outputs exactly.

    Boundary pieces off the found planes usually mean a deeper layer, but two close first-layer
    planes can also produce one (a kink measured between them); deciding by a vote of signs from
    such a piece breaks single-output networks. So the exact one-layer solve is tried first and
    checked on fresh queries, including beside every such piece, where a deeper neuron would
    show.
    """
    run.budget.phase = "one-layer check"
    rng = run.check_rng  # its own stream: the search after it goes as it would without it
    fit = _fit_one_layer(level, normals, offsets, run, rng)
    if fit.residual > VALID_RTOL:
        return False
    pts = np.stack([p for plane in level.deep for p in plane.points])[:MAX_DEEP_CHECKED]
    scale = level.scale(rng)
    beside = [pts + 1e-3 * scale * rng.normal(size=pts.shape) / np.sqrt(level.dim)
              for _ in range(2)]
    x = np.vstack([level.sample(rng, VALIDATION_QUERIES // 4), *beside])
    f = level.oracle(x)
    with torch.no_grad():
        ours = Network(fit.layers, (level.dim,))(torch.from_numpy(x)).numpy()
    return float(np.abs(ours - f).max() / (np.abs(f).max() + 1e-300)) <= VALID_RTOL


def _sharpen(level: _Level, run: _Run) -> None:
    """Re-measure every first-layer plane at the centre of its cell (:mod:`.refine`).

    On a line crossing many planes the probes sit a fraction of the distance to the next kink,
    and the finite-difference Jacobians lose digits; with the whole layer known, each plane is
    re-measured where it is farthest from the others (``2 d + 2`` queries per plane).
    """
    planes = level.first
    if len(planes) < 2 or level.box is None:
        return
    run.budget.phase = "sharpening normals"
    normals = np.stack([p.normal for p in planes])
    offsets = np.array([p.offset for p in planes])
    chosen, centres, radii = [], [], []
    for j, plane in enumerate(planes):
        if run.budget.late():
            break
        centre, radius = cell_centre(normals, offsets, j, plane.points[0], *level.box)
        if radius > 0:
            chosen.append(j)
            centres.append(centre)
            radii.append(radius)
    if not chosen:
        return
    found = remeasure(level.oracle, normals[chosen], np.stack(centres), np.array(radii))
    for j, new in zip(chosen, found, strict=True):
        if new is not None:
            planes[j].normal, planes[j].offset = new


def _repair_first_layer(level: _Level, run: _Run, rounds: int = 3, lines: int = 16,
                        checks: int = 1000, max_bad: float = 0.25) -> bool:
    """Find first-layer neurons the search missed because few lines cross them.

    A plane that crosses the box only near a corner is crossed by few random lines. When one
    ReLU layer of the found neurons fits the outputs except on a small part of the box (at most
    ``max_bad`` of the fresh queries; a trimmed least-squares fit, so the misfit points do not
    spoil the fit elsewhere), lines from the points it misfits to points it fits cross the
    missing plane. A kink there that lies on a plane extending across regions of
    the known ones (checked by :func:`_kinks_on_plane`) joins the first layer. A deeper layer
    misfits a large part of the box and is left alone. Returns whether neurons were added.
    """
    rng = run.check_rng
    tol = 1e-6 * level.scale(rng)
    added = False
    for _ in range(rounds):
        run.budget.phase = "first-layer repair"
        normals = np.stack([p.normal for p in level.first])
        offsets = np.array([p.offset for p in level.first])
        x = level.sample(rng, max(checks, 3 * (len(offsets) + level.dim + 1)))
        if level.vertices is not None:  # where neurons active on a sliver of the box show
            x = np.vstack([x, level.vertices(rng, len(x))])
        f = level.oracle(x)
        features = np.hstack([np.abs(x @ normals.T + offsets), x, np.ones((len(x), 1))])
        kept = np.arange(len(x))
        for share in (0.9, 0.8, 0.7, 0.6, 0.5, 0.5):  # trimmed least squares
            theta, *_ = np.linalg.lstsq(features[kept], f[kept], rcond=None)
            err = np.abs(features @ theta - f).max(axis=1)
            kept = np.argsort(err)[:int(share * len(x))]
        bad = err > VALID_RTOL * (np.abs(f).max() + 1e-300)
        if not bad.any() or bad.all() or bad.mean() > max_bad:
            return added
        starts = x[bad][:lines]
        ends = x[~bad][rng.integers(0, int((~bad).sum()), len(starts))]
        found: list[Hyperplane] = []
        for a, b in zip(starts, ends, strict=True):
            found += _deep_pieces(level, normals, offsets, tol, a, b)
        new = []
        for plane in found:
            if any(abs(p.value(plane.points[0])) <= tol for p in new):
                continue
            pts = _kinks_on_plane(level, plane, rng)
            if len(pts) and _regions(pts, level.first) >= 2:
                new.append(plane)
        if not new:
            return added
        level.first += new
        level.deep = [p for p in level.deep
                      if not any(abs(q.value(p.points[0])) <= tol for q in new)]
        run.notes.append(f"{len(new)} first-layer neuron(s) that few lines cross found where "
                         "one layer of the others misfits the outputs")
        added = True
    return added


def _kinks_on_plane(level: _Level, plane: Hyperplane, rng: np.random.Generator,
                    trials: int = 8) -> np.ndarray:
    """Points of ``plane`` away from where it was found at which the oracle kinks across it.

    Steps of a tenth to a third of the domain's size along random directions in the plane;
    empty unless kinks show at more than half of them (a deeper neuron's boundary bends away
    from its flat piece once it crosses a first-layer plane).
    """
    scale = level.scale(rng)
    v = rng.normal(size=(trials, level.dim))
    v -= np.outer(v @ plane.normal, plane.normal)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    p = plane.points[0] + v * rng.uniform(0.1, 0.33, (trials, 1)) * scale
    p -= np.outer(plane.value(p), plane.normal)
    s = 1e-5 * scale
    steps = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    probes = p[:, None, :] + s * steps[None, :, None] * plane.normal
    f = level.oracle(probes.reshape(-1, level.dim)).reshape(trials, 5, -1)
    second = np.abs(f[:, :-2] - 2 * f[:, 1:-1] + f[:, 2:]).max(axis=2)
    floor = 1e-12 * (np.abs(f).max() + 1e-300)
    kinked = (second[:, 1] > floor) & (second[:, 1] > 100 * np.maximum(second[:, 0], second[:, 2]))
    return p[kinked] if kinked.sum() > trials // 2 else np.zeros((0, level.dim))


def _equations_solvable(n1: int, dim: int) -> bool:
    """Whether the second-layer equations' unknowns per deeper neuron (``a``: n1, ``e``: dim,
    ``c``: 1) are few enough to set them up."""
    return n1 + dim + 1 <= MAX_UNKNOWNS


def _second_opinion(level: _Level, normals: np.ndarray, offsets: np.ndarray, run: _Run,
                    depth: int, peeled: list[Layer], before: tuple[list, list]) -> list[Layer]:
    """When peeling a contractive layer gave a partial result, try the second-layer equations
    (they need no inversion, which ill-conditioned layers spoil) and keep the better result.

    Only tried with a fifth of the budget or more left (it needs fresh critical points) and at
    most ``MAX_UNKNOWNS`` unknowns per neuron (the grouping's cost grows fast with them).
    """
    kept = (list(run.found), list(run.notes))
    run.found, run.notes = list(before[0]), list(before[1])
    run.complete = True
    run.budget.searching()
    try:
        layers = _expansive(level, normals, offsets, run, depth)
    except BudgetExhausted:
        layers = []
        run.complete = False
    if run.complete:
        run.notes.append(f"layer {depth + 1}: peeling layer {depth} gave a partial result; "
                         "recovered from the second-layer equations instead")
        return layers
    run.found, run.notes = kept
    run.complete = False
    return peeled


def _expansive(level: _Level, normals: np.ndarray, offsets: np.ndarray, run: _Run,
               depth: int) -> list[Layer]:
    """Layers ``depth`` and ``depth + 1`` when layer ``depth`` is expansive (:mod:`.second_layer`).

    Critical points of deeper boundaries are collected in rounds of lines until the number of
    neurons they group into stops changing and every neuron is determined.
    """
    run.budget.phase = f"layer {depth + 1}"
    tol = 1e-6 * level.scale(run.rng)
    planes = list(level.deep)
    pts = critical_points(planes)
    neurons: list = []
    stop_at = run.budget.used + EXPANSIVE_SHARE * run.budget.left
    stable = 0
    for _ in range(EXPANSIVE_ROUNDS):
        before = len(neurons)
        try:
            planes += _deep_planes(level, normals, offsets, run, tol, stop_at)
            kept = _promote(level, planes, run, tol)
        except BudgetExhausted as exc:
            run.notes.append(f"layer {depth + 1}: {exc} while collecting points")
            break
        if len(kept) < len(planes):  # new first-layer units: every equation changes
            planes, neurons = kept, []
            normals = np.stack([p.normal for p in level.first])
            offsets = np.array([p.offset for p in level.first])
            run.found[depth - 1] = len(offsets)
        pts = critical_points(planes)
        neurons = group_neurons(pts, normals, offsets, start=neurons,
                                    deadline=run.budget.deadline)
        run.budget.neurons = sum(run.found) + len(neurons)
        run.log.append(_entry(run, f"layer {depth + 1} grouped", critical_points=len(pts.x)))
        stable = stable + 1 if len(neurons) == before else 0
        if run.budget.used >= stop_at or (
                stable and all(n.rank_deficit == 0 for n in neurons)) or stable >= 2:
            break
    try:
        for _ in range(PROBE_ROUNDS):
            before = (len(neurons), sum(n.rank_deficit for n in neurons))
            planes += _probe(level, normals, offsets, run, tol, stop_at, *_targets(
                pts, neurons, normals, offsets, level.scale(run.rng), run.rng))
            pts = critical_points(planes)
            neurons = group_neurons(pts, normals, offsets, start=neurons,
                                    deadline=run.budget.deadline)
            if (len(neurons), sum(n.rank_deficit for n in neurons)) == before:
                break
    except BudgetExhausted as exc:
        run.notes.append(f"layer {depth + 1}: {exc} while probing")
    if neurons and level.box is not None:
        try:
            _recover_missed(level, normals, offsets, run, planes, neurons, depth)
        except BudgetExhausted as exc:
            run.notes.append(f"layer {depth + 1}: {exc} while following boundaries")
        pts = critical_points(planes)
    level.deep = planes
    if not neurons:
        run.notes.append(f"layer {depth + 1}: no neuron recovered behind the expansive layer "
                         f"{depth}; the returned network has one hidden layer (the final "
                         "check says whether that explains everything)")
        return _output_layer(level, normals, offsets, run, depth)
    run.budget.phase = "output layer"
    run.budget.finishing()
    n1 = len(offsets)
    x = _fit_queries(level, run, pts, neurons, n1)
    net = assemble(pts, neurons, normals, offsets, x, level.oracle(x), run.budget.deadline)
    run.found.append(len(net.b2))
    run.budget.neurons = sum(run.found)
    free = len(pts.x) - sum(len(n.members) for n in neurons)
    run.log.append(_entry(run, "output layer fitted"))
    if net.stand_ins:
        run.notes.append(f"layer {depth + 1}: {net.stand_ins} always-on stand-in neuron(s) "
                         "reproduce neurons whose boundary never crosses the domain; with "
                         "them the sign of each other neuron of this layer is not identifiable "
                         "from outputs in the domain (least-squares choice)")
    if net.undetermined:
        run.notes.append(f"layer {depth + 1}: {net.undetermined} weight direction(s) not "
                         "determined (a first-layer unit off at every critical point of a "
                         "neuron, or its points in too few regions)")
        run.complete = False
    if free:
        run.notes.append(f"layer {depth + 1}: {free} of {len(pts.x)} critical points "
                         "joined no recovered neuron's group (the final check asks whether "
                         "each lies on some unit's boundary)")
    if net.searched_signs:
        run.notes.append(f"layer {depth}: {net.searched_signs} sign(s) not fixed by the "
                         "second-layer equations were chosen by the best output fit")
    elif net.sign_misfit > 1e-3:
        run.notes.append(f"layer {depth}: sign recovery inexact (misfit {net.sign_misfit:.1e})")
        run.complete = False
    fresh = level.sample(run.rng, VALIDATION_QUERIES)
    off = net.relative_error(fresh, level.oracle(fresh))
    if max(net.residual, off) > FIT_RTOL:
        run.notes.append(f"layer {depth + 1}: outputs are not fully explained (relative error "
                         f"{net.residual:.1e} on the fitted queries, {off:.1e} on "
                         f"{VALIDATION_QUERIES} fresh ones)")
        run.complete = False
    dense = [(net.w1, net.b1), (net.w2, net.b2), (net.w3, net.b3)]
    layers: list[Layer] = []
    for i, (w, b) in enumerate(dense):
        layers.append(Linear(torch.from_numpy(w.copy()), torch.from_numpy(b.copy())))
        if i < 2:
            layers.append(ReLU())
    return layers


def _fit_queries(level: _Level, run: _Run, pts, neurons: list, n1: int,
                 per_neuron: int = 4) -> np.ndarray:
    """Where the output layer is fitted: uniform points, and beside some critical points of
    each second-layer neuron on both sides (one rarely active is active on few uniform ones,
    and its outgoing weights would come out as zero)."""
    x = level.sample(run.rng, 4 * (n1 + len(neurons)) + 64)
    if not level.anywhere or not neurons:
        return x
    step = 0.02 * level.scale(run.rng)
    aimed = []
    for n in neurons:
        m = n.members[run.rng.permutation(len(n.members))[:per_neuron]]
        unit = pts.g[m] / np.linalg.norm(pts.g[m], axis=1, keepdims=True)
        aimed += [pts.x[m] + step * unit, pts.x[m] - step * unit]
    return np.vstack([x, *aimed])


def _recover_missed(level: _Level, normals: np.ndarray, offsets: np.ndarray, run: _Run,
                    planes: list[Hyperplane], neurons: list, depth: int) -> None:
    """Second-layer neurons the grouping missed or left undetermined, by following their
    boundaries from cell to cell (:mod:`.trace`).

    A neuron whose points leave weight directions undetermined is followed from one of its
    points into the cells it lacks. Where the network assembled from the neurons found so far
    misfits the oracle (checked on the box's vertices, where a neuron active on a sliver of
    the box is active, and on uniform points), lines from misfit points to the nearest fitting
    ones cross a missed neuron's boundary; those kinks, and critical points no recovered unit
    explains, are followed until the neuron's equations are determined. ``planes`` and
    ``neurons`` change in place.
    """
    lo, hi = level.box
    scale = float(np.linalg.norm(hi - lo))
    tol = 1e-6 * level.scale(run.rng)
    n1, d = normals.shape

    keep = 3 * VALIDATION_QUERIES + 2**min(d, MAX_ALL_VERTICES_DIM) + 16 * (n1 + len(neurons))

    def follow(start: Hyperplane, known: np.ndarray | None = None):
        cap = min((run.budget.left - keep) // 2, TRACE_QUERIES_PER_UNKNOWN * (n1 + d + 1))
        if cap <= 0:
            raise BudgetExhausted(f"query budget of {run.budget.budget} nearly spent")
        return trace(level.oracle, normals, offsets, start, lo, hi, level.anywhere,
                     run.budget.late, max_cells=4 * n1 + 8, max_queries=cap, known=known)

    followed: set[int] = set()  # neurons followed once already
    for _ in range(TRACE_ROUNDS):
        run.budget.phase = f"layer {depth + 1}: following boundaries"
        pts = critical_points(planes)
        x = _fit_queries(level, run, pts, neurons, n1)
        net = assemble(pts, neurons, normals, offsets, x, level.oracle(x), run.budget.deadline)
        changed = 0
        for j, n in enumerate(list(neurons)):
            if not net.deficits[j] or id(n) in followed or run.budget.late():
                continue
            followed.add(id(n))
            k = int(run.rng.integers(len(n.members)))
            got = follow(_pieces(planes)[n.members[k]], pts.x[n.members])
            if len(got.planes) < 2:
                continue
            planes += got.planes[1:]
            pts = critical_points(planes)
            count = len(pts.x)
            members = np.concatenate([n.members, np.arange(count - len(got.planes) + 1, count)])
            signs = np.concatenate([n.signs, n.signs[k] * got.signs[1:]])
            better = traced_neuron(pts, normals, offsets, members, signs)
            if better is not None and better.rank_deficit <= n.rank_deficit:
                neurons[j] = better
                followed.add(id(better))
                changed += 1
        if changed:
            x = _fit_queries(level, run, pts, neurons, n1)
            net = assemble(pts, neurons, normals, offsets, x, level.oracle(x),
                           run.budget.deadline)
        unexplained = _unexplained_pieces(planes, neurons, net, EXPLAIN_RTOL * scale)
        seeds = _relocated(level, normals, offsets, run, net, tol, EXPLAIN_RTOL * scale,
                           [unexplained[i] for i in run.rng.permutation(len(unexplained))])
        if len(seeds) < TRACE_SEEDS:
            seeds += _misfit_pieces(level, normals, offsets, run, net, tol,
                                    EXPLAIN_RTOL * scale)
        added: list = []
        for seed in seeds[:TRACE_SEEDS]:
            if run.budget.late():
                return
            if any(_explained(n, seed.points[0], normals, offsets, tol) for n in added):
                continue
            got = follow(seed)
            planes += got.planes
            pts = critical_points(planes)
            members = np.arange(len(pts.x) - len(got.planes), len(pts.x))
            neuron = traced_neuron(pts, normals, offsets, members, got.signs)
            if neuron is None:
                continue
            # a neuron found before from too few cells to be determined may be this one
            neurons[:] = [n for n in neurons if n.rank_deficit <= neuron.rank_deficit or np.mean(
                [_explained(neuron, p, normals, offsets, tol) for p in pts.x[n.members]]) < 0.5]
            neurons.append(neuron)
            added.append(neuron)
            followed.add(id(neuron))
        if not added and not changed:
            return


def _pieces(planes: list[Hyperplane]) -> list[Hyperplane]:
    """One boundary piece per critical point, in the order of :func:`critical_points`."""
    pieces = []
    for plane in planes:
        if plane.jump is None or plane.slope_jump is None:
            continue
        pieces += [Hyperplane(plane.normal, float(-plane.normal @ x), [x], plane.jump,
                              plane.slope_jump, plane.gap) for x in plane.points]
    return pieces


def _explained(n, x: np.ndarray, normals: np.ndarray, offsets: np.ndarray,
               tol: float) -> bool:
    """Whether ``x`` lies on the boundary of second-layer neuron ``n`` (signed-free form)."""
    z = normals @ x + offsets
    u = n.a @ np.maximum(z, 0.0) + n.e @ x + n.c
    grad = normals.T @ (n.a * (z > 0)) + n.e
    return bool(abs(u) <= 10 * tol * np.linalg.norm(grad))


def _unexplained_pieces(planes: list[Hyperplane], neurons: list, net, tol: float
                        ) -> list[Hyperplane]:
    """Boundary pieces at critical points no neuron claimed and no unit of ``net`` explains."""
    claimed = set()
    for n in neurons:
        claimed.update(int(i) for i in n.members)
    return _not_explained([p for i, p in enumerate(_pieces(planes)) if i not in claimed],
                          net, tol)


def _not_explained(pieces: list[Hyperplane], net, tol: float) -> list[Hyperplane]:
    """The ``pieces`` whose first point lies farther than ``tol`` from every unit of ``net``."""
    if not pieces:
        return []
    dist = distances(net.dense(), np.stack([p.points[0] for p in pieces]))
    nearest = np.min([dl.min(axis=1) for dl in dist], axis=0)
    return [p for p, near in zip(pieces, nearest, strict=True) if not near <= tol]


def _relocated(level: _Level, normals: np.ndarray, offsets: np.ndarray, run: _Run, net,
               tol: float, explain_tol: float, pieces: list[Hyperplane]) -> list[Hyperplane]:
    """``pieces`` where the oracle really kinks, re-measured on a short line along their
    normal, that no unit of ``net`` explains (the search also keeps points measured between two
    close kinks, which lie on no boundary)."""
    if not pieces:
        return []
    scale = float(np.linalg.norm(level.box[1] - level.box[0]))
    x = np.stack([p.points[0] for p in pieces])[:MAX_SEEDS_TESTED]
    real, _ = kinked(level.oracle, x, 1e-5 * scale, run.rng, run.budget.left)
    if real is None:
        return []
    found: list[Hyperplane] = []
    half = 1e-3 * scale
    for p, ok in zip(pieces, real, strict=False):
        if not ok:
            continue
        if len(found) >= 2 * TRACE_SEEDS:
            break
        x0 = p.points[0]
        # off-centre: the kink must not fall on the line's first grid of points
        near = _deep_pieces(level, normals, offsets, tol, x0 - 0.93 * half * p.normal,
                            x0 + 1.07 * half * p.normal)
        if near:
            found.append(min(near, key=lambda q: float(np.linalg.norm(q.points[0] - x0))))
    return _not_explained(found, net, explain_tol)


def _misfit_pieces(level: _Level, normals: np.ndarray, offsets: np.ndarray, run: _Run, net,
                   tol: float, explain_tol: float, lines: int = 6) -> list[Hyperplane]:
    """Boundary pieces no unit of ``net`` explains, on lines from points it misfits."""
    x = np.vstack([_vertices(level, run), level.sample(run.rng, VALIDATION_QUERIES)])
    y = level.oracle(x)
    err = np.abs(net.forward(x) - y).max(axis=1) / (np.abs(y).max() + 1e-300)
    bad = err > VALID_RTOL
    if not bad.any() or bad.mean() > 0.25:
        return []
    good = x[~bad]
    pieces: list[Hyperplane] = []
    for b in x[bad][run.rng.permutation(int(bad.sum()))[:lines]]:
        near = good[np.argsort(np.linalg.norm(good - b, axis=1))[:1]]
        pieces += _not_explained(_deep_pieces(level, normals, offsets, tol, b, near[0]), net,
                                 explain_tol)
    return pieces


def _promote(level: _Level, planes: list[Hyperplane], run: _Run,
             tol: float) -> list[Hyperplane]:
    """Move first-layer planes the search missed from ``planes`` to ``level.first``.

    A unit whose kinks are rarely visible can escape the search; among the deeper points its
    kinks lie on one hyperplane, which then passes the first-layer tests.
    """
    if len(planes) < 2:
        return planes
    normals = np.stack([p.normal for p in planes])
    points = np.stack([p.points[0] for p in planes])
    coplanar = (np.abs(normals @ normals.T) > 1 - 1e-6) & (
        np.abs(np.einsum("id,jd->ij", normals, points)
               + np.array([p.offset for p in planes])[:, None]) <= tol)
    taken = np.zeros(len(planes), dtype=bool)
    for i in np.flatnonzero(coplanar.sum(1) >= 2):
        if taken[i]:
            continue
        witness = _kinks_on_extension(level, planes[i], run.rng, 8)
        if len(witness) and _regions(witness, level.first) >= 2:
            level.first.append(planes[i])
            taken |= coplanar[i]
    return [p for p, t in zip(planes, taken, strict=True) if not t]


def _targets(pts, neurons: list, normals: np.ndarray, offsets: np.ndarray, scale: float,
             rng: np.random.Generator, per_point: int = 3,
             max_points: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where to look for more critical points: probe centres, directions and half-lengths.

    Near points no neuron claimed (a neuron seen too rarely), at small offsets along their
    boundary; and for each neuron, just across every first-layer plane that none of its points
    has crossed (the weights of that unit are not determined without such a point). There the
    boundary bends, by up to about the distance travelled, so the probe is as long.
    """
    claimed = np.zeros(len(pts.x), dtype=bool)
    centres, dirs, halves = [], [], []
    for n in neurons:
        claimed[n.members] = True
        z = pts.x[n.members] @ normals.T + offsets
        fixed = np.flatnonzero((z > 0).all(0) | (z < 0).all(0))
        for i in fixed:
            k = int(np.argmin(np.abs(z[:, i])))
            p, g = pts.x[n.members[k]], pts.g[n.members[k]]
            unit = g / np.linalg.norm(g)
            along = normals[i] - (normals[i] @ unit) * unit
            rate = along @ normals[i]
            if rate <= 1e-9:
                continue
            step = -1.5 * z[k, i] / rate
            centres.append(p + step * along)
            dirs.append(unit)
            halves.append(max(0.02 * scale, abs(step) * np.linalg.norm(along)))
    free = np.flatnonzero(~claimed)
    free = rng.permutation(free)[:max_points]
    for k in free:
        unit = pts.g[k] / np.linalg.norm(pts.g[k])
        for _ in range(per_point):
            shift = rng.normal(size=len(unit))
            shift -= (shift @ unit) * unit
            centres.append(pts.x[k] + 0.05 * scale * shift / np.linalg.norm(shift))
            dirs.append(unit)
            halves.append(0.02 * scale)
    d = normals.shape[1]
    if not centres:
        return np.zeros((0, d)), np.zeros((0, d)), np.zeros(0)
    return np.stack(centres), np.stack(dirs), np.array(halves)


def _probe(level: _Level, normals: np.ndarray, offsets: np.ndarray, run: _Run, tol: float,
           stop_at: float, centres: np.ndarray, dirs: np.ndarray,
           halves: np.ndarray) -> list[Hyperplane]:
    """Boundary pieces of deeper neurons on short lines ``centre +- half * dir``."""
    planes: list[Hyperplane] = []
    for c, u, half in zip(centres, dirs, halves, strict=True):
        if run.budget.used >= stop_at:
            break
        planes += _deep_pieces(level, normals, offsets, tol, c - half * u, c + half * u)
    return planes


def _deep_planes(level: _Level, normals: np.ndarray, offsets: np.ndarray, run: _Run,
                 tol: float, stop_at: float, lines: int = 50) -> list[Hyperplane]:
    """Boundary pieces of deeper neurons on ``lines`` random lines through the domain."""
    planes: list[Hyperplane] = []
    for _ in range(lines):
        if run.budget.used >= stop_at:
            break
        planes += _deep_pieces(level, normals, offsets, tol, *level.sample(run.rng, 2))
    return planes


def _deep_pieces(level: _Level, normals: np.ndarray, offsets: np.ndarray, tol: float,
                 a: np.ndarray, b: np.ndarray) -> list[Hyperplane]:
    """The local boundaries at the kinks of ``a -> b`` off the known first-layer planes."""
    kinks = [k for k in kinks_on_line(level.oracle, a, b)
             if np.abs(normals @ k.x + offsets).min() > tol]
    return [p for p in boundary_normals(level.oracle, kinks) if p is not None]


def _least_squares_output(level: _Level, run: _Run) -> Linear:
    """An affine read-out of the last recovered layer, fitted on points already queried."""
    h, f = level.oracle.cached()
    finite = np.isfinite(h).all(axis=1) & np.isfinite(f).all(axis=1)
    h, f = h[finite], f[finite]
    if len(h) <= h.shape[1]:
        raise BudgetExhausted("too few finite activations to fit an output layer to")
    features = np.hstack([h, np.ones((len(h), 1))])
    theta, *_ = np.linalg.lstsq(features, f, rcond=None)
    return Linear(torch.from_numpy(theta[:-1].T.copy()), torch.from_numpy(theta[-1].copy()))


def _search(level: _Level, run: _Run, phase: str, stop_at: float,
            min_lines: int = 4, patience: int = 4, max_lines: int = 400) -> None:
    """Sample lines until no new repeated hyperplane shows up for ``patience`` lines."""
    run.budget.phase = phase
    tol = 1e-6 * level.scale(run.rng)
    planes: list[Hyperplane] = []
    stable, repeated = 0, 0
    for line in range(max_lines):
        if run.budget.used >= stop_at:
            run.notes.append(f"{phase}: search stopped at its share of the budget")
            break
        a, b = level.sample(run.rng, 2)
        kinks = kinks_on_line(level.oracle, a, b)
        if len(kinks) > 8 * level.dim + 64:
            raise BudgetExhausted(f"{phase}: {len(kinks)} kinks on one line, the inverted "
                                  "layers are too ill-conditioned to go on")
        new = []
        for kink in kinks:
            match = next((p for p in planes if abs(p.value(kink.x)) <= tol), None)
            if match is None:
                new.append(kink)
            else:
                match.points.append(kink.x)
        planes += [p for p in boundary_normals(level.oracle, new) if p is not None]
        now = sum(len(p.points) > 1 for p in planes)
        stable = stable + 1 if now == repeated else 0
        repeated = now
        run.budget.neurons = sum(run.found) + repeated
        run.log.append(_entry(run, phase, critical_points=sum(len(p.points) for p in planes)))
        if line + 1 >= min_lines and stable >= patience:
            break
    level.deep = planes


def _split_first_layer(level: _Level, run: _Run, trials: int = 8) -> None:
    """Keep the hyperplanes that extend across the box (first layer); the rest are deeper.

    A deeper neuron's boundary is flat only inside one region of the first layer, so a plane
    that shows kinks where random lines cross it must also show them in at least two regions
    of the other candidate planes; a boundary piece of a deeper neuron with few bends can
    pass the first test but not the second.
    """
    run.budget.phase = "first-layer test"
    witnessed = [(plane, _kinks_on_extension(level, plane, run.rng, trials))
                 for plane in level.deep]
    candidates = [(plane, pts) for plane, pts in witnessed if len(pts)]
    first, deep = [], [plane for plane, pts in witnessed if not len(pts)]
    for k, (plane, pts) in enumerate(candidates):
        others = [p for i, (p, _) in enumerate(candidates) if i != k]
        (first if not others or _regions(pts, others) >= 2 else deep).append(plane)
    level.first, level.deep = first, deep


def _regions(points: np.ndarray, planes: list[Hyperplane]) -> int:
    """How many cells of the arrangement of ``planes`` the ``points`` fall in."""
    if not planes:
        return 1
    normals = np.stack([p.normal for p in planes])
    offsets = np.array([p.offset for p in planes])
    return len(np.unique(points @ normals.T + offsets > 0, axis=0))


def _kinks_on_extension(level: _Level, plane: Hyperplane, rng: np.random.Generator,
                        trials: int) -> np.ndarray:
    """Points where random lines through the box cross ``plane`` and find a kink there.

    Empty when the plane does not extend: kinks at fewer than half the crossings tried.
    """
    a, b = level.sample(rng, 128).reshape(2, 64, level.dim)
    va, vb = plane.value(a), plane.value(b)
    cross = np.flatnonzero(np.sign(va) != np.sign(vb))[:trials]
    if len(cross) == 0:
        return np.zeros((0, level.dim))
    t = va[cross] / (va[cross] - vb[cross])
    p = a[cross] + t[:, None] * (b[cross] - a[cross])
    s = 1e-5 * level.scale(rng)
    steps = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    pts = p[:, None, :] + s * steps[None, :, None] * plane.normal
    f = level.oracle(pts.reshape(-1, level.dim)).reshape(len(cross), 5, -1)
    second = f[:, :-2] - 2 * f[:, 1:-1] + f[:, 2:]  # at steps -1, 0, 1
    mag = np.abs(second).max(axis=2)
    floor = 1e-12 * (np.abs(f).max() + 1e-300)
    kinked = (mag[:, 1] > floor) & (mag[:, 1] > 100 * np.maximum(mag[:, 0], mag[:, 2]))
    if int(kinked.sum()) < max(1, (len(cross) + 1) // 2):
        return np.zeros((0, level.dim))
    return p[kinked]


@dataclass
class _OneLayer:
    """The last hidden layer's signs and the output layer, and how well they fit."""

    layers: list[Layer]
    residual: float
    sign_err: float
    stand_ins: int = 0


def _fit_one_layer(level: _Level, normals: np.ndarray, offsets: np.ndarray, run: _Run,
                   rng: np.random.Generator | None = None) -> _OneLayer:
    """Signs of the last hidden layer and the output layer, from one least-squares fit.

    ``relu(s z) = (s z + |z|) / 2``: the outputs are linear in ``[|z_j|, x, 1]``. Those columns
    are only independent when every plane has sampled points on both sides, so besides random
    points each plane gets two points just across it from one of its critical points (a plane
    near the box's edge is crossed by few random points). Exact when the outputs are one ReLU
    layer of the found neurons.
    """
    rng = run.rng if rng is None else rng
    n, d = normals.shape
    x = level.sample(rng, 2 * (n + d + 1) + 16)
    if level.anywhere:
        x = np.vstack([x, _both_sides(level, normals, offsets, rng)])
    f = level.oracle(x)
    z = x @ normals.T + offsets
    features = np.hstack([np.abs(z), x, np.ones((len(x), 1))])
    theta, *_ = np.linalg.lstsq(features, f, rcond=None)
    residual = np.abs(features @ theta - f).max() / (np.abs(f).max() + 1e-300)
    a, linear, const = theta[:n], theta[n:n + d].T, theta[-1]
    signs, sign_err = _solve_signs(a, normals, linear)
    out_w = 2 * a.T
    out_b = const - (signs[:, None] * a * offsets[:, None]).sum(axis=0)
    weight, bias = signs[:, None] * normals, signs * offsets
    stand_ins = 0
    if sign_err > SIGN_RTOL:  # neurons that never switch in the domain act linearly there
        rest = linear - np.einsum("j,jk,jd->kd", signs, a, normals)
        u, sv, vt = np.linalg.svd(rest, full_matrices=False)
        keep = sv > 1e-9 * max(np.abs(linear).max(), 1e-300)
        rows = vt[keep]
        vals = level.sample(rng, 4096) @ rows.T
        lift = -vals.min(axis=0) + (vals.max(axis=0) - vals.min(axis=0))  # on in the domain
        weight = np.vstack([weight, rows])
        bias = np.concatenate([bias, lift])
        out_w = np.hstack([out_w, u[:, keep] * sv[keep]])
        out_b = out_b - (u[:, keep] * sv[keep]) @ lift
        stand_ins = int(keep.sum())
    layers: list[Layer] = [Linear(torch.from_numpy(weight), torch.from_numpy(bias)), ReLU(),
                           Linear(torch.from_numpy(out_w), torch.from_numpy(out_b))]
    return _OneLayer(layers, float(residual), sign_err, stand_ins)


def _both_sides(level: _Level, normals: np.ndarray, offsets: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """For each plane, one point on each side of it, near a point of the plane in the domain.

    Only for a level whose oracle is valid everywhere (a peeled layer's is not, below zero).
    """
    if len(level.first) != len(offsets):
        return np.zeros((0, level.dim))
    scale = level.scale(rng)
    base = np.stack([p.points[0] for p in level.first])
    base -= (np.einsum("jd,jd->j", base, normals) + offsets)[:, None] * normals
    step = 0.02 * scale * normals
    return np.vstack([base + step, base - step])


def _output_layer(level: _Level, normals: np.ndarray, offsets: np.ndarray, run: _Run,
                  depth: int) -> list[Layer]:
    """Signs of the last hidden layer and the output layer (:func:`_fit_one_layer`)."""
    run.budget.phase = "output layer"
    run.budget.finishing()
    fit = _fit_one_layer(level, normals, offsets, run)
    residual, sign_err = fit.residual, fit.sign_err
    if residual > VALID_RTOL:  # the final check holds the result to the same tolerance
        run.notes.append(f"layer {depth}: outputs are not one ReLU layer of the found neurons "
                         f"(relative fit residual {residual:.1e})")
        run.complete = False
    if fit.stand_ins:
        run.notes.append(
            f"layer {depth}: the signs of its neurons do not fit the outputs' linear part "
            f"(misfit {sign_err:.1e}): neurons whose boundary never crosses the domain act "
            f"linearly there. {fit.stand_ins} always-on stand-in neuron(s) reproduce them, and "
            "the signs of the others are not identifiable from outputs in the domain "
            "(least-squares choice)")
        run.complete = False
    run.log.append(_entry(run, "output layer fitted"))
    return fit.layers


def _solve_signs(a: np.ndarray, normals: np.ndarray, linear: np.ndarray) -> tuple[np.ndarray, float]:
    """Signs ``s`` with ``sum_j s_j a_j u_j^T = linear``; returns them and the relative misfit."""
    cols = np.einsum("jk,jd->kdj", a, normals).reshape(-1, len(a))
    target = linear.reshape(-1)
    norm = np.linalg.norm(target) + np.linalg.norm(cols) + 1e-300
    if np.linalg.matrix_rank(cols) == len(a) or len(a) > MAX_EXHAUSTIVE_SIGNS:
        beta, *_ = np.linalg.lstsq(cols, target, rcond=None)
        signs = np.where(beta >= 0, 1.0, -1.0)
    else:
        best, signs = np.inf, np.ones(len(a))
        for chunk in _sign_chunks(len(a)):
            err = np.linalg.norm(chunk @ cols.T - target, axis=1)
            i = int(np.argmin(err))
            if err[i] < best:
                best, signs = err[i], chunk[i].copy()
    return signs, float(np.linalg.norm(cols @ signs - target) / norm)


def _sign_chunks(n: int, chunk_bits: int = 14):
    """All ``2^n`` sign vectors, in chunks of at most ``2^chunk_bits`` rows."""
    low = min(n, chunk_bits)
    tail = np.array(list(itertools.product((1.0, -1.0), repeat=low)))
    for head in itertools.product((1.0, -1.0), repeat=n - low):
        yield np.hstack([np.broadcast_to(np.array(head), (len(tail), n - low)), tail])


def _vote_signs(normals: np.ndarray, offsets: np.ndarray, deep: list[Hyperplane], run: _Run,
                depth: int) -> np.ndarray:
    """First-layer signs from deeper boundaries: their normals use only *active* neurons."""
    votes = np.zeros(len(normals))
    for plane in deep:
        beta, *_ = np.linalg.lstsq(normals.T, plane.normal, rcond=None)
        if np.linalg.norm(normals.T @ beta - plane.normal) > 1e-6:
            continue  # not in the span of the found neurons: one of them is missing
        z = normals @ plane.points[0] + offsets
        active = np.abs(beta) > 1e-6 * np.abs(beta).max()
        clear = np.abs(z) > 1e-9
        votes += np.where(clear, np.where(active, np.sign(z), -np.sign(z)), 0.0)
    if np.any(votes == 0):
        run.notes.append(f"layer {depth}: {int((votes == 0).sum())} sign(s) undetermined")
        run.complete = False
    return np.where(votes >= 0, 1.0, -1.0)


class _Peeled:
    """``h -> f(x)`` with ``x`` chosen so the known first layer outputs exactly ``h >= 0``."""

    def __init__(self, oracle: Oracle, weight: np.ndarray, bias: np.ndarray) -> None:
        self._oracle = oracle
        self._pinv = np.linalg.pinv(weight)
        self._bias = bias

        self._seen: list[tuple[np.ndarray, np.ndarray]] = []

    def inputs(self, h: np.ndarray) -> np.ndarray:
        """The inputs queried for activations ``h``."""
        return (np.atleast_2d(h) - self._bias) @ self._pinv.T

    def __call__(self, h: np.ndarray) -> np.ndarray:
        h = np.atleast_2d(h)
        out = self._oracle(self.inputs(h))
        if sum(len(a) for a, _ in self._seen) < 20_000:
            self._seen.append((h, out))
        return out

    def cached(self) -> tuple[np.ndarray, np.ndarray]:
        """Up to 20k points queried so far and their outputs."""
        if not self._seen:
            return np.zeros((0, len(self._bias))), np.zeros((0, 1))
        return np.vstack([a for a, _ in self._seen]), np.vstack([b for _, b in self._seen])


def _peel(level: _Level, weight: np.ndarray, bias: np.ndarray, run: _Run) -> _Level:
    """The next layer's problem on the activations the current domain produces.

    They are shifted by a small positive margin so every probe keeps each neuron active.
    """
    h = np.maximum(level.sample(run.rng, 1024) @ weight.T + bias, 0.0)
    margin = 0.01 * np.maximum(h.max(axis=0), 1e-3 * h.max())

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.maximum(level.sample(rng, n) @ weight.T + bias, 0.0) + margin

    peeled = _Peeled(level.oracle, weight, bias)
    inner = _Level(peeled, sample, len(bias), anywhere=False,
                   to_input=lambda h: level.to_input(peeled.inputs(h)))
    run.levels.append(inner)
    return inner


def _entry(run: _Run, phase: str, **extra: int) -> dict:
    return {"phase": phase, "queries": run.budget.used, "neurons": run.budget.neurons, **extra}


def _points(top: _Level) -> tuple[np.ndarray, np.ndarray]:
    pts, owner = [], []
    for i, plane in enumerate(top.first):
        pts += plane.points
        owner += [i] * len(plane.points)
    for plane in top.deep:
        pts += plane.points
        owner += [-1] * len(plane.points)
    if not pts:
        return np.zeros((0, top.dim)), np.zeros(0, dtype=int)
    return np.stack(pts), np.array(owner)


def _first_layer(top: _Level) -> tuple[np.ndarray, np.ndarray]:
    if top.first:
        return np.stack([p.normal for p in top.first]), np.array([p.offset for p in top.first])
    return np.zeros((0, top.dim)), np.zeros(0)
