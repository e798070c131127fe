"""Proof features (ProFIt: Banerjee, Singh & Singh, ICLR 2024).

A robustness proof from a bound propagator, projected onto each neuron of the penultimate
layer (the input of the final affine layer), gives intervals ``[l_i, u_i]``: the proof
features. Following the paper's code (uiuc-focal-lab/Profit, ``sparsification_util``):

* priority ``H_i = max(|l_i|, |u_i|) * max_j |(C W)_{j,i}|``, with ``C`` the property's
  rows ``e_label - e_j`` and ``W`` the final layer, so ``(C W)_{j,i}`` is how much feature
  ``i`` can move margin ``j``;
* features with zero priority are dropped; the rest are sorted by priority and a binary search
  finds the largest number of lowest-priority features whose removal (zeroing their
  columns of ``W``) keeps the property proven;
* the kept set is then re-verified from scratch on a network that masks the removed
  features, and each kept feature is shown as the gradient of its interval's midpoint
  ``(l_i + u_i) / 2`` with respect to the input.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from app.bounds import (
    analyze,
    check_eps,
    float_safe,
    fold_last_layer,
    input_box,
    margin_spec,
    property_lower_bounds,
)
from app.errors import InvalidInputError, UnsupportedModelError
from app.layers import AffineLayer, ElementwiseAffine
from app.network import INPUT, Network
from app.progress import ProgressFn, report
from app.properties import Case, VnnProperty, verify

Domain = tuple[float, float] | None


@dataclass
class Certificate:
    """Whether ``label`` provably wins on the eps-ball, and by how much at worst."""

    method: str
    eps: float
    label: int
    certified: bool
    margin: float  # lower bound of min_j (y_label - y_j); > 0 means certified
    margins: np.ndarray  # [n_out]: lower bound of y_label - y_j per class (nan at label)


@dataclass
class ProofFeatures:
    """All proof features of one certificate, their priorities and the pruned sufficient set."""

    certificate: Certificate
    feature_node: int
    lower: np.ndarray  # [F] feature interval lower bounds
    upper: np.ndarray  # [F]
    priority: np.ndarray  # [F]
    kept: np.ndarray  # indices of the kept features, highest priority first
    pruned_margin: float  # margin lower bound with only the kept features
    sufficient: bool  # re-verified: the property holds with only the kept features
    gradient_maps: np.ndarray  # [len(kept), *input_shape]
    note: str = ""  # what the features are of, where that is not the certificate's own proof

    @property
    def num_features(self) -> int:
        return int(self.lower.size)

    @property
    def num_nonzero(self) -> int:
        return int((self.priority > 0).sum())


def certify(net: Network, x: Tensor, label: int, eps: float, method: str = "crown",
            domain: Domain = (0.0, 1.0), time_limit: float = 60.0) -> Certificate:
    """Try to prove that ``net`` predicts ``label`` everywhere in the clipped eps-ball at ``x``.

    ``certified`` is float-safe (see :func:`app.bounds.property_lower_bounds`); a negative or
    non-finite ``eps``, a non-finite input or a label outside the outputs raise
    :class:`InvalidInputError`. ``method="bab"`` asks the complete verifier
    (:func:`app.properties.verify`, at most ``time_limit`` seconds): ``certified`` is its
    ``proven``, while ``margin(s)`` stay CROWN's lower bounds (a proof by splitting or MILP
    has no single margin).
    """
    x = _as_batch(net, x)
    _check_label(net, label)
    with torch.no_grad():
        lo, hi = input_box(x, eps, domain)
        bound_method = "crown" if method == "bab" else method
        bounds = property_lower_bounds(net, lo, hi, torch.tensor([label], device="cpu"),
                                       bound_method)[0]
    cert = _certificate(net, method, eps, label, bounds)
    if method == "bab" and not cert.certified:
        cert.certified = _proven_by_bab(net, lo, hi, label, time_limit)
    return cert


def _proven_by_bab(net: Network, lo: Tensor, hi: Tensor, label: int, time_limit: float) -> bool:
    """The ball as a VNN-LIB-style property (some ``y_j >= y_label``) for the verifier."""
    eye = np.eye(net.num_outputs)
    box = lo[0].reshape(-1).double().cpu().numpy(), hi[0].reshape(-1).double().cpu().numpy()
    cases = [Case(*box, (eye[label] - eye[j])[None], np.zeros(1))
             for j in range(net.num_outputs) if j != label]
    prop = VnnProperty(box[0].size, net.num_outputs, cases)
    return verify(net, prop, "bab", time_limit).status == "proven"


def proof_features(net: Network, x: Tensor, label: int, eps: float, method: str = "crown",
                   domain: Domain = (0.0, 1.0),
                   progress: ProgressFn | None = None, time_limit: float = 60.0) -> ProofFeatures:
    """Extract, prioritise and prune the proof features of the eps-ball at ``x``.

    ``method="bab"``: ProFIt's features belong to one bound proof of the whole ball, and a
    branch-and-bound proof is many (one per leaf). So the features are alpha-CROWN's, and
    where alpha-CROWN alone cannot prove the ball, branch and bound (at most ``time_limit``
    seconds) decides the certificate and ``note`` says that no features explain that proof.
    """
    if method == "bab":
        return _bab_proof_features(net, x, label, eps, domain, progress, time_limit)
    x = _as_batch(net, x)
    last = net.layers[-1]
    if not isinstance(last, AffineLayer):
        raise UnsupportedModelError("proof features need a network ending in an affine layer")
    _check_label(net, label)
    report(progress, 0.0, f"bounding the network with {method}")
    spec = margin_spec(net.num_outputs, torch.tensor([label], device="cpu"), net.dtype,
                       net.device)
    with torch.no_grad():
        node, folded, bias = fold_last_layer(net, spec)
        lo, hi = input_box(x, eps, domain)
        analysis = analyze(net, lo, hi, method)
        offset = spec.new_zeros(spec.shape[:2])
        full = float_safe(net, lo, hi, spec, offset, method,
                          analysis.lower(node, folded, bias))[0]
        f_lo, f_hi = (b[0].reshape(-1) for b in analysis.bounds(node))
    cert = _certificate(net, method, eps, label, full)
    weights = folded[0].reshape(folded.shape[1], -1)  # [m, F]: (C W)
    priority = torch.maximum(f_lo.abs(), f_hi.abs()) * weights.abs().amax(0)
    empty = np.zeros((0, *net.input_shape), dtype=np.float32)
    if not cert.certified:
        report(progress, 1.0, "not certified: no proof to explain")
        return ProofFeatures(cert, node, *_host(f_lo, f_hi, priority),
                             np.zeros(0, dtype=np.int64), cert.margin, False, empty)

    report(progress, 0.2, "pruning proof features")
    order = torch.argsort(priority, stable=True)  # ascending
    n_zero = int((priority == 0).sum())
    nonzero = order[n_zero:]

    def holds(n_pruned: int) -> bool:
        mask = torch.ones_like(priority)
        mask[order[: n_zero + n_pruned]] = 0
        with torch.no_grad():
            low = analysis.lower(node, folded * mask.reshape(1, 1, *folded.shape[2:]), bias)
        return bool((low > 0).all())

    pruned = _largest_prunable(len(nonzero), holds)
    kept = nonzero[pruned:].flip(0)
    report(progress, 0.6, "re-verifying the kept features")
    mask = torch.zeros_like(priority)
    mask[kept] = 1
    recheck = certify(_masked(net, node, mask), x, label, eps, method, domain)
    report(progress, 0.7, "gradient maps of the kept features")
    maps = _midpoint_gradients(net, x, eps, method, domain, node, kept)
    report(progress, 1.0, "done")
    return ProofFeatures(cert, node, *_host(f_lo, f_hi, priority, kept),
                         recheck.margin, recheck.certified, maps)


def largest_certified_eps(net: Network, x: Tensor, label: int, method: str = "crown",
                          eps_max: float = 0.5, tol: float = 1e-3, domain: Domain = (0.0, 1.0),
                          progress: ProgressFn | None = None,
                          time_limit: float = math.inf) -> float:
    """Largest eps certified by ``method``, by bisection on ``[0, eps_max]`` to ``tol``.

    Past ``time_limit`` seconds the bisection stops: the eps returned is still certified,
    only possibly smaller than ``method`` could reach (each branch-and-bound call gets the
    time left, and its "unknown" counts as not certified).
    """
    check_eps(eps_max)
    if not (math.isfinite(tol) and tol > 0):
        raise InvalidInputError(f"tol must be a finite number > 0, got {tol}")
    if not time_limit > 0:
        raise InvalidInputError(f"time_limit must be > 0, got {time_limit}")
    deadline = time.monotonic() + time_limit

    def proven(eps: float) -> bool:
        left = deadline - time.monotonic()
        return left > 0 and certify(net, x, label, eps, method, domain,
                                    time_limit=min(left, 60.0)).certified

    if not proven(0.0):
        return 0.0
    good, bad = 0.0, eps_max
    if proven(eps_max):
        return eps_max
    steps = max(1, math.ceil(math.log2(eps_max / tol)))
    for step in range(steps):
        mid = (good + bad) / 2
        if proven(mid):
            good = mid
        else:
            bad = mid
        report(progress, (step + 1) / steps, f"{method}: certified up to {good:.4f}")
        if time.monotonic() > deadline:
            break
    return good


def _bab_proof_features(net: Network, x: Tensor, label: int, eps: float, domain: Domain,
                        progress: ProgressFn | None, time_limit: float) -> ProofFeatures:
    """alpha-CROWN's proof features, and the certificate of branch and bound."""
    result = proof_features(net, x, label, eps, "alpha-crown", domain, progress)
    if result.certificate.certified:
        result.note = ("alpha-CROWN proves this ball without splitting: the features are "
                       "those of its proof")
        return result
    report(progress, 0.9, "alpha-CROWN cannot prove the ball alone: branch and bound")
    lo, hi = input_box(_as_batch(net, x), eps, domain)
    # the margins stay alpha-CROWN's lower bounds (already computed, and sound)
    cert = replace(result.certificate, method="bab",
                   certified=_proven_by_bab(net, lo, hi, label, time_limit))
    result.certificate = cert
    if cert.certified:
        result.note = (
            "proven by branch and bound, which splits ReLUs into many sub-proofs; proof "
            "features belong to a single bound proof of the whole ball, so none explain this "
            "one. The bounds shown are alpha-CROWN's, which alone do not prove it")
    else:
        result.note = (f"neither alpha-CROWN nor branch and bound (within {time_limit:g} s) "
                       "proves this ball: unknown, no proof to explain")
    return result


# -- helpers ---------------------------------------------------------------------------------


def _as_batch(net: Network, x: Tensor) -> Tensor:
    x = torch.as_tensor(x, dtype=net.dtype, device=net.device)
    if tuple(x.shape) == net.input_shape:
        x = x.unsqueeze(0)
    if tuple(x.shape) != (1, *net.input_shape):
        raise InvalidInputError(f"expected one input of shape {net.input_shape}, got {tuple(x.shape)}")
    return x


def _host(*tensors: Tensor) -> list[np.ndarray]:
    """Host (numpy) copies of result tensors, from whatever device they were computed on."""
    return [t.detach().cpu().numpy() for t in tensors]


def _check_label(net: Network, label: int) -> None:
    if not 0 <= int(label) < net.num_outputs:
        raise InvalidInputError(f"label {label} is not one of the {net.num_outputs} outputs")


def _certificate(net: Network, method: str, eps: float, label: int, bounds: Tensor) -> Certificate:
    margins = np.full(net.num_outputs, np.nan)
    margins[[j for j in range(net.num_outputs) if j != label]] = bounds.detach().cpu().numpy()
    margin = float(bounds.min())
    return Certificate(method, float(eps), int(label), margin > 0, margin, margins)


def _largest_prunable(n: int, holds) -> int:
    """The paper's binary search: most low-priority features removable, keeping at least one."""
    best, left, right = 0, 0, n - 1
    while left <= right:
        mid = (left + right) // 2
        if mid <= 0:
            break
        if holds(mid):
            best, left = max(best, mid), mid + 1
        else:
            right = mid - 1
    return best


def _masked(net: Network, node: int, mask: Tensor) -> Network:
    """A copy of ``net`` whose final layer sees only the features where ``mask`` is 1."""
    shape = net.input_shape if node == INPUT else net.shapes[node]
    gate = ElementwiseAffine(mask.reshape(shape), mask.new_zeros(shape))
    layers = [*net.layers[:-1], gate, net.layers[-1]]
    inputs = [*net.inputs[:-1], (node,), (len(net.layers) - 1,)]
    return Network(layers, net.input_shape, inputs, name=f"{net.name} (pruned)")


def _midpoint_gradients(net: Network, x: Tensor, eps: float, method: str, domain: Domain,
                        node: int, kept: Tensor) -> np.ndarray:
    """Gradient of each kept feature's interval midpoint with respect to the input."""
    xg = x.detach().clone().requires_grad_(True)
    lo, hi = input_box(xg, eps, domain)
    f_lo, f_hi = analyze(net, lo, hi, method).bounds(node)
    mid = ((f_lo + f_hi) / 2).reshape(-1)
    if kept.numel() == 0:
        return np.zeros((0, *net.input_shape), dtype=np.float32)
    picks = mid.new_zeros(kept.numel(), mid.numel())
    picks[torch.arange(kept.numel(), device=mid.device), kept] = 1
    (grads,) = torch.autograd.grad(mid, xg, grad_outputs=picks, is_grads_batched=True)
    return grads[:, 0].detach().cpu().numpy()
