"""Forward linear bounds and CROWN over them (``splitting=True``, the input
splitter's bounds) against dense sampling and an exact MILP, at several seeds, weight scales
and box sizes; a batch of boxes bounded together agrees with each box bounded alone."""

from __future__ import annotations

import pytest
import torch

from app import load_network
from app.bounds import analyze, box_lower, input_box
from app.bounds.crown import CrownAnalysis
from app.bounds.forward import ForwardBounds
from app.layers import ReLU
from tests.seeded_mlp import mlp
from tests.test_bounds import _milp_range, _samples_in_box, _tiny_mlp


def _boxes(n_in: int, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of radii from 1e-3 to 1 around random centres (small ones as deep in input
    splitting, large ones as at its root)."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(count, n_in, generator=gen, dtype=torch.float64) * 2 - 1
    radius = 10 ** (-3 * torch.rand(count, 1, generator=gen, dtype=torch.float64))
    return centre - radius, centre + radius


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 30.0), (2, 0.02)])
def test_forward_bounds_contain_every_sampled_node_value(seed: int, scale: float) -> None:
    model = mlp((5, 24, 24, 24, 24, 3), seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    net = load_network(model, input_shape=(5,)).with_dtype(torch.float64)
    lo, hi = _boxes(5, seed, 16)
    fwd = ForwardBounds(lo, hi)
    points = torch.stack([_samples_in_box(lo[k:k + 1], hi[k:k + 1], 2000) for k in range(16)])
    values = points.reshape(-1, 5)
    shape, low, up = net.input_shape, lo, hi
    for layer in net.layers:
        if isinstance(layer, ReLU):
            fwd.relu(low, up)
        else:
            low, up = fwd.affine(layer, shape)
        values = layer(values)
        v = values.reshape(16, 2000, -1)
        slack = 1e-9 * (1 + v.abs().amax())
        if not isinstance(layer, ReLU):
            assert (v >= low.unsqueeze(1) - slack).all() and (v <= up.unsqueeze(1) + slack).all()
        shape = tuple(values.shape[1:])


@pytest.mark.parametrize("seed,residual", [(0, False), (1, False)])
def test_crown_over_forward_bounds_encloses_the_exact_range(seed: int, residual: bool) -> None:
    model, layers = _tiny_mlp(seed, residual)
    net = load_network(model, input_shape=(3,)).with_dtype(torch.float64)
    for x, eps in (([0.2, 0.5, 0.7], 0.15), ([0.6, 0.1, 0.4], 0.02)):
        lo, hi = input_box(torch.tensor([x], dtype=torch.float64), eps)
        exact_lo, exact_hi = _milp_range(layers, lo[0].numpy(), hi[0].numpy(), residual)
        out = len(net.layers) - 1
        with torch.no_grad():
            low, up = analyze(net, lo, hi, "crown", splitting=True).bounds(out)
        assert (low[0].numpy() <= exact_lo + 1e-9).all()
        assert (up[0].numpy() >= exact_hi - 1e-9).all()


@pytest.mark.parametrize("splitting", [False, True])
def test_a_batch_of_boxes_is_bounded_as_each_box_alone(splitting: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Boxes bounded together (for input splitting: each box's own unstable units, few on
    small boxes, instead of the union over the batch) get the bounds each gets alone."""
    pairs = []
    by_pairs = CrownAnalysis._back_substitute_pairs
    monkeypatch.setattr(CrownAnalysis, "_back_substitute_pairs",
                        lambda self, node, p: pairs.append(p.shape[0]) or by_pairs(self, node, p))
    net = load_network(mlp((5, 30, 30, 30, 4), 3), input_shape=(5,)).with_dtype(torch.float64)
    lo, hi = _boxes(5, 3, 40)
    spec = torch.eye(4, dtype=torch.float64)[None].expand(40, -1, -1)
    node = len(net.layers) - 1
    with torch.no_grad():
        together = analyze(net, lo, hi, "crown", splitting=splitting).lower(node, spec)
        alone = torch.cat([analyze(net, lo[k:k + 1], hi[k:k + 1], "crown",
                                   splitting=splitting).lower(node, spec[k:k + 1])
                           for k in range(40)])
    assert bool(pairs) == splitting, "the per-(box, unit) path is input splitting's"
    assert torch.allclose(together, alone, rtol=1e-9, atol=1e-9 * float(alone.abs().max()))
    # and both are sound: no sampled output goes below them
    with torch.no_grad():
        for k in range(0, 40, 5):
            y = net(_samples_in_box(lo[k:k + 1], hi[k:k + 1], 3000))
            assert (y.amin(0) >= together[k] - 1e-9 * (1 + y.abs().max())).all()


@pytest.mark.parametrize("splitting", [False, True])
def test_crowns_linear_lower_bound_holds_at_every_sample(splitting: bool) -> None:
    """``linear_lower``'s ``A x + c`` (what input splitting reads its split dimension from)
    lies below ``spec . y`` at each sampled point, not only at the box's minimum; its minimum
    over the box is CROWN's bound."""
    net = load_network(mlp((5, 20, 20, 3), 4), input_shape=(5,)).with_dtype(torch.float64)
    lo, hi = _boxes(5, 4, 12)
    spec = torch.tensor([[1.0, -1.0, 0.0], [0.0, 2.0, -0.5]], dtype=torch.float64)
    spec = spec[None].expand(12, -1, -1)
    node = len(net.layers) - 1
    with torch.no_grad():
        crown = analyze(net, lo, hi, "crown", splitting=splitting)
        a, c = crown.linear_lower(node, spec)
        least, bound = c + box_lower(lo, hi, a), crown.lower(node, spec)
        # the bound is this minimum (without splitting, at least as high: it is also
        # intersected with the interval bound from the node's own bounds)
        assert torch.allclose(least, bound) if splitting else (least <= bound + 1e-12).all()
        for k in range(12):
            x = _samples_in_box(lo[k:k + 1], hi[k:k + 1], 2000)
            value = net(x) @ spec[k].T
            linear = x @ a[k].T + c[k]
            assert (value >= linear - 1e-9 * (1 + value.abs().max())).all()
