"""Distilled rule lists and proven coverage on the digits sample models, against oracles.

* A distilled rule list's fidelity is recomputed here from float64 pre-activations and the
  network's own decisions on the held-out gallery (never seen in training).
* Each input counted as covered by its input property is re-checked by hit-and-run sampling
  of its pattern polytope within its ball (membership by forward pass only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app import load_network
from app.analyses.patterns import InputDomain, distill, proven_coverage, verify_rule
from app.errors import InvalidInputError
from sample_models.train import load_split
from tests.conftest import SAMPLE_MODELS
from tests.test_patterns import _hit_and_run

torch.set_num_threads(1)


def _rule_list_predictions(net64, rule_list, xs: torch.Tensor) -> np.ndarray:
    """First rule whose literals all hold (``pre > t`` on, ``pre <= t`` off) wins."""
    pre = net64.pre_activations(xs.to(torch.float64))[rule_list.node].reshape(len(xs), -1)
    out = np.full(len(xs), rule_list.default)
    for i in range(len(xs)):
        for rule in rule_list.rules:
            ts = rule.thresholds or (0.0,) * len(rule.literals)
            if all(bool(pre[i, n] > t) == on for (n, on), t in zip(rule.literals, ts,
                                                                      strict=True)):
                out[i] = rule.target
                break
    return out


@pytest.mark.parametrize("name", ["digits_fc_standard", "digits_fc_pgd"])
def test_distilled_threshold_rules_are_faithful_on_the_heldout_gallery(name) -> None:
    net = load_network(str(SAMPLE_MODELS / f"{name}.onnx"))
    net64 = net.with_dtype(torch.float64)
    xtr, _, xte, _ = load_split()
    xs = torch.cat([xtr, xte])
    held = np.arange(len(xtr), len(xs))
    rule_list = distill(net, xs, layer=-1, literals="threshold", max_depth=None,
                        max_rules=100, augment=5, heldout=held)
    assert len(rule_list.rules) <= 100 and np.array_equal(rule_list.heldout, held)
    with torch.no_grad():
        decided = net64(xte.to(torch.float64)).argmax(1).numpy()
    agree = float((_rule_list_predictions(net64, rule_list, xte) == decided).mean())
    assert rule_list.fidelity == pytest.approx(agree, abs=1 / len(xte))
    assert agree >= 0.9
    # on/off literals alone lose the magnitudes: reported, and lower here
    pattern = distill(net, xs, layer=-1, literals="pattern", max_depth=None, max_rules=100,
                      augment=5, heldout=held)
    assert pattern.fidelity < rule_list.fidelity
    # a threshold rule is a description, not a verifiable pattern rule
    with pytest.raises(InvalidInputError):
        verify_rule(net, rule_list.rules[0], InputDomain.box(net, 0.0, 1.0))


def test_proven_coverage_of_input_properties_survives_sampling() -> None:
    net = load_network(str(SAMPLE_MODELS / "digits_fc_pgd.onnx"))
    net64 = net.with_dtype(torch.float64)
    gallery = np.load(SAMPLE_MODELS / "gallery" / "digits.npz")["x"]
    xs = torch.from_numpy(gallery[::12].astype(np.float64))  # 30 held-out inputs
    box = InputDomain.box(net, 0.0, 1.0)
    eps = 0.05
    cov = proven_coverage(net, xs, box, layer=-1, eps=eps)
    assert cov.checked == len(xs) and cov.covered == cov.statuses.count("proven")
    assert cov.fraction >= 0.8, cov.to_dict()
    proven = [k for k, s in enumerate(cov.statuses) if s == "proven"]
    for k in proven[:2]:
        x0 = xs[k]
        ref = net64.activation_patterns(x0[None])

        def member(z: torch.Tensor, ref=ref) -> torch.Tensor:
            got = net64.activation_patterns(z)
            ok = torch.ones(z.shape[0], dtype=torch.bool)
            for i in net64.relu_indices:
                ok &= (got[i] == ref[i]).reshape(z.shape[0], -1).all(1)
            return ok

        lo, hi = (x0 - eps).clamp(0, 1), (x0 + eps).clamp(0, 1)
        pts = _hit_and_run(member, x0[None].repeat(50, 1, 1, 1), lo, hi, n=1000, seed=k)
        with torch.no_grad():
            decided = int(net64(x0[None]).argmax(1))
            assert bool((net64(pts).argmax(1) == decided).all())
