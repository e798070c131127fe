"""How close the extraction came: per-layer weight errors after alignment, and agreement.

A ReLU network is only identifiable up to permuting each hidden layer and scaling each hidden
neuron by a positive factor (absorbed by the next layer). Layers are aligned in order: the
previous layer's permutation and scales are applied to the columns of the true matrix, then
rows are matched by cosine similarity (scipy's ``linear_sum_assignment``) and each scale is
the least-squares factor. Errors are relative: ``|true_row - scale * recovered_row| / |true_row|``
over weights and bias together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from app.analyses.extraction.recover import ExtractionResult
from app.errors import UnsupportedModelError
from app.layers import AffineLayer, ReLU
from app.network import Network


@dataclass
class LayerGrade:
    """One layer: neurons true vs found, and relative row errors after alignment."""

    layer: str
    true_neurons: int
    found_neurons: int
    max_rel_err: float
    median_rel_err: float
    max_rel_err_up_to_sign: float


@dataclass
class Grade:
    """The extraction graded against the true network."""

    layers: list[LayerGrade]
    argmax_agreement: float
    max_abs_logit_diff: float
    queries: int
    seconds: float

    def table(self) -> list[dict]:
        """Rows for a table: one per layer."""
        return [asdict(g) for g in self.layers]


def dense_layers(net: Network) -> list[tuple[np.ndarray, np.ndarray]]:
    """The network as ``[(W, b), ...]`` with a ReLU between consecutive entries (float64)."""
    if not net.is_sequential:
        raise UnsupportedModelError("grading needs a sequential network")
    net = net.with_dtype(torch.float64)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    n = int(np.prod(net.input_shape))
    acc = (np.eye(n), np.zeros(n))
    for i, layer in enumerate(net.layers):
        if isinstance(layer, ReLU):
            out.append(acc)
            acc = (np.eye(len(acc[1])), np.zeros(len(acc[1])))
        elif isinstance(layer, AffineLayer):
            a, b = (t.detach().numpy() for t in layer.matrix(net.in_shape(i)))
            acc = (a @ acc[0], a @ acc[1] + b)
        else:
            raise UnsupportedModelError(f"grading supports linear/ReLU layers, not {layer.kind}")
    out.append(acc)
    return out


def grade(
    true_net: Network,
    result: ExtractionResult,
    lo: float | np.ndarray = -1.0,
    hi: float | np.ndarray = 1.0,
    n_samples: int = 10_000,
    seed: int = 0,
) -> Grade:
    """Compare ``result`` with ``true_net`` on weights and on ``n_samples`` inputs in ``[lo, hi]``."""
    true = dense_layers(true_net)
    found = dense_layers(result.network) if result.network is not None else []
    grades = _weight_grades(true, found)
    d = true[0][0].shape[1]
    x = np.random.default_rng(seed).uniform(lo, hi, (n_samples, d))
    ref = _forward(true, x)
    if found and found[0][0].shape[1] == d and found[-1][0].shape[0] == ref.shape[1]:
        ours = _forward(found, x)
        agree = float((ours.argmax(1) == ref.argmax(1)).mean())
        diff = float(np.abs(ours - ref).max())
    else:
        agree, diff = 0.0, float("inf")
    return Grade(grades, agree, diff, result.queries, result.seconds)


def _forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x


def _weight_grades(true: list, found: list) -> list[LayerGrade]:
    grades: list[LayerGrade] = []
    # true previous-layer neuron i is recovered neuron perm[i] scaled by scale[i]
    perm = np.arange(true[0][0].shape[1])
    scale = np.ones(len(perm))
    for depth, (w, b) in enumerate(true):
        last = depth == len(true) - 1
        name = "output" if last else f"hidden {depth + 1}"
        missing = len(found) != len(true) if last else depth >= len(found) - 1
        if missing:
            grades.append(LayerGrade(name, len(b), 0, np.inf, np.inf, np.inf))
            continue
        fw, fb = found[depth]
        target = np.zeros((len(b), fw.shape[1] + 1))
        keep = perm >= 0
        target[:, perm[keep]] = w[:, keep] * scale[keep]
        target[:, -1] = b
        rows = np.hstack([fw, fb[:, None]])
        if last:
            err = _rel_err(target, rows, np.ones(len(b)))
            grades.append(LayerGrade(name, len(b), len(fb), err.max(), np.median(err), err.max()))
            break
        perm, scale, err, err_signed = _match_rows(target, rows)
        matched = err[np.isfinite(err)]
        signed = err_signed[np.isfinite(err_signed)]
        grades.append(LayerGrade(
            name, len(b), len(fb), *_max_median(matched), _max_median(signed)[0],
        ))
    return grades


def _max_median(err: np.ndarray) -> tuple[float, float]:
    """Over the matched neurons; missing ones show in ``found_neurons``."""
    return (float(err.max()), float(np.median(err))) if len(err) else (np.inf, np.inf)


def _match_rows(target: np.ndarray, rows: np.ndarray):
    """Best row matching by cosine similarity; positive scales, and the up-to-sign error."""
    tn = target / (np.linalg.norm(target, axis=1, keepdims=True) + 1e-300)
    rn = rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-300)
    cos = tn @ rn.T
    ti, ri = linear_sum_assignment(-np.abs(cos))
    perm = np.full(len(target), -1)
    perm[ti] = ri
    scale = np.zeros(len(target))
    err = np.full(len(target), np.inf)
    err_signed = np.full(len(target), np.inf)
    for t, r in zip(ti, ri, strict=True):
        fit = target[t] @ rows[r] / (rows[r] @ rows[r])
        scale[t] = max(fit, 0.0)
        err[t] = _rel_err(target[t:t + 1], rows[r:r + 1], scale[t:t + 1])[0]
        err_signed[t] = _rel_err(target[t:t + 1], rows[r:r + 1], np.array([fit]))[0]
    return perm, scale, err, err_signed


def _rel_err(target: np.ndarray, rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.linalg.norm(target - scale[:, None] * rows, axis=1) / (
        np.linalg.norm(target, axis=1) + 1e-300
    )


def first_layer_pairs(true_net: Network, found: Network) -> tuple[np.ndarray, np.ndarray]:
    """Matched first-layer rows ``(true, recovered * scale)``, each ``[m, d + 1]`` (bias last).

    For showing true and recovered weights side by side; the best positive scale maps each
    recovered row onto its true partner.
    """
    (w, b), (fw, fb) = dense_layers(true_net)[0], dense_layers(found)[0]
    target, rows = np.hstack([w, b[:, None]]), np.hstack([fw, fb[:, None]])
    perm, scale, _, _ = _match_rows(target, rows)
    keep = np.flatnonzero(perm >= 0)
    return target[keep], rows[perm[keep]] * scale[keep, None]
