"""CROWN's windowed back-substitution through convolutions (auto_LiRPA's patches mode).

The oracle is the dense back-substitution (``CrownAnalysis._backward`` on full one-hot
specifications, the rule-by-rule walk the windows replace) and, independently, the network's
own outputs on points sampled in the box, which every bound must contain.
"""

from __future__ import annotations

import pytest
import torch

from app.bounds import crown
from app.bounds.crown import CrownAnalysis
from app.layers import Add, Conv2d, ElementwiseAffine, Flatten, Linear, MaxPool2d, ReLU
from app.network import Network


def _conv(c_in: int, c_out: int, k: int, **kw) -> Conv2d:
    return Conv2d(torch.randn(c_out, c_in // kw.get("groups", 1), k, k) / k,
                  torch.randn(c_out) * 0.1, **kw)


def _net(name: str) -> Network:
    torch.manual_seed(3)
    if name == "strided_dilated_grouped":
        layers = [_conv(2, 4, 3, stride=(2, 2), padding=(1, 1)), ReLU(),
                  _conv(4, 4, 3, padding=(2, 2), dilation=(2, 2)), ReLU(),
                  _conv(4, 6, 2, groups=2), ReLU(), Flatten(), Linear(torch.randn(3, 6 * 4 * 4))]
        return Network(layers, (2, 9, 9))
    if name == "affine_conv_conv_maxpool":
        layers = [ElementwiseAffine(torch.rand(2, 1, 1) + 0.5, torch.randn(2, 1, 1)),
                  _conv(2, 3, 3, padding=(1, 1)), _conv(3, 3, 3, stride=(2, 2), padding=(1, 1)),
                  ReLU(), _conv(3, 4, 3, padding=(1, 1)), ReLU(), MaxPool2d((2, 2), (2, 2)),
                  _conv(4, 4, 2, padding=(1, 1)), Flatten(), Linear(torch.randn(5, 4 * 3 * 3))]
        return Network(layers, (2, 10, 10))
    # residual: conv -> relu -> conv -> add(skip) -> relu -> conv -> relu -> flatten -> linear
    layers = [_conv(1, 3, 3, padding=(1, 1)), ReLU(), _conv(3, 3, 3, padding=(1, 1)), Add(),
              ReLU(), _conv(3, 2, 3, stride=(2, 2)), ReLU(), Flatten(), Linear(torch.randn(4, 18))]
    inputs = [(-1,), (0,), (1,), (2, 1), (3,), (4,), (5,), (6,), (7,)]
    return Network(layers, (1, 8, 8), inputs)


NETS = ["strided_dilated_grouped", "affine_conv_conv_maxpool", "residual"]


def _box(net: Network, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(4)
    x = torch.rand(2, *net.input_shape, dtype=dtype)
    return x - 0.15, x + 0.15


@pytest.mark.parametrize("name", NETS)
def test_windows_equal_dense_back_substitution(name: str) -> None:
    net = _net(name).with_dtype(torch.float64)
    lo, hi = _box(net, torch.float64)
    analysis = CrownAnalysis(net, lo, hi)
    analysis.bounds(len(net.layers) - 1)  # every relaxation's bounds, as CROWN uses them
    checked = 0
    for node, layer in enumerate(net.layers):
        if not isinstance(layer, Conv2d) or node == 0:
            continue
        n = torch.Size(net.shapes[node]).numel()
        rows = torch.arange(0, n, 3)  # a spread of units, every channel and position
        windowed = analysis._unit_rows_local(node, rows)
        assert windowed is not None
        eye = torch.zeros(len(rows), n, dtype=torch.float64)
        eye[torch.arange(len(rows)), rows] = 1
        spec = torch.cat([eye, -eye]).reshape(1, 2 * len(rows), *net.shapes[node])
        dense = analysis._backward(node, spec.expand(2, *spec.shape[1:]))
        torch.testing.assert_close(windowed, dense, rtol=1e-10, atol=1e-10)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("name", NETS)
def test_analysis_same_with_and_without_windows(name: str, monkeypatch) -> None:
    net = _net(name).with_dtype(torch.float64)
    lo, hi = _box(net, torch.float64)
    fast = CrownAnalysis(net, lo, hi)
    got = [fast.bounds(i) for i in range(len(net.layers))]
    monkeypatch.setattr(crown, "WINDOW_MATRIX_ENTRIES", 0)
    by_conv = CrownAnalysis(net, lo, hi)  # windows moved by transposed convolutions
    monkeypatch.setattr(CrownAnalysis, "_unit_rows_local", lambda *_: None)
    slow = CrownAnalysis(net, lo, hi)
    for i in range(len(net.layers)):
        for a, b, c in zip(got[i], by_conv.bounds(i), slow.bounds(i), strict=True):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NETS)
def test_windowed_bounds_contain_sampled_outputs(name: str) -> None:
    net = _net(name)
    lo, hi = _box(net, torch.float32)
    analysis = CrownAnalysis(net, lo, hi)
    bounds = [analysis.bounds(i) for i in range(len(net.layers))]
    torch.manual_seed(5)
    for b in range(lo.shape[0]):
        u = torch.rand(4000, *net.input_shape)
        u[:1000] = (u[:1000] > 0.5).float()  # box corners too
        x = lo[b] + u * (hi[b] - lo[b])
        with torch.no_grad():
            outs = net.trace(x)
        for (node_lo, node_hi), out in zip(bounds, outs, strict=True):
            slack = 1e-4 * (1 + out.abs().amax())
            assert (out >= node_lo[b] - slack).all()
            assert (out <= node_hi[b] + slack).all()


@pytest.mark.parametrize("stride,padding,dilation,groups,kernel,size", [
    (2, 0, 1, 1, 4, 32),  # ConvSmall: the phase-split path, no trailing inputs
    (2, 1, 1, 2, 4, 15),  # phase-split with padding, groups and a trailing input row
    (3, 2, 1, 1, 3, 11),  # phase-split, stride equal to the kernel
    (2, 1, 1, 1, 3, 9),   # stride does not divide the kernel: plain transposed convolution
    (1, 2, 2, 1, 3, 8),   # dilated
])
def test_conv_transpose_is_the_adjoint(stride: int, padding: int, dilation: int, groups: int,
                                       kernel: int, size: int) -> None:
    torch.manual_seed(6)
    conv = Conv2d(torch.randn(4, 4 // groups, kernel, kernel, dtype=torch.float64),
                  torch.zeros(4, dtype=torch.float64), stride=(stride, stride),
                  padding=(padding, padding), dilation=(dilation, dilation), groups=groups)
    x = torch.randn(1, 4, size, size, dtype=torch.float64, requires_grad=True)
    out = conv.linear(x)
    y = torch.randn(3, *out.shape[1:], dtype=torch.float64)
    got = conv.transpose(y, (4, size, size))
    for k in range(3):  # autograd's vector-Jacobian product is A^T y
        (want,) = torch.autograd.grad(out, x, y[k:k + 1], retain_graph=True)
        torch.testing.assert_close(got[k], want[0], rtol=1e-12, atol=1e-12)
