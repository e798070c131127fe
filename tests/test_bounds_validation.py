"""Engine input validation and float-safe certificates, checked against float64 forward passes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from app import load_network
from app.analyses.proof_features import certify, largest_certified_eps, proof_features
from app.bounds import METHODS, analyze, input_box, property_lower_bounds
from app.errors import InvalidInputError
from app.network import Network


def _mlp(seed: int, scale_last: float = 1.0) -> Network:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 4)).eval()
    with torch.no_grad():
        model[-1].weight.mul_(scale_last)
        model[-1].bias.mul_(scale_last)
    return load_network(model, input_shape=(6,))


@pytest.mark.parametrize("eps", [-1e-3, -0.5, math.nan, math.inf])
def test_bad_eps_is_refused_everywhere(eps: float) -> None:
    net = _mlp(0)
    x = torch.rand(6)
    with pytest.raises(InvalidInputError):
        certify(net, x, 0, eps)
    with pytest.raises(InvalidInputError):
        input_box(x[None], eps)
    with pytest.raises(InvalidInputError):
        proof_features(net, x, 0, eps)
    with pytest.raises(InvalidInputError):
        largest_certified_eps(net, x, 0, eps_max=eps)


def test_bad_boxes_inputs_and_labels_are_refused() -> None:
    net = _mlp(0)
    x = torch.rand(1, 6)
    lo, hi = x - 0.1, x + 0.1
    for method in METHODS:
        with pytest.raises(InvalidInputError):
            analyze(net, hi, lo, method)  # lo > hi
        with pytest.raises(InvalidInputError):
            analyze(net, lo, hi.clone().fill_(math.nan), method)
        with pytest.raises(InvalidInputError):
            analyze(net, lo[:, :5], hi[:, :5], method)
        with pytest.raises(InvalidInputError):
            property_lower_bounds(net, hi, lo, torch.tensor([0]), method)
    with pytest.raises(InvalidInputError):
        certify(net, torch.full((6,), math.nan), 0, 0.1)
    with pytest.raises(InvalidInputError):
        certify(net, x[0], 4, 0.1)
    with pytest.raises(InvalidInputError):
        input_box(x, 0.1, domain=(1.0, 0.0))


def test_the_eps_zero_bounds_contain_the_float64_output() -> None:
    """With eps = 0 every bound and margin must hold for the float64 evaluation of the weights."""
    for seed in range(3):
        net = _mlp(seed)
        exact = net.with_dtype(torch.float64)
        x = torch.rand(4, 6, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = exact(x.double())
        labels = y.argmax(1)
        lo, hi = input_box(x, 0.0)
        for method in METHODS:
            with torch.no_grad():
                low, up = analyze(net, lo, hi, method).bounds(len(net.layers) - 1)
                margins = property_lower_bounds(net, lo, hi, labels, method)
            # float32 bounds are only as good as float32 sums: a tolerance of a few ulps
            ulps = 1e-6 * y.abs().amax()
            assert (low.double() <= y + ulps).all() and (up.double() >= y - ulps).all()
            # margins are float-safe: no tolerance
            true = y.gather(1, labels[:, None]) - y
            others = torch.stack([torch.cat([r[:lab], r[lab + 1:]]) for r, lab in
                                  zip(true, labels.tolist(), strict=True)])
            assert (margins.double() <= others).all(), method


def test_input_box_is_rounded_outward() -> None:
    x = torch.rand(50, 6, generator=torch.Generator().manual_seed(3))
    eps = 0.1  # not representable in float32
    lo, hi = input_box(x, eps, domain=None)
    assert (lo.double() <= x.double() - eps).all() and (hi.double() >= x.double() + eps).all()


@pytest.mark.parametrize("method", list(METHODS))
def test_scaled_logits_are_never_certified_where_the_unscaled_are_not(method: str) -> None:
    """Scaling the last layer by 1e-7 scales every margin: no verdict may flip to certified."""
    checked = 0
    for seed in range(4):
        net, tiny = _mlp(seed), _mlp(seed, 1e-7)
        for k in range(5):
            x = torch.rand(6, generator=torch.Generator().manual_seed(10 * seed + k))
            with torch.no_grad():
                label = int(net.with_dtype(torch.float64)(x[None].double()).argmax())
            for eps in (0.0, 0.01, 0.05):
                big, small = certify(net, x, label, eps, method), certify(tiny, x, label, eps, method)
                assert not (small.certified and not big.certified)
                checked += big.certified
    assert checked > 0


def _tied_net(order_seed: int) -> Network:
    """Two outputs equal in exact arithmetic (the same terms summed in two orders)."""
    gen = torch.Generator().manual_seed(order_seed)
    first = nn.Linear(8, 64)
    last = nn.Linear(64, 2)
    with torch.no_grad():
        first.weight.copy_(torch.randn(64, 8, generator=gen) * 3)
        first.bias.copy_(torch.randn(64, generator=gen))
        w = torch.randn(64, generator=gen) * 1e3
        perm = torch.randperm(64, generator=gen)
        hidden = nn.Linear(8, 128)
        hidden.weight.copy_(torch.cat([first.weight, first.weight[perm]]))
        hidden.bias.copy_(torch.cat([first.bias, first.bias[perm]]))
        last = nn.Linear(128, 2)
        last.weight.copy_(torch.stack([torch.cat([w, torch.zeros(64)]),
                                       torch.cat([torch.zeros(64), w[perm]])]))
        last.bias.zero_()
    return load_network(nn.Sequential(hidden, nn.ReLU(), last).eval(), input_shape=(8,))


def test_an_exact_tie_is_never_certified() -> None:
    """Float32 rounding makes one of two exactly tied logits win by a hair: no certificate."""
    hair = 0
    for seed in range(10):
        net = _tied_net(seed)
        x = torch.rand(8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            y = net(x[None])[0]
        label = int(y.argmax())
        hair += bool(y[label] > y[1 - label])
        for method in METHODS:
            assert not certify(net, x, label, 0.0, method).certified, (seed, method)
    assert hair > 0  # float32 did break some ties, so the check above bit
