"""certify(method="bab"): the complete verifier behind the certificate, against sampling and
PGD inside the ball (input splitting on 5 inputs, the MILP on 20)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app import load_network
from app.analyses.proof_features import certify
from app.bounds import input_box
from app.network import Network
from tests.test_bounds_alpha import _worst_margins


def _mlp(seed: int, n_in: int) -> Network:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3)).eval()
    return load_network(model, input_shape=(n_in,))


@pytest.mark.parametrize("n_in", [5, 20])
def test_bab_certifies_beyond_crown_and_never_against_a_found_point(n_in: int) -> None:
    counts = {"crown": 0, "bab": 0}
    for seed in range(2):
        net = _mlp(seed, n_in)
        x = torch.rand(n_in, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            label = int(net(x[None]).argmax())
        for eps in (0.1, 0.2, 0.3):
            crown = certify(net, x, label, eps, "crown", domain=None)
            bab = certify(net, x, label, eps, "bab", domain=None, time_limit=8)
            assert bab.certified or not crown.certified
            counts["crown"] += crown.certified
            counts["bab"] += bab.certified
            if bab.certified:
                lo, hi = input_box(x[None], eps, domain=None)
                assert (_worst_margins(net, lo, hi, label, seed) > 0).all()
    assert counts["bab"] > counts["crown"], counts


def test_bab_proof_features_say_what_they_show_and_bisection_stays_certified() -> None:
    """``proof_features(method="bab")``: where alpha-CROWN proves the ball its features are
    shown; where only splitting proves it, no features are claimed and the note says so; a
    ball neither proves is not certified. ``largest_certified_eps`` with branch and bound
    under a time limit returns an eps no attack breaks, at least CROWN's."""
    from app.analyses.proof_features import largest_certified_eps, proof_features

    kinds = set()
    for seed in range(3):
        net = _mlp(seed, 5)
        x = torch.rand(5, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            label = int(net(x[None]).argmax())
        for eps in (0.05, 0.2, 0.3):
            alpha = certify(net, x, label, eps, "alpha-crown", domain=None)
            result = proof_features(net, x, label, eps, "bab", domain=None, time_limit=8)
            cert = result.certificate
            assert cert.method == ("alpha-crown" if alpha.certified else "bab")
            if alpha.certified:
                kinds.add("alpha")
                assert cert.certified and result.sufficient and len(result.kept) > 0
                assert "alpha-CROWN proves" in result.note
            elif cert.certified:
                kinds.add("split")
                assert len(result.kept) == 0 and not result.sufficient
                assert "branch and bound" in result.note and "none explain" in result.note
            else:
                kinds.add("none")
                assert "unknown" in result.note
            if cert.certified:
                lo, hi = input_box(x[None], eps, domain=None)
                assert (_worst_margins(net, lo, hi, label, seed) > 0).all()
        crown = largest_certified_eps(net, x, label, "crown", eps_max=0.6, tol=1e-2,
                                      domain=None)
        bab = largest_certified_eps(net, x, label, "bab", eps_max=0.6, tol=1e-2, domain=None,
                                    time_limit=20)
        assert bab >= crown
        if bab > 0:
            lo, hi = input_box(x[None], bab, domain=None)
            assert (_worst_margins(net, lo, hi, label, seed + 10) > 0).all()
    assert {"alpha", "split"} <= kinds, kinds
