"""Following a second-layer neuron's boundary (:mod:`app.analyses.extraction.trace`).

The true 5-10-8-1 network is written here; the first layer is given (unit rows with random
signs, as the attack has them), and every point the tracer returns is checked against the true
second-layer neuron it started on: on its boundary, with the sign of its equations agreeing
with the true gradient, and enough cells (inside and outside the box) to determine it.
"""

from __future__ import annotations

import numpy as np

from app.analyses.extraction.lines import boundary_normals, kinks_on_line
from app.analyses.extraction.trace import equation_rank, jump_vector, trace


def test_trace_stays_on_one_neuron_and_determines_it() -> None:
    rng = np.random.default_rng(0)
    sizes = (5, 10, 8, 1)
    layers = [(rng.normal(0, np.sqrt(2 / a), (b, a)), rng.normal(0, 0.1, b))
              for a, b in zip(sizes[:-1], sizes[1:], strict=False)]
    (w1, b1), (w2, b2), (w3, _) = layers

    def oracle(x: np.ndarray) -> np.ndarray:
        for i, (w, b) in enumerate(layers):
            x = x @ w.T + b
            if i < len(layers) - 1:
                x = np.maximum(x, 0.0)
        return x

    def second(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True pre-activations [n2] of the second layer at x and their gradients [n2, d]."""
        z = w1 @ x + b1
        return w2 @ np.maximum(z, 0.0) + b2, (w2 * (z > 0)) @ w1

    norm = np.linalg.norm(w1, axis=1)
    flip = rng.choice([-1.0, 1.0], len(b1))
    normals, offsets = flip[:, None] * w1 / norm[:, None], flip * b1 / norm
    start = None
    while start is None:  # a kink of a second-layer neuron on a random line
        a, b = rng.uniform(-1, 1, (2, 5))
        for kink in kinks_on_line(oracle, a, b):
            u, _ = second(kink.x)
            if np.abs(normals @ kink.x + offsets).min() > 1e-6 and np.abs(u).min() < 1e-9:
                start = boundary_normals(oracle, [kink])[0]
                break
    neuron = int(np.argmin(np.abs(second(start.points[0])[0])))
    lo, hi = -np.ones(5), np.ones(5)
    got = trace(oracle, normals, offsets, start, lo, hi, True, lambda: False, max_cells=48,
                max_queries=50_000)
    assert got.cells >= 4 and len(got.planes) == len(got.signs)
    oriented = []
    for plane, sign in zip(got.planes, got.signs, strict=True):
        x = plane.points[0]
        u, grad = second(x)
        assert abs(u[neuron]) <= 1e-9 * np.linalg.norm(grad[neuron])  # on the same neuron
        g, _ = jump_vector(plane)
        true = abs(w3[0, neuron]) * grad[neuron]
        cos = sign * g @ true / (np.linalg.norm(g) * np.linalg.norm(true))
        oriented.append(cos)
    oriented = np.array(oriented)
    # one common orientation: every signed jump is +|v| grad u, or every one is -|v| grad u
    assert np.all(oriented > 1 - 1e-6) or np.all(oriented < -(1 - 1e-6))
    xs = np.stack([p.points[0] for p in got.planes])
    assert equation_rank(xs, normals, offsets) == 10 + 5 + 1
