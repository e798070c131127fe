"""ExactLine / ExactPlane / exact IG against independent oracles.

Oracles: forward passes of the network at densely sampled points (patterns and logits),
a 10^5-point float32 grid along each segment (no missed boundary beyond rounding noise),
point-in-polygon tests and the shoelace area for planes, and Captum's Integrated Gradients at
10^4 steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from app import InvalidInputError, load_network
from app.analyses.linear_regions import (
    captum_integrated_gradients,
    crossings,
    direction,
    endpoint,
    exact_integrated_gradients,
    exact_line,
    exact_lines,
    exact_plane,
    linearity_study,
    relative_error,
    sweep,
)
from app.analyses.linear_regions import ig as ig_module
from app.layers import Add, Flatten, Linear, ReLU
from app.network import Network
from tests.conftest import SAMPLE_MODELS, shared_path

# -- small seeded models covering every layer kind -------------------------------------------


def _fc() -> Network:
    torch.manual_seed(0)
    return load_network(nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(),
                                      nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)),
                        input_shape=(1, 4, 4))


def _conv_pool() -> Network:
    """Conv, MaxPool (arg-max switches), ElementwiseAffine (BatchNorm), AvgPool, Linear."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(4)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), bn, nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 3),
    ).eval()
    return load_network(model, input_shape=(1, 8, 8))


def _residual() -> Network:
    """x -> relu(W1 x) -> W2 . + x (Add) -> relu -> W3: a graph with a skip connection."""
    g = torch.Generator().manual_seed(2)
    w = [torch.randn(8, 8, generator=g) for _ in range(2)] + [torch.randn(3, 8, generator=g)]
    b = [torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(3, generator=g)]
    layers = [Flatten(), Linear(w[0], b[0]), ReLU(), Linear(w[1], b[1]), Add(), ReLU(),
              Linear(w[2], b[2])]
    inputs = [(-1,), (0,), (1,), (2,), (3, 0), (4,), (5,)]
    return Network(layers, (8,), inputs=inputs, name="residual")


SMALL = {"fc": _fc, "conv_pool": _conv_pool, "residual": _residual}

# -- oracles --------------------------------------------------------------------------------


def _forward(net: Network, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and all ReLU pre-activations (``net.relu_indices`` order) by a plain forward pass."""
    with torch.inference_mode():
        t = torch.from_numpy(x).to(net.dtype)
        outs = net.trace(t)
        pre = [net.node_inputs(outs, t, i)[0].reshape(len(t), -1) for i in net.relu_indices]
    pre_all = torch.cat(pre, 1) if pre else torch.zeros(len(t), 0, dtype=net.dtype)
    return outs[-1].reshape(len(t), -1).numpy(), pre_all.numpy()


def _sign_mismatches(pre: np.ndarray, pattern: np.ndarray, rel_tol: float) -> int:
    """ReLU units whose on/off state differs from ``pattern``, ignoring units within
    ``rel_tol`` of zero (their sign at a boundary is rounding noise)."""
    tol = rel_tol * max(1.0, float(np.abs(pre).max())) if pre.size else 0.0
    return int((((pre > 0) != pattern) & (np.abs(pre) > tol)).sum())


F32_SAFETY = 10.0  # float32 rounding seen at the piece ends, times this, is still rounding


def _points32(line, ts: np.ndarray) -> np.ndarray:
    """Inputs at ``ts`` built directly in float32 (no float64 copy of a 10^5-point grid)."""
    start, d = line.start.astype(np.float32), (line.end - line.start).astype(np.float32)
    return start[None] + ts.astype(np.float32).reshape(-1, *([1] * start.ndim)) * d[None]


def missed_boundaries(net: Network, line, grid: int = 100_000, chunk: int = 4096) -> int:
    """Points of a regular ``grid`` on [0, 1] whose ReLU pattern contradicts their piece's.

    The grid runs in float32 (float64 convolutions cost ~1 ms per point). A unit's sign counts
    only where its margin |z| exceeds its float32 noise: ``F32_SAFETY`` times the gap between
    float32 and float64 forward passes at the piece ends (plus float32 eps times its largest
    |z|). So rounding at a true boundary is no alarm, while a sign change the partition missed
    between two breakpoints is, once the margin grows past the noise."""
    net32, net64 = net.with_dtype(torch.float32), net.with_dtype(torch.float64)
    _, z64 = _forward(net64, line.points(line.ts))
    _, z32 = _forward(net32, _points32(line, line.ts))
    eps = np.finfo(np.float32).eps
    tol = F32_SAFETY * (np.abs(z32 - z64).max(0) + eps * np.abs(z64).max(0))
    g = np.linspace(0.0, 1.0, grid)
    owner = np.clip(np.searchsorted(line.ts, g, side="right") - 1, 0, line.num_pieces - 1)
    missed = 0
    for lo in range(0, grid, chunk):
        _, pre = _forward(net32, _points32(line, g[lo:lo + chunk]))
        wrong = (pre > 0) != line.relu_pattern[owner[lo:lo + chunk]]
        missed += int((wrong & (np.abs(pre) > tol)).any(1).sum())
    return missed


def check_line(net: Network, line, grid: int = 100_000, per_piece: int = 50,
               chunk: int = 4096) -> None:
    net64 = net.with_dtype(torch.float64)
    ts = line.ts
    assert ts[0] == 0.0 and ts[-1] == 1.0 and np.all(np.diff(ts) > 0)
    assert len(line.pattern_ids) == line.num_pieces
    # adjacent pieces differ in pattern
    assert np.all(line.pattern_ids[1:] != line.pattern_ids[:-1])
    # dense sampling: random points inside every piece
    rng = np.random.default_rng(0)
    piece = np.repeat(np.arange(line.num_pieces), per_piece)
    t = ts[piece] + rng.uniform(0.02, 0.98, len(piece)) * (ts[piece + 1] - ts[piece])
    scale = max(1.0, float(np.abs(line.logits).max()))
    for lo in range(0, len(t), chunk):
        logits, pre = _forward(net64, line.points(t[lo:lo + chunk]))
        assert np.abs(logits - line.logits_at(t[lo:lo + chunk])).max() <= 1e-6 * scale
        assert _sign_mismatches(pre, line.relu_pattern[piece[lo:lo + chunk]], 1e-9) == 0
    # no missed boundary: every point of a regular grid has the pattern of its piece
    assert missed_boundaries(net, line, grid) == 0


# -- ExactLine ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL)
def test_line_oracles_on_small_models(name: str) -> None:
    net = SMALL[name]()
    g = torch.Generator().manual_seed(3)
    a, b = (torch.rand(net.input_shape, generator=g) * 4 - 2 for _ in range(2))
    line = exact_line(net, a, b)
    assert line.num_pieces >= 5
    check_line(net, line)
    # logits at the breakpoints are the network's, from an independent forward pass
    logits, _ = _forward(net.with_dtype(torch.float64), line.points(line.ts))
    assert np.allclose(logits, line.logits, atol=1e-9)


@pytest.mark.parametrize("name", ["fc", "conv_pool", "strided_conv"])
def test_crossings_through_columns_equal_full_evaluations(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values at new points from gathered columns (``crossings``) against the plain walk that
    evaluates every layer at every point, on nets small enough that the walk would normally
    not take that path; then the dense-sampling oracle and Captum on the fused path."""
    net = SMALL[name]() if name in SMALL else _strided_conv()
    g = torch.Generator().manual_seed(11)
    a, b = (torch.rand(net.input_shape, generator=g) * 4 - 2 for _ in range(2))
    monkeypatch.setattr(crossings, "MIN_MACS", 10**12)
    assert not crossings.fusable_chains(net)
    plain = exact_line(net, a, b)
    ig_plain = exact_integrated_gradients(net, b, a, target=0)
    monkeypatch.setattr(crossings, "MIN_MACS", 0)
    net = net.with_dtype(net.dtype)  # a new network: its chains are looked up anew
    assert crossings.fusable_chains(net)
    fused = exact_line(net, a, b)
    assert len(fused.ts) == len(plain.ts) and np.abs(fused.ts - plain.ts).max() < 1e-12
    assert np.array_equal(fused.relu_pattern, plain.relu_pattern)
    assert np.abs(fused.logits - plain.logits).max() <= 1e-9 * max(1, np.abs(plain.logits).max())
    check_line(net, fused, grid=20_000)
    ig = exact_integrated_gradients(net, b, a, target=0)
    assert ig.completeness_error < 1e-6
    assert relative_error(ig.attributions, ig_plain.attributions) < 1e-9
    ref = captum_integrated_gradients(net, b, a, 0, 10_000, method="riemann_trapezoid")
    assert relative_error(ref, ig.attributions) < 1e-3


def test_crossings_in_blocks_and_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many segments whose new points are pushed through in several blocks, with columns
    gathered per call, give the lines of one block with a column table; the column path in
    float32 agrees with float64 to float32 rounding."""
    net = _strided_conv().with_dtype(torch.float64)
    monkeypatch.setattr(crossings, "MIN_MACS", 0)
    g = torch.Generator().manual_seed(13)
    starts, ends = (torch.rand(6, *net.input_shape, generator=g, dtype=torch.float64) * 4 - 2
                    for _ in range(2))
    whole = exact_lines(net, starts, ends)
    monkeypatch.setattr(crossings, "MAX_BLOCK", 64)  # a block per segment or so
    monkeypatch.setattr(crossings, "MAX_TABLE", 0)  # and columns gathered per call, no table
    blocks = exact_lines(net.with_dtype(torch.float64), starts, ends)
    for one, other in zip(whole, blocks, strict=True):  # equal up to the sums' rounding
        assert len(one.ts) == len(other.ts) and np.abs(one.ts - other.ts).max() < 1e-12
        assert np.array_equal(one.relu_pattern, other.relu_pattern)
        assert np.abs(one.logits - other.logits).max() < 1e-12
    l32 = exact_line(net.with_dtype(torch.float32), starts[0], ends[0], dtype=torch.float32)
    assert l32.logits.dtype == np.float32
    assert abs(l32.num_pieces - whole[0].num_pieces) <= 1
    assert np.abs(l32.logits_at(whole[0].ts) - whole[0].logits).max() < 1e-4


def _strided_conv() -> Network:
    """Strided, dilated and grouped convolutions straight after ReLUs (their columns are
    gathered from the kernels), and a Flatten between a ReLU and a Linear."""
    torch.manual_seed(12)
    return load_network(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=2,
                                                            dilation=2, groups=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3)),
        input_shape=(2, 7, 7))


def test_maxpool_switches_are_cut() -> None:
    """A net whose only nonlinearity is MaxPool: pieces = arg-max switches, checked densely."""
    torch.manual_seed(4)
    net = load_network(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2),
                                      nn.Flatten(), nn.Linear(32, 3)), input_shape=(1, 8, 8))
    a, b = torch.randn(1, 8, 8), torch.randn(1, 8, 8)
    line = exact_line(net, a, b)
    assert line.num_pieces > 1
    check_line(net, line, grid=20_000)
    # an independent count: distinct arg-max patterns on a fine grid never exceed the pieces
    net64 = net.with_dtype(torch.float64)
    g = torch.from_numpy(line.points(np.linspace(0, 1, 20_000)))
    with torch.no_grad():
        conv = net64.trace(g)[0]
    idx = net64.layers[1].windows(conv).argmax(-1).reshape(len(g), -1)
    changes = int((idx[1:] != idx[:-1]).any(1).sum())
    assert line.num_pieces <= changes + 1
    assert line.num_pieces >= changes + 1 - 2  # grid may merge two switches a few 1e-5 apart


def test_batched_lines_equal_single_lines() -> None:
    net = _conv_pool()
    g = torch.Generator().manual_seed(5)
    starts, ends = torch.rand(4, 1, 8, 8, generator=g), torch.rand(4, 1, 8, 8, generator=g)
    batch = exact_lines(net, starts, ends)
    for k, line in enumerate(batch):
        single = exact_line(net, starts[k], ends[k])
        assert np.allclose(single.ts, line.ts, atol=1e-12)
        assert np.array_equal(single.relu_pattern, line.relu_pattern)


def test_float32_option_agrees() -> None:
    net = _fc()
    a, b = torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), 1.5)
    l64, l32 = exact_line(net, a, b), exact_line(net, a, b, dtype=torch.float32)
    assert l32.logits.dtype == np.float32
    assert abs(l32.num_pieces - l64.num_pieces) <= 1
    assert np.abs(l32.logits_at(l64.ts) - l64.logits).max() < 1e-4


def test_class_strip_is_exact() -> None:
    net = _residual()
    g = torch.Generator().manual_seed(6)
    line = exact_line(net, torch.randn(8, generator=g) * 3, torch.randn(8, generator=g) * 3)
    grid = np.linspace(0, 1, 20_001)
    logits, _ = _forward(net.with_dtype(torch.float64), line.points(grid))
    owner = np.clip(np.searchsorted(line.class_ts, grid, side="right") - 1, 0,
                    len(line.class_labels) - 1)
    top2 = np.sort(logits, 1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-9
    assert np.array_equal(logits.argmax(1)[clear], line.class_labels[owner][clear])


def _gallery() -> np.ndarray:
    path = SAMPLE_MODELS / "gallery" / "digits.npz"
    if not path.exists():
        pytest.skip("sample gallery not trained yet")
    return np.load(path)["x"]


def _sample_models() -> list[str]:
    return [p.stem for p in sorted(SAMPLE_MODELS.glob("digits_*.onnx"))]


@pytest.mark.parametrize("name", _sample_models() or ["none"])
def test_line_oracles_on_sample_models(name: str) -> None:
    if name == "none":
        pytest.skip("no sample models yet")
    net = load_network(SAMPLE_MODELS / f"{name}.onnx")
    xs = _gallery()
    line = exact_line(net, xs[0], xs[1])
    check_line(net, line)


def _eran_images(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(shared_path("eran", f"{name}_test.csv"), delimiter=",", max_rows=n, ndmin=2)
    return rows[:, 0].astype(int), rows[:, 1:] / 255.0


def test_line_oracles_on_acasxu() -> None:
    net = load_network(shared_path("vnncomp2021", "acasxu", "ACASXU_run2a_1_1_batch_2000.onnx"))
    a = np.array([-0.3, -0.5, -0.5, 0.4, 0.3]).reshape(net.input_shape)
    b = np.array([0.6, 0.5, 0.5, -0.4, -0.4]).reshape(net.input_shape)
    line = exact_line(net, a, b)
    assert line.num_pieces > 10
    check_line(net, line)


def test_line_oracles_on_mnistfc() -> None:
    net = load_network(shared_path("vnncomp2021", "mnistfc", "mnist-net_256x2.onnx"))
    _, x = _eran_images("mnist", 2)
    line = exact_line(net, x[0].reshape(net.input_shape), x[1].reshape(net.input_shape))
    assert line.num_pieces > 10
    check_line(net, line)


def test_line_oracles_on_cifar_conv() -> None:
    net = load_network(shared_path("profit_nets", "convSmall_pgd_cifar.onnx"))
    _, x = _eran_images("cifar10", 1)
    img = x[0].reshape(32, 32, 3).transpose(2, 0, 1)
    end = endpoint(net, img, "fgsm", 0.01)
    line = exact_line(net, img, end)
    assert line.num_pieces > 10
    check_line(net, line)


# -- directions and the linearity study ------------------------------------------------------


def test_directions_have_unit_linf_and_fgsm_ascends_the_loss() -> None:
    net = _conv_pool().with_dtype(torch.float64)
    x = torch.rand(1, 8, 8, dtype=torch.float64)
    for kind in ("fgsm", "pgd", "random"):
        d = direction(net, x, kind)
        assert d.shape == x.shape and abs(float(d.abs().max()) - 1.0) < 1e-12
    # FGSM: the loss's directional derivative along d is ||grad||_1 (independent autograd)
    xr = x.unsqueeze(0).clone().requires_grad_(True)
    y = net(xr).argmax(1)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(net(xr), y), xr)
    d = direction(net, x, "fgsm")
    assert torch.isclose((grad[0] * d).sum(), grad.abs().sum(), rtol=1e-9)
    with pytest.raises(InvalidInputError):
        direction(net, x, "sideways")


def test_linearity_study_tangent_gap_matches_forward_passes() -> None:
    net = _fc()
    x = torch.rand(1, 4, 4)
    study = linearity_study(net, x, 1.0, n_random=3)
    assert len(study.random) == 3 and study.fgsm.line.num_pieces >= 1
    ln = study.fgsm.line
    # tangent from an autograd Jacobian at a point inside the first piece
    net64 = net.with_dtype(torch.float64)
    inside = torch.from_numpy(ln.points([ln.ts[1] / 2]))[0]
    jac = torch.autograd.functional.jacobian(lambda z: net64(z.unsqueeze(0))[0], inside)
    d = torch.from_numpy(ln.end - ln.start)
    slope = (jac.reshape(jac.shape[0], -1) @ d.reshape(-1)).numpy()
    logits, _ = _forward(net64, ln.points(ln.ts))
    gap = np.abs(logits - (logits[0] + ln.ts[:, None] * slope)).max(1)
    assert np.allclose(gap, study.fgsm.tangent_gap, atol=1e-9)
    assert study.fgsm.tangent_gap[:2].max() < 1e-9  # the tangent is exact on the first piece


# -- exact Integrated Gradients ---------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL)
def test_exact_ig_completeness_and_captum(name: str) -> None:
    net = SMALL[name]()
    g = torch.Generator().manual_seed(7)
    x = torch.rand(net.input_shape, generator=g) * 2
    base = torch.rand(net.input_shape, generator=g) - 0.5
    ig = exact_integrated_gradients(net, x, base, target=1)
    assert ig.attributions.shape == tuple(x.shape)
    with torch.no_grad():
        net64 = net.with_dtype(torch.float64)
        f = net64(torch.stack([x, base]).double())[:, 1]
    assert abs(ig.attributions.sum() - float(f[0] - f[1])) < 1e-6
    assert ig.completeness_error < 1e-6
    ref = captum_integrated_gradients(net, x, base, 1, 10_000, method="riemann_trapezoid")
    assert relative_error(ref, ig.attributions) < 1e-3


def test_exact_ig_on_sample_conv_model() -> None:
    path = SAMPLE_MODELS / "digits_conv_standard.onnx"
    if not path.exists():
        pytest.skip("sample models not trained yet")
    net = load_network(path)
    x = _gallery()[3]
    ig = exact_integrated_gradients(net, x)
    assert ig.completeness_error < 1e-6
    ref = captum_integrated_gradients(net, x, None, ig.target, 10_000,
                                      method="riemann_trapezoid")
    assert relative_error(ref, ig.attributions) < 1e-3


def _deep_tail_conv(bias: bool = True) -> Network:
    """Normalisation and BatchNorm before the first ReLU, a strided conv after it, and two
    dense ReLU layers on top: the event sweep's every part (head, blocks, a tail that feeds
    another ReLU)."""
    torch.manual_seed(21)
    bn = nn.BatchNorm2d(4)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=bias), bn, nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, bias=bias),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 12, bias=bias), nn.ReLU(),
        nn.Linear(12, 10, bias=bias), nn.ReLU(), nn.Linear(10, 3, bias=bias)).eval()
    if not bias:  # zero pre-activations everywhere at a zero baseline: every tie rule runs
        bn.running_mean.zero_()
        bn.bias.data.zero_()
    return load_network(model, input_shape=(2, 9, 9))


@pytest.mark.parametrize("name", ["strided_conv", "deep_tail", "no_bias"])
def test_exact_ig_by_event_sweep(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Conv nets take the event sweep (``sweep``); its IG against the piece walk's backward
    sweep (the same integral by another algorithm), Captum at 10^4 steps, and completeness,
    on paths from random baselines and from zero (ties at t = 0 when there are no biases)."""
    net = {"strided_conv": _strided_conv, "deep_tail": _deep_tail_conv,
           "no_bias": lambda: _deep_tail_conv(bias=False)}[name]().with_dtype(torch.float64)
    monkeypatch.setattr(sweep, "DENSE_RATIO", 0)  # these small convs' columns are dense-ish
    if name != "strided_conv":  # scipy's sparse products, as on large nets
        monkeypatch.setattr(sweep, "SMALL_PRODUCT", 0)
    assert ig_module.sweep_plan(net) is not None
    g = torch.Generator().manual_seed(5)
    x = torch.rand(net.input_shape, generator=g, dtype=torch.float64) * 2
    pieces = []
    for base in (torch.rand(net.input_shape, generator=g, dtype=torch.float64) - 0.5, None):
        for target in range(3):
            swept = exact_integrated_gradients(net, x, base, target=target)
            with monkeypatch.context() as m:
                m.setattr(ig_module, "sweep_plan", lambda net: None)
                walked = exact_integrated_gradients(net, x, base, target=target)
            assert swept.num_pieces == walked.num_pieces
            pieces.append(swept.num_pieces)
            assert relative_error(swept.attributions, walked.attributions) < 1e-9
            assert swept.completeness_error < 1e-9
            ref = captum_integrated_gradients(net, x, base, target, 10_000,
                                              method="riemann_trapezoid")
            assert relative_error(ref, swept.attributions) < 1e-3
    assert max(pieces) > 5  # (without biases a ray from 0 is one piece: homogeneity)
    ig32 = exact_integrated_gradients(net, x, dtype=torch.float32, target=0)
    assert ig32.attributions.dtype == np.float32
    ig64 = exact_integrated_gradients(net, x, target=0)
    assert relative_error(ig32.attributions, ig64.attributions) < 1e-4


def test_exact_ig_on_cifar_conv() -> None:
    """The event sweep on a CIFAR convSmall (thousands of pieces) against Captum."""
    net = load_network(shared_path("profit_nets", "convSmallRELU__Point.onnx"))
    _, x = _eran_images("cifar10", 1)
    img = x[0].reshape(32, 32, 3).transpose(2, 0, 1)
    assert ig_module.sweep_plan(net.with_dtype(torch.float64)) is not None
    ig = exact_integrated_gradients(net, img)
    assert ig.num_pieces > 1000 and ig.completeness_error < 1e-6
    ref = captum_integrated_gradients(net, img, None, ig.target, 10_000,
                                      method="riemann_trapezoid")
    assert relative_error(ref, ig.attributions) < 1e-3


# -- ExactPlane -----------------------------------------------------------------------------


def check_plane(net: Network, plane, n: int = 120) -> None:
    """Every grid point lies in exactly one polygon, whose pattern and class it has."""
    u = np.linspace(0.0, 1.0, n)
    ab = np.stack(np.meshgrid(u, u), -1).reshape(-1, 2)
    if plane.shape == "triangle":
        ab = ab[ab.sum(1) <= 1.0]
    closed = np.zeros(len(ab), dtype=int)
    strict = np.zeros(len(ab), dtype=int)
    owner = np.full(len(ab), -1)
    for q, poly in enumerate(plane.polygons):
        edge = np.roll(poly, -1, 0) - poly
        rel = ab[:, None, :] - poly[None]
        cross = (edge[None, :, 0] * rel[..., 1] - edge[None, :, 1] * rel[..., 0]) / np.maximum(
            np.linalg.norm(edge, axis=1), 1e-300)[None]
        real = np.linalg.norm(edge, axis=1) > 0
        inside = (cross[:, real] >= -1e-12).all(1)
        closed += inside
        strict += (cross[:, real] > 1e-9).all(1)
        owner[inside] = q
    assert closed.min() >= 1 and strict.max() <= 1
    assert np.isclose(plane.areas().sum(), 0.5 if plane.shape == "triangle" else 1.0, atol=1e-9)
    logits, pre = _forward(net.with_dtype(torch.float64), plane.points(ab))
    assert _sign_mismatches(pre, plane.relu_pattern[owner], 1e-9) == 0
    top2 = np.sort(logits, 1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-9
    assert np.array_equal(logits.argmax(1)[clear], plane.classes[owner][clear])


@pytest.mark.parametrize("name,shape", [("fc", "triangle"), ("residual", "parallelogram"),
                                        ("conv_pool", "triangle")])
def test_plane_grid_coverage(name: str, shape: str) -> None:
    net = SMALL[name]()
    g = torch.Generator().manual_seed(8)
    p0 = torch.rand(net.input_shape, generator=g)
    scale = 0.5 if name == "conv_pool" else 3.0
    p1, p2 = (p0 + scale * (torch.rand(net.input_shape, generator=g) - 0.5) for _ in range(2))
    plane = exact_plane(net, p0, p1, p2, shape=shape)
    assert plane.num_regions >= 3
    check_plane(net, plane)


def test_plane_on_acasxu() -> None:
    net = load_network(shared_path("vnncomp2021", "acasxu", "ACASXU_run2a_2_3_batch_2000.onnx"))
    p0 = np.array([0.0, 0.0, 0.0, 0.3, 0.0]).reshape(net.input_shape)
    p1 = np.array([0.3, 0.0, 0.0, 0.3, 0.0]).reshape(net.input_shape)
    p2 = np.array([0.0, 0.3, 0.0, 0.3, 0.0]).reshape(net.input_shape)
    plane = exact_plane(net, p0, p1, p2, shape="parallelogram")
    assert plane.num_regions >= 3
    check_plane(net, plane)


def _inside(points: np.ndarray, poly: np.ndarray, margin: float) -> np.ndarray:
    """Which ``points`` lie inside the counter-clockwise ``poly`` by more than ``margin``."""
    edge = np.roll(poly, -1, 0) - poly
    length = np.linalg.norm(edge, axis=1)
    rel = points[:, None, :] - poly[None]
    dist = (edge[None, :, 0] * rel[..., 1] - edge[None, :, 1] * rel[..., 0]) / np.maximum(
        length, 1e-300)[None]
    return (dist[:, length > 0] > margin).all(1)


def _plain_codes(net: Network, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """ReLU signs, MaxPool window winners and logits by a plain torch forward pass, with
    whether each ReLU unit's sign is clear of rounding."""
    with torch.inference_mode():
        t = torch.from_numpy(x).to(net.dtype)
        outs = net.trace(t)
        pre = [net.node_inputs(outs, t, i)[0].reshape(len(t), -1) for i in net.relu_indices]
        pool = [net.layers[i].windows(net.node_inputs(outs, t, i)[0]).argmax(-1)
                .reshape(len(t), -1) for i in net.maxpool_indices]
    z = torch.cat(pre, 1).numpy()
    winners = (torch.cat(pool, 1) if pool else torch.zeros(len(t), 0)).numpy()
    clear = np.abs(z) > 1e-12 * max(1.0, float(np.abs(z).max()))
    return np.where(clear, z > 0, False), winners, outs[-1].reshape(len(t), -1).numpy(), clear


def spurious_edges(net: Network, plane, delta: float = 1e-6) -> tuple[int, int]:
    """(edges checked, edges with the same pattern and class on both sides).

    Each drawn edge is probed at ``delta`` either side of its midpoint; where both probes lie
    well inside two different polygons, a plain forward pass at the probes says whether any
    ReLU sign, MaxPool winner or the predicted class differs across the edge."""
    inner, outer = [], []
    for poly in plane.polygons:
        edge = np.roll(poly, -1, 0) - poly
        length = np.linalg.norm(edge, axis=1)
        real = length > 1e-9
        normal = np.stack([edge[:, 1], -edge[:, 0]], 1)[real] / length[real, None]
        mid = (poly + edge / 2)[real]
        inner.append(mid - delta * normal)
        outer.append(mid + delta * normal)
    probes = np.concatenate(inner + outer)
    inside = np.stack([_inside(probes, p, delta / 10) for p in plane.polygons], 1)
    owner = np.where(inside.sum(1) == 1, inside.argmax(1), -1).reshape(2, -1)
    ok = (owner >= 0).all(0) & (owner[0] != owner[1])
    a, b = probes.reshape(2, -1, 2)[:, ok]
    sa, wa, la, ca = _plain_codes(net, plane.points(a))
    sb, wb, lb, cb = _plain_codes(net, plane.points(b))
    relu_differs = ((sa != sb) & ca & cb).any(1)
    pool_differs = (wa != wb).any(1)
    class_differs = la.argmax(1) != lb.argmax(1)
    return len(a), int((~(relu_differs | pool_differs | class_differs)).sum())


def test_plane_draws_no_edge_inside_a_region(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polygons with one pattern and one class are one polygon: no drawn edge has the same
    pattern and class on both sides. Without the merge the cutting leaves such edges (the
    class cuts of this plane over-split), so the probe is not vacuous."""
    path = SAMPLE_MODELS / "digits_fc_standard.onnx"
    if not path.exists():
        pytest.skip("sample models not trained yet")
    net = load_network(path).with_dtype(torch.float64)
    xs = _gallery().astype(np.float64)
    plane = exact_plane(net, xs[0], xs[1], xs[2])
    checked, spurious = spurious_edges(net, plane)
    assert checked >= 100 and spurious == 0
    check_plane(net, plane)
    for name, shape in [("conv_pool", "triangle"), ("residual", "parallelogram")]:
        small = SMALL[name]()
        g = torch.Generator().manual_seed(8)
        p0 = torch.rand(small.input_shape, generator=g)
        p1, p2 = (p0 + 2 * (torch.rand(small.input_shape, generator=g) - 0.5) for _ in range(2))
        small_plane = exact_plane(small, p0, p1, p2, shape=shape)
        checked, spurious = spurious_edges(small.with_dtype(torch.float64), small_plane)
        assert checked >= 100 and spurious == 0
    from app.analyses.linear_regions import plane as plane_module

    monkeypatch.setattr(plane_module, "_merge_cells",
                        lambda cells, ids, classes: (cells, np.arange(len(cells))))
    raw = exact_plane(net, xs[0], xs[1], xs[2])
    assert raw.num_polygons > plane.num_polygons
    assert spurious_edges(net, raw)[1] > 0


def test_bad_shapes_are_rejected() -> None:
    net = _fc()
    with pytest.raises(InvalidInputError):
        exact_line(net, torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(InvalidInputError):
        exact_plane(net, torch.zeros(1, 4, 4), torch.ones(1, 4, 4), torch.eye(4)[None],
                    shape="hexagon")
