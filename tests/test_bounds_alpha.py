"""alpha-CROWN against independent oracles: sampled and PGD points inside each box, CROWN's
own bounds (never looser), and VNN-COMP 2021 instances whose outcome other tools found."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app import load_network
from app.analyses.proof_features import certify, largest_certified_eps
from app.bounds import input_box, property_lower_bounds
from app.network import Network
from tests.conftest import shared_path
from tests.test_bounds import _known_outcomes, _synthetic, _vnnlib


def _mlp(seed: int, width: int = 24) -> Network:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)).eval()
    return load_network(model, input_shape=(5,))


def _worst_margins(net: Network, lo: torch.Tensor, hi: torch.Tensor, label: int,
                   seed: int) -> torch.Tensor:
    """Smallest ``y_label - y_j`` per ``j != label`` found by sampling and by projected
    gradient descent from many starts inside the box (an upper bound of the true minimum)."""
    gen = torch.Generator().manual_seed(seed)
    others = [j for j in range(net.num_outputs) if j != label]
    u = torch.rand(4000, *lo.shape[1:], generator=gen, dtype=lo.dtype)
    u[2000:] = u[2000:].round()
    pts = lo + (hi - lo) * u
    with torch.no_grad():
        y = net(pts)
    worst = (y[:, label:label + 1] - y[:, others]).amin(0)
    step = (hi - lo) / 20
    for k, j in enumerate(others):
        z = (lo + (hi - lo) * torch.rand(32, *lo.shape[1:], generator=gen, dtype=lo.dtype))
        for _ in range(40):
            z.requires_grad_(True)
            out = net(z)
            (grad,) = torch.autograd.grad((out[:, label] - out[:, j]).sum(), z)
            z = torch.minimum(torch.maximum(z.detach() - step * grad.sign(), lo), hi)
        with torch.no_grad():
            out = net(z)
        worst[k] = torch.minimum(worst[k], (out[:, label] - out[:, j]).min())
    return worst


def _cases() -> list[tuple[str, Network, torch.Tensor, torch.Tensor]]:
    cases = []
    for seed in (0, 1, 2):
        net = _mlp(seed)
        x = torch.rand(1, 5, generator=torch.Generator().manual_seed(seed))
        cases.append((f"mlp{seed}", net, *input_box(x, 0.6, domain=None)))
    for name in ("residual_maxpool", "conv_maxpool_avgpool"):
        net = _synthetic(name)
        x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(5))
        cases.append((name, net, *input_box(x, 0.15)))
    return cases


@pytest.mark.parametrize("index", range(5))
def test_alpha_crown_is_sound_and_never_looser_than_crown(index: int) -> None:
    name, net, lo, hi = _cases()[index]
    net64 = net.with_dtype(torch.float64)
    with torch.no_grad():
        label = int(net64(((lo + hi) / 2).double()).argmax())
    labels = torch.tensor([label])
    with torch.no_grad():
        crown = property_lower_bounds(net, lo, hi, labels, "crown")[0].double()
        alpha = property_lower_bounds(net, lo, hi, labels, "alpha-crown")[0].double()
    worst = _worst_margins(net64, lo.double(), hi.double(), label, seed=index)
    assert (alpha <= worst).all(), f"{name}: alpha-CROWN above a point found in the box"
    assert (alpha >= crown - 1e-6 * crown.abs().max()).all(), f"{name}: looser than CROWN"


def test_alpha_crown_is_strictly_tighter_where_crown_fails() -> None:
    gains = []
    for _, net, lo, hi in _cases()[:3]:
        with torch.no_grad():
            label = int(net((lo + hi) / 2).argmax())
            crown = property_lower_bounds(net, lo, hi, torch.tensor([label]), "crown")
            alpha = property_lower_bounds(net, lo, hi, torch.tensor([label]), "alpha-crown")
        gains.append(float((alpha.double() - crown.double()).max()))
    assert max(gains) > 1e-3


def test_alpha_crown_on_vnncomp_mnistfc() -> None:
    """Never looser than CROWN on a known-safe and a known-violated instance, never proves
    the violated one, and its bounds lie below the sampled/PGD margins there (256x2 net)."""
    folder = shared_path("vnncomp2021")
    outcomes = _known_outcomes(folder / "results_csv")
    net = load_network(str(folder / "mnistfc" / "mnist-net_256x2.onnx"))
    chosen = {"prop_13_0.03.vnnlib": "holds", "prop_7_0.03.vnnlib": "violated"}
    for prop, verdict in chosen.items():
        assert outcomes[("mnist-net_256x2.onnx", prop)] == verdict
        lo, hi, label = _vnnlib(folder / "mnistfc" / prop)
        lo_t = torch.tensor(lo, dtype=torch.float32).reshape(1, *net.input_shape)
        hi_t = torch.tensor(hi, dtype=torch.float32).reshape(1, *net.input_shape)
        with torch.no_grad():
            alpha = property_lower_bounds(net, lo_t, hi_t, torch.tensor([label]), "alpha-crown")
            crown = property_lower_bounds(net, lo_t, hi_t, torch.tensor([label]), "crown")
        assert (alpha.double() >= crown.double()).all()
        if verdict == "violated":
            assert not (alpha > 0).all(), f"alpha-CROWN proved violated {prop}"
            worst = _worst_margins(net.with_dtype(torch.float64), lo_t.double(), hi_t.double(),
                                   label, seed=0)
            assert (alpha[0].double() <= worst).all() and (worst < 0).any()


def test_certify_with_alpha_crown_reaches_larger_radii_than_crown() -> None:
    """Largest certified radius by bisection: alpha-CROWN's is never smaller, sometimes
    larger, and PGD breaks none of its certificates."""
    radii = {"crown": [], "alpha-crown": []}
    for seed in range(2):
        net = _mlp(seed)
        x = torch.rand(5, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            label = int(net(x[None]).argmax())
        for method, found in radii.items():
            found.append(largest_certified_eps(net, x, label, method, eps_max=0.8, tol=2e-2,
                                               domain=None))
        eps = radii["alpha-crown"][-1]
        assert certify(net, x, label, eps, "alpha-crown", domain=None).certified
        lo, hi = input_box(x[None], eps, domain=None)
        assert (_worst_margins(net, lo, hi, label, seed) > 0).all()
    assert all(a >= c for a, c in zip(radii["alpha-crown"], radii["crown"], strict=True))
    assert sum(radii["alpha-crown"]) > sum(radii["crown"])
