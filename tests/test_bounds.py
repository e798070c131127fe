"""Bound propagators against independent oracles: sampling, PGD, MILP (scipy), VNN-COMP results."""

from __future__ import annotations

import copy
import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from app import load_network
from app.attacks import pgd
from app.bounds import QUICK_METHODS, analyze, input_box, property_lower_bounds
from app.network import Network
from tests.conftest import SAMPLE_MODELS, SHARED, shared_path

TOL = 1e-4


# -- models -------------------------------------------------------------------------------------


class _Residual(nn.Module):
    """conv -> relu -> maxpool, then a residual block, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.inner = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv(x)))
        h = torch.relu(self.inner(h)) + h
        return self.head(torch.relu(h).flatten(1))


def _synthetic(name: str) -> Network:
    torch.manual_seed(1)
    if name == "residual_maxpool":
        return load_network(_Residual().eval(), input_shape=(1, 8, 8))
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 12), nn.ReLU(), nn.Linear(12, 5),
    ).eval()
    return load_network(model, input_shape=(1, 8, 8))


def _eran_mnist(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.loadtxt(shared_path("eran", "mnist_test.csv"), delimiter=",", max_rows=n, ndmin=2)
    return torch.tensor(rows[:, 1:] / 255.0, dtype=torch.float32), torch.tensor(rows[:, 0]).long()


def _eran_cifar(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.loadtxt(shared_path("eran", "cifar10_test.csv"), delimiter=",", max_rows=n, ndmin=2)
    x = torch.tensor(rows[:, 1:] / 255.0, dtype=torch.float32).reshape(n, 32, 32, 3)
    return x.permute(0, 3, 1, 2).contiguous(), torch.tensor(rows[:, 0]).long()


def _gallery(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    path = SAMPLE_MODELS / "gallery" / "digits.npz"
    if not path.exists():
        pytest.skip("sample gallery not trained yet")
    data = np.load(path)
    return torch.tensor(data["x"][:n]), torch.tensor(data["y"][:n]).long()


# name -> (network, inputs, eps); each input is bounded in a batch
def _case(name: str) -> tuple[Network, torch.Tensor, float]:
    if name in ("residual_maxpool", "conv_maxpool_avgpool"):
        torch.manual_seed(2)
        return _synthetic(name), torch.rand(2, 1, 8, 8), 0.05
    if name.startswith("digits_"):
        path = SAMPLE_MODELS / f"{name}.onnx"
        if not path.exists():
            pytest.skip("sample models not trained yet")
        return load_network(str(path)), _gallery(2)[0], 0.1
    if "mnist" in name:
        net = load_network(str(shared_path(*name.split(":"))))
        x = _eran_mnist(1)[0].reshape(1, *net.input_shape)
        return net, x, 0.03
    net = load_network(str(shared_path(*name.split(":"))))
    return net, _eran_cifar(1)[0], 2 / 255


SAMPLES = [f"digits_{a}_{m}" for a in ("fc", "conv") for m in ("standard", "pgd", "ibp")]
SHARED_NETS = [
    "vnncomp2021:mnistfc:mnist-net_256x2.onnx",
    "profit_nets:mnist_0.1.onnx",
    "profit_nets:convSmallRELU__Point.onnx",
]
CASES = ["residual_maxpool", "conv_maxpool_avgpool", *SAMPLES, *SHARED_NETS]


def _samples_in_box(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` points per box: half uniform, half vertices (where extremes of ReLU nets live)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.rand((n, *lo.shape), generator=gen, dtype=lo.dtype)
    u[n // 2:] = u[n // 2:].round()
    return (lo + (hi - lo) * u).reshape(n * lo.shape[0], *lo.shape[1:])


# -- soundness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_bounds_contain_samples_and_pgd_point(case: str) -> None:
    net, x, eps = _case(case)
    b = x.shape[0]
    lo, hi = input_box(x, eps)
    with torch.no_grad():
        labels = net(x).argmax(1)
    adv = pgd(net, x, labels, eps, steps=20, generator=torch.Generator().manual_seed(0))
    pts = _samples_in_box(lo, hi, 10_000 // b)
    with torch.no_grad():
        traces = [net.trace(p) for p in pts.split(2000)] + [net.trace(adv)]
    feature = net.inputs[-1][0]
    for method in QUICK_METHODS:
        with torch.no_grad():
            analysis = analyze(net, lo, hi, method)
            margins = property_lower_bounds(net, lo, hi, labels, method)
        for node in (feature, len(net.layers) - 1):
            with torch.no_grad():
                low, up = analysis.bounds(node)
            scale = TOL * max(1.0, float(up.abs().max()))
            for t in traces:
                vals = t[node].reshape(-1, b, *t[node].shape[1:])
                assert (vals >= low - scale).all(), f"{method} lower bound violated at node {node}"
                assert (vals <= up + scale).all(), f"{method} upper bound violated at node {node}"
        for t in traces:
            logits = t[-1].reshape(-1, b, t[-1].shape[-1])
            true = logits.gather(2, labels.reshape(1, b, 1).expand(logits.shape[0], b, 1))
            others = torch.stack([
                torch.cat([row[:, :lab], row[:, lab + 1:]], -1) for row, lab in
                zip(logits.unbind(1), labels.tolist(), strict=True)
            ], 1)
            assert (true - others >= margins - scale).all(), f"{method} margin bound violated"


@pytest.mark.parametrize("case", CASES)
def test_crown_and_deepz_inside_interval(case: str) -> None:
    net, x, eps = _case(case)
    lo, hi = input_box(x, eps)
    with torch.no_grad():
        boxes = analyze(net, lo, hi, "interval")
        for method in ("deepz", "crown"):
            analysis = analyze(net, lo, hi, method)
            nodes = net.relu_indices if net.num_neurons() < 2000 else [net.inputs[-1][0]]
            for node in (*nodes, len(net.layers) - 1):
                low, up = analysis.bounds(node)
                ibp_low, ibp_up = boxes.bounds(node)
                assert (low >= ibp_low).all() and (up <= ibp_up).all()


@pytest.mark.parametrize("case", ["vnncomp2021:mnistfc:mnist-net_256x2.onnx", "digits_conv_standard"])
def test_linear_relaxations_are_strictly_tighter_on_standard_models(case: str) -> None:
    net, x, eps = _case(case)
    lo, hi = input_box(x, eps / 3)
    with torch.no_grad():
        widths = {m: analyze(net, lo, hi, m).bounds(len(net.layers) - 1) for m in QUICK_METHODS}
    width = {m: float((u - low).mean()) for m, (low, u) in widths.items()}
    assert width["crown"] < width["interval"] and width["deepz"] < width["interval"]


# -- exact ranges by MILP on tiny networks -------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.l1(x))
        g = torch.relu(self.l2(h))
        return self.l3(g + h if self.residual else g)


def _tiny_mlp(seed: int, residual: bool) -> tuple[nn.Module, list[nn.Linear]]:
    torch.manual_seed(seed)
    model = _Tiny(residual).eval()
    return model, [model.l1, model.l2, model.l3]


def _milp_range(layers: list[nn.Linear], lo: np.ndarray, hi: np.ndarray,
                residual: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact min/max of each output by a big-M MILP (its own numpy interval big-M bounds)."""
    w = [lin.weight.detach().double().numpy() for lin in layers]
    b = [lin.bias.detach().double().numpy() for lin in layers]

    def box(wm, bm, l, u):  # noqa: E741
        c, r = (l + u) / 2, (u - l) / 2
        return wm @ c + bm - np.abs(wm) @ r, wm @ c + bm + np.abs(wm) @ r

    a1 = box(w[0], b[0], lo, hi)
    h1 = (np.maximum(a1[0], 0), np.maximum(a1[1], 0))
    a2 = box(w[1], b[1], *h1)
    # variables: x(3), a1(6), y1(6), z1(6), a2(6), y2(6), z2(6)
    n = 3 + 6 * 6
    ix = {"x": 0, "a1": 3, "y1": 9, "z1": 15, "a2": 21, "y2": 27, "z2": 33}
    rows, lbs, ubs = [], [], []

    def row(entries: dict[tuple[str, int], float], low: float, up: float) -> None:
        r = np.zeros(n)
        for (var, k), v in entries.items():
            r[ix[var] + k] += v
        rows.append(r)
        lbs.append(low)
        ubs.append(up)

    for layer, (wm, bm, src, dst, y, z, (al, au)) in enumerate([
        (w[0], b[0], "x", "a1", "y1", "z1", a1), (w[1], b[1], "y1", "a2", "y2", "z2", a2),
    ]):
        del layer
        for i in range(6):
            entries = {(dst, i): 1.0}
            for j in range(wm.shape[1]):
                entries[(src, j)] = -wm[i, j]
            row(entries, bm[i], bm[i])
            row({(y, i): 1.0, (dst, i): -1.0}, 0, np.inf)  # y >= a
            row({(y, i): 1.0, (dst, i): -1.0, (z, i): -al[i]}, -np.inf, -al[i])  # y <= a - l(1-z)
            row({(y, i): 1.0, (z, i): -max(au[i], 0.0)}, -np.inf, 0)  # y <= u z
    bounds_lo = np.concatenate([lo, a1[0], np.zeros(6), np.zeros(6), a2[0], np.zeros(6), np.zeros(6)])
    bounds_hi = np.concatenate([hi, a1[1], h1[1], np.ones(6), a2[1], np.maximum(a2[1], 0), np.ones(6)])
    integrality = np.zeros(n)
    integrality[ix["z1"]:ix["z1"] + 6] = 1
    integrality[ix["z2"]:ix["z2"] + 6] = 1
    cons = LinearConstraint(np.array(rows), lbs, ubs)
    out_lo, out_hi = [], []
    for k in range(w[2].shape[0]):
        c = np.zeros(n)
        c[ix["y2"]:ix["y2"] + 6] = w[2][k]
        if residual:
            c[ix["y1"]:ix["y1"] + 6] = w[2][k]
        ends = []
        for sign in (1, -1):
            res = milp(sign * c, constraints=cons, integrality=integrality,
                       bounds=Bounds(bounds_lo, bounds_hi))
            assert res.success
            ends.append(sign * res.fun + b[2][k])
        out_lo.append(ends[0])
        out_hi.append(ends[1])
    return np.array(out_lo), np.array(out_hi)


@pytest.mark.parametrize("seed,residual", [(0, False), (1, False), (2, True)])
def test_all_bounds_enclose_the_exact_range_from_milp(seed: int, residual: bool) -> None:
    model, layers = _tiny_mlp(seed, residual)
    net = load_network(model, input_shape=(3,)).with_dtype(torch.float64)
    x = torch.tensor([[0.2, 0.5, 0.7]], dtype=torch.float64)
    lo, hi = input_box(x, 0.15)
    exact_lo, exact_hi = _milp_range(layers, lo[0].numpy(), hi[0].numpy(), residual)
    # the exact range is attained: a dense sample gets close to it from inside
    with torch.no_grad():
        outs = copy.deepcopy(model).double()(_samples_in_box(lo, hi, 20_000)).numpy()
    assert (outs.min(0) >= exact_lo - 1e-7).all() and (outs.max(0) <= exact_hi + 1e-7).all()
    gaps = []
    for method in QUICK_METHODS:
        with torch.no_grad():
            low, up = analyze(net, lo, hi, method).bounds(len(net.layers) - 1)
        assert (low[0].numpy() <= exact_lo + 1e-9).all() and (up[0].numpy() >= exact_hi - 1e-9).all()
        gaps.append(float((up - low).sum()) - float((exact_hi - exact_lo).sum()))
    assert min(gaps) >= -1e-9


# -- never certify what PGD breaks ----------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_pgd_broken_properties_are_never_certified(name: str) -> None:
    net, _, _ = _case(name)
    x, y = _gallery(40)
    for eps in (0.1, 0.25):
        adv = pgd(net, x, y, eps, steps=20, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            broken = net(adv).argmax(1) != y
            lo, hi = input_box(x, eps)
            for method in QUICK_METHODS:
                certified = (property_lower_bounds(net, lo, hi, y, method) > 0).all(1)
                assert not (certified & broken).any(), f"{method} certified a PGD-broken input"
    assert broken.any()  # eps = 0.25 breaks some inputs, so the check above bit


# -- VNN-COMP 2021 mnistfc with known outcomes ----------------------------------------------------


def _vnnlib(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Input box and the robust label of an mnistfc property (violated iff some Y_j >= Y_label)."""
    text = path.read_text()
    lo, hi = {}, {}
    for op, k, v in re.findall(r"\(assert \((<=|>=) X_(\d+) ([-+.\deE]+)\)\)", text):
        (hi if op == "<=" else lo)[int(k)] = float(v)
    pairs = re.findall(r"\(>= Y_(\d+) Y_(\d+)\)", text)
    labels = {int(b) for _, b in pairs}
    assert len(labels) == 1 and len(pairs) == 9
    n = len(lo)
    return (np.array([lo[k] for k in range(n)]), np.array([hi[k] for k in range(n)]),
            labels.pop())


def _known_outcomes(folder: Path) -> dict[tuple[str, str], str]:
    """``violated`` when some tool found a counterexample and none proved it, ``holds`` when
    some tool proved it and none found a counterexample."""
    said: dict[tuple[str, str], set[str]] = {}
    for tool in sorted(folder.glob("*.csv")):
        for row in csv.reader(tool.open()):
            if len(row) < 5 or row[0] != "mnistfc":
                continue
            key = (Path(row[1]).name, Path(row[2]).name)
            word = row[4].strip().lower()
            verdict = {"holds": "holds", "unsat": "holds", "violated": "violated", "sat": "violated"}
            if word in verdict:
                said.setdefault(key, set()).add(verdict[word])
    return {k: v.pop() for k, v in said.items() if len(v) == 1}


def test_no_violated_vnncomp_instance_is_certified() -> None:
    folder = shared_path("vnncomp2021")
    outcomes = _known_outcomes(folder / "results_csv")
    violated = [k for k, v in outcomes.items() if v == "violated"]
    assert violated, "the results list violated mnistfc instances"
    proven = 0
    nets: dict[str, Network] = {}
    for (onnx_name, prop), verdict in sorted(outcomes.items()):
        if not (folder / "mnistfc" / onnx_name).exists():
            continue
        net = nets.setdefault(onnx_name, load_network(str(folder / "mnistfc" / onnx_name)))
        lo, hi, label = _vnnlib(folder / "mnistfc" / prop)
        lo_t = torch.tensor(lo, dtype=torch.float32).reshape(1, *net.input_shape)
        hi_t = torch.tensor(hi, dtype=torch.float32).reshape(1, *net.input_shape)
        for method in ("interval", "deepz", "crown") if verdict == "violated" else ("crown",):
            with torch.no_grad():
                ok = bool((property_lower_bounds(net, lo_t, hi_t, torch.tensor([label]), method) > 0).all())
            assert not (ok and verdict == "violated"), f"{method} certified violated {onnx_name} {prop}"
            proven += ok
    assert proven > 0  # CROWN proves some of the instances that hold


def test_shared_data_is_found_or_skipped() -> None:
    if not SHARED.exists():
        pytest.skip("shared data not available")
    assert (SHARED / "vnncomp2021" / "results_csv").exists()
