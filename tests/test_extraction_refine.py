"""Precision refinement of first-layer planes (:mod:`app.analyses.extraction.refine`).

The cell centre is checked against random points of the same plane and cell (none may lie
farther from the other planes), and the re-measured planes of a 1-hidden-layer net, started
from perturbed ones, against the true rows after an alignment written here (unit normal,
sign fixed by the perturbed start).
"""

from __future__ import annotations

import numpy as np

from app.analyses.extraction.refine import cell_centre, remeasure


def unit_planes(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    w = rng.normal(size=(n, d))
    b = rng.normal(0, 0.3, n)
    norm = np.linalg.norm(w, axis=1)
    return w / norm[:, None], b / norm


def test_cell_centre_is_farthest_from_the_other_planes() -> None:
    rng = np.random.default_rng(0)
    normals, offsets = unit_planes(rng, 12, 5)
    lo, hi = -np.ones(5), np.ones(5)
    ref = rng.uniform(-0.5, 0.5, 5)
    ref -= (normals[3] @ ref + offsets[3]) * normals[3]
    x, radius = cell_centre(normals, offsets, 3, ref, lo, hi)
    others = np.delete(np.arange(12), 3)
    assert abs(normals[3] @ x + offsets[3]) < 1e-9
    assert np.all(x >= lo - 1e-9) and np.all(x <= hi + 1e-9)
    dist = normals[others] @ x + offsets[others]
    side = np.sign(normals[others] @ ref + offsets[others])
    assert np.all(side * dist > 0)  # in ref's cell
    assert radius == np.abs(dist).min() > 0
    # random points of the plane in the box and the same cell are never farther out
    y = rng.uniform(-1, 1, (200_000, 5))
    y -= np.outer(y @ normals[3] + offsets[3], normals[3])
    vals = y @ normals[others].T + offsets[others]
    same = (np.all(np.abs(y) <= 1, axis=1)) & np.all(vals * side > 0, axis=1)
    assert same.sum() > 10
    assert np.abs(vals[same]).min(axis=1).max() <= radius * (1 + 1e-9)


def test_remeasure_recovers_rows_to_full_precision() -> None:
    """One hidden layer of 20 units on 30 inputs, two outputs; planes off by ~1e-5 to start."""
    rng = np.random.default_rng(1)
    w1, b1 = rng.normal(0, np.sqrt(2 / 30), (20, 30)), rng.normal(0, 0.1, 20)
    w2, b2 = rng.normal(size=(2, 20)), rng.normal(size=2)
    queries = []

    def oracle(x: np.ndarray) -> np.ndarray:
        queries.append(len(x))
        return np.maximum(x @ w1.T + b1, 0.0) @ w2.T + b2

    norm = np.linalg.norm(w1, axis=1)
    normals = w1 / norm[:, None] + rng.normal(0, 1e-5, w1.shape)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    offsets = b1 / norm + rng.normal(0, 1e-5, 20)
    lo, hi = -np.ones(30), np.ones(30)
    centres, radii = [], []
    for j in range(20):
        ref = rng.uniform(-0.3, 0.3, 30)
        ref -= (normals[j] @ ref + offsets[j]) * normals[j]
        c, r = cell_centre(normals, offsets, j, ref, lo, hi)
        centres.append(c)
        radii.append(r)
    found = remeasure(oracle, normals, np.stack(centres), np.array(radii))
    assert sum(queries) == 20 * (2 * 30 + 2)
    for j, new in enumerate(found):
        assert new is not None
        normal, offset = new
        true = np.r_[w1[j], b1[j]] / norm[j]
        assert np.linalg.norm(np.r_[normal, offset] - true) < 1e-10
