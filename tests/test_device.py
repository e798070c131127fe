"""The engine on any device: shapes on PyTorch's ``meta`` device (a data-free stand-in for a
GPU), no tensor created off the input's device, and float32 results next to float64 ones.

A machine without a GPU still catches device mistakes two ways: a network and input moved to
``meta`` must run the tensor-only parts (forward, every bound method, attacks) to the right
shapes, and a CPU run under ``torch.device("meta")`` as the default device must not change,
since every tensor the engine makes then has to take its device from the data explicitly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from app import load_network
from app.analyses.linear_regions import exact_integrated_gradients, exact_lines
from app.analyses.predict import predict
from app.analyses.proof_features import certify, proof_features
from app.analyses.saliency.verix import verified_explanation
from app.attacks import fgsm, pgd
from app.bounds import METHODS, analyze, property_lower_bounds
from app.network import Network

RTOL = 1e-4  # float32 against float64, relative to the largest magnitude compared


class _Residual(nn.Module):
    """conv -> relu -> maxpool, a residual block, avgpool, flatten, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.inner = nn.Conv2d(3, 3, 3, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.head = nn.Linear(3 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv(x)))
        h = torch.relu(self.inner(h)) + h
        return self.head(self.avg(torch.relu(h)).flatten(1))


@pytest.fixture(scope="module")
def net() -> Network:
    torch.manual_seed(0)
    return load_network(_Residual().eval(), input_shape=(1, 8, 8))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 1, 8, 8)


def _close(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=RTOL * max(1.0, float(np.abs(b).max())))


# -- meta: shapes only ----------------------------------------------------------------------


def test_forward_on_meta(net: Network, x: torch.Tensor) -> None:
    m, xm = net.with_dtype(torch.float32).to("meta"), x.to("meta")
    assert m.device.type == "meta"
    outs = m.trace(xm)
    assert [tuple(o.shape[1:]) for o in outs] == net.shapes
    assert all(o.device.type == "meta" for o in outs)
    for (lo, hi), shape in zip(m.interval_bounds(xm - 0.1, xm + 0.1), net.shapes, strict=True):
        assert tuple(lo.shape) == tuple(hi.shape) == (2, *shape) and lo.device.type == "meta"


@pytest.mark.parametrize("method", list(METHODS))
def test_bounds_on_meta(net: Network, x: torch.Tensor, method: str) -> None:
    m, xm = net.with_dtype(torch.float32).to("meta"), x.to("meta")
    analysis = analyze(m, xm - 0.05, xm + 0.05, method)
    last = len(net.layers) - 1
    lo, hi = analysis.bounds(last)
    assert tuple(lo.shape) == tuple(hi.shape) == (2, net.num_outputs)
    assert lo.device.type == hi.device.type == "meta"
    spec = torch.ones(2, 3, net.num_outputs, device="meta")
    low = analysis.lower(last, spec)
    assert tuple(low.shape) == (2, 3) and low.device.type == "meta"


def test_attacks_on_meta(net: Network, x: torch.Tensor) -> None:
    m, xm = net.with_dtype(torch.float32).to("meta"), x.to("meta")
    y = torch.zeros(2, dtype=torch.long, device="meta")
    for adv in (fgsm(m, xm, y, 0.1), pgd(m, xm, y, 0.1, steps=2, restarts=2)):
        assert adv.shape == x.shape and adv.device.type == "meta"


# -- no tensor made off the data's device -----------------------------------------------------


def test_no_tensor_off_the_data_device(net: Network, x: torch.Tensor) -> None:
    """Under a ``meta`` default device any tensor built without an explicit device lands on
    ``meta`` and breaks the CPU run; the results must equal those of a plain run."""
    y = torch.tensor([0, 1])
    gen = torch.Generator().manual_seed(0)
    plain_pgd = pgd(net, x, y, 0.05, steps=3, generator=gen)
    plain = {m: property_lower_bounds(net, x - 0.01, x + 0.01, y, m) for m in METHODS}
    plain_pred = predict(net, x[0])
    plain_cert = certify(net, x[0], plain_pred.predicted, 0.002)
    plain_pf = proof_features(net, x[0], plain_pred.predicted, 0.002)
    with torch.device("meta"):
        gen = torch.Generator(device="cpu").manual_seed(0)
        _close(pgd(net, x, y, 0.05, steps=3, generator=gen), plain_pgd)
        for m in METHODS:
            _close(property_lower_bounds(net, x - 0.01, x + 0.01, y, m), plain[m])
        pred = predict(net, x[0])
        cert = certify(net, x[0], plain_pred.predicted, 0.002)
        pf = proof_features(net, x[0], plain_pred.predicted, 0.002)
    _close(pred.logits, plain_pred.logits)
    assert cert.certified == plain_cert.certified
    _close(cert.margins[np.isfinite(cert.margins)],
           plain_cert.margins[np.isfinite(plain_cert.margins)])
    _close(pf.lower, plain_pf.lower)
    assert pf.kept.tolist() == plain_pf.kept.tolist()


# -- float32 against float64 -----------------------------------------------------------------


def test_float32_matches_float64(net: Network, x: torch.Tensor) -> None:
    n32, n64 = net.with_dtype(torch.float32), net.with_dtype(torch.float64)
    _close(n32(x), n64(x.double()))
    _close(predict(n32, x[0]).logits, predict(n64, x[0].double()).logits)
    for m in METHODS:
        lo32, hi32 = analyze(n32, x - 0.02, x + 0.02, m).bounds(len(net.layers) - 1)
        lo64, hi64 = analyze(n64, x.double() - 0.02, x.double() + 0.02, m).bounds(
            len(net.layers) - 1)
        _close(lo32.detach(), lo64.detach())
        _close(hi32.detach(), hi64.detach())
    ends = x.flip(0)
    for a, b in zip(exact_lines(net, x, ends, dtype=torch.float32),
                    exact_lines(net, x, ends, dtype=torch.float64), strict=True):
        # the same curve: logits of each run at the other run's breakpoints agree
        _close(a.logits_at(b.ts), b.logits)
    _close(exact_integrated_gradients(net, x[0], dtype=torch.float32).attributions,
           exact_integrated_gradients(net, x[0], dtype=torch.float64).attributions)


def test_verified_explanation_makes_no_tensor_off_the_data_device(
        net: Network, x: torch.Tensor) -> None:
    """The VeriX explanation, as above: the same features under a ``meta`` default device as
    in a plain run. (The SMUG mask cannot run this way: Captum's IG builds its step sizes
    without a device, which a real GPU tolerates and ``meta`` does not.)"""
    plain = verified_explanation(net, x[0], eps=0.02, timeout_s=10.0)
    with torch.device("meta"):
        verix = verified_explanation(net, x[0], eps=0.02, timeout_s=10.0)
    assert verix.explanation.tolist() == plain.explanation.tolist()
    assert plain.size < plain.explanation.size  # something was freed: the check ran
