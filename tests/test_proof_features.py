"""Proof features against independent oracles: onnx/onnxruntime re-checks of the pruned proof,
sampled feature values, finite differences of the midpoints, PGD for the certified eps."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from app import load_network
from app.analyses.proof_features import certify, largest_certified_eps, proof_features
from app.attacks import pgd
from app.bounds import QUICK_METHODS, analyze, input_box
from tests.conftest import SAMPLE_MODELS, shared_path

CONV = ["digits_conv_standard", "digits_conv_pgd", "digits_conv_ibp"]
FC = ["digits_fc_standard", "digits_fc_pgd", "digits_fc_ibp"]


def _sample(name: str) -> str:
    path = SAMPLE_MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip("sample models not trained yet")
    return str(path)


def _gallery(n: int) -> tuple[np.ndarray, np.ndarray]:
    path = SAMPLE_MODELS / "gallery" / "digits.npz"
    if not path.exists():
        pytest.skip("sample gallery not trained yet")
    data = np.load(path)
    return data["x"][:n], data["y"][:n]


def _pruned_onnx(path: str, kept: np.ndarray) -> onnx.ModelProto:
    """The model file with every final-layer column outside ``kept`` set to zero."""
    model = onnx.load(path)
    last = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    inits = {i.name: i for i in model.graph.initializer}
    weight = next(inits[name] for name in last.input if name in inits and
                  len(inits[name].dims) == 2)
    w = numpy_helper.to_array(weight).copy()
    trans_b = any(a.name == "transB" and a.i == 1 for a in last.attribute)
    axis = 1 if (last.op_type == "Gemm" and trans_b) else 0  # the features' axis of W
    mask = np.zeros(w.shape[axis], dtype=bool)
    mask[kept] = True
    if axis == 1:
        w[:, ~mask] = 0
    else:
        w[~mask, :] = 0
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    return model


def _certified_input(net, xs, ys, method: str) -> tuple[torch.Tensor, int, float]:
    """The first correctly classified gallery input and an eps its proof holds at."""
    for x, y in zip(xs, ys, strict=True):
        x_t = torch.tensor(x)
        eps = largest_certified_eps(net, x_t, int(y), method, eps_max=0.3, tol=5e-4)
        if eps > 0:
            return x_t, int(y), 0.8 * eps
    pytest.fail("no gallery input is certified")


@pytest.mark.parametrize("name,method", [(n, m) for n in CONV + FC[:1] for m in QUICK_METHODS]
                         + [("digits_fc_standard", "alpha-crown")])
def test_pruned_proof_is_sufficient_when_rechecked_from_the_onnx_file(name: str, method: str) -> None:
    path = _sample(name)
    net = load_network(path)
    xs, ys = _gallery(10)
    x, y, eps = _certified_input(net, xs, ys, method)
    result = proof_features(net, x, y, eps, method)
    assert result.certificate.certified and result.sufficient
    assert 0 < len(result.kept) <= result.num_nonzero <= result.num_features
    # priorities sorted: every kept feature outranks every dropped one
    dropped = np.setdiff1d(np.arange(result.num_features), result.kept)
    assert result.priority[result.kept].min() >= result.priority[dropped].max(initial=0)
    # independent re-check: edit the ONNX file itself and certify the edited model
    pruned = _pruned_onnx(path, result.kept)
    pruned_net = load_network_bytes(pruned)
    assert certify(pruned_net, x, y, eps, method).certified
    # ... and onnxruntime finds no sampled counterexample in the ball for the pruned model
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    lo, hi = input_box(x[None], eps)
    pts = (lo + (hi - lo) * torch.rand(2000, *x.shape, generator=torch.Generator().manual_seed(0)))
    name_in = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name_in: p[None].numpy()})[0] for p in pts[:300]])
    assert (logits.argmax(1) == y).all()


def load_network_bytes(model: onnx.ModelProto):
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        f.write(model.SerializeToString())
        f.flush()
        return load_network(f.name)


@pytest.mark.parametrize("method", list(QUICK_METHODS))
def test_priority_follows_the_paper_formula_from_the_onnx_weights(method: str) -> None:
    path = _sample("digits_fc_pgd")
    net = load_network(path)
    xs, ys = _gallery(10)
    x, y, eps = _certified_input(net, xs, ys, method)
    result = proof_features(net, x, y, eps, method)
    model = onnx.load(path)
    last = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w = next(inits[n] for n in last.input if n in inits and inits[n].ndim == 2)
    if not any(a.name == "transB" and a.i == 1 for a in last.attribute):
        w = w.T  # now [classes, features]
    diff = np.abs(w[y][None] - np.delete(w, y, axis=0)).max(0)
    expected = np.maximum(np.abs(result.lower), np.abs(result.upper)) * diff
    np.testing.assert_allclose(result.priority, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", list(QUICK_METHODS))
def test_feature_intervals_contain_sampled_penultimate_values(method: str) -> None:
    path = _sample("digits_conv_pgd")
    net = load_network(path)
    xs, ys = _gallery(1)
    x = torch.tensor(xs[0])
    result = proof_features(net, x, int(ys[0]), 0.05, method)
    lo, hi = input_box(x[None], 0.05)
    u = torch.rand(10_000, *x.shape, generator=torch.Generator().manual_seed(1))
    u[5000:] = u[5000:].round()
    with torch.no_grad():
        feats = net.trace(lo + (hi - lo) * u)[result.feature_node].reshape(10_000, -1).numpy()
    assert (feats >= result.lower - 1e-5).all() and (feats <= result.upper + 1e-5).all()


@pytest.mark.parametrize("method", list(QUICK_METHODS))
def test_gradient_maps_match_finite_differences_of_the_midpoints(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    net = load_network(model, input_shape=(6,)).with_dtype(torch.float64)
    x = torch.tensor([0.3, 0.5, 0.45, 0.6, 0.35, 0.55], dtype=torch.float64)
    label = int(net(x[None]).argmax())
    eps = 0.5 * largest_certified_eps(net, x, label, method, tol=1e-4)
    result = proof_features(net, x, label, eps, method)
    assert result.sufficient and len(result.kept) == len(result.gradient_maps) > 0

    def midpoints(z: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            lo, up = analyze(net, *input_box(z[None], eps), method).bounds(result.feature_node)
        return ((lo + up) / 2)[0].numpy()

    h = 1e-6
    for k in range(6):
        e = torch.zeros(6, dtype=torch.float64)
        e[k] = h
        fd = (midpoints(x + e) - midpoints(x - e)) / (2 * h)
        np.testing.assert_allclose(result.gradient_maps[:, k], fd[result.kept], atol=1e-5)


def test_uncertified_input_gives_no_proof_and_pgd_agrees() -> None:
    net = load_network(_sample("digits_fc_standard"))
    xs, ys = _gallery(20)
    x, y = torch.tensor(xs), torch.tensor(ys).long()
    adv = pgd(net, x, y, 0.3, steps=20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        broken = (net(adv).argmax(1) != y).nonzero().squeeze(1)
    assert broken.numel() > 0
    i = int(broken[0])
    for method in QUICK_METHODS:
        result = proof_features(net, x[i], int(y[i]), 0.3, method)
        assert not result.certificate.certified and result.certificate.margin <= 0
        assert len(result.kept) == 0 and not result.sufficient


def test_largest_certified_eps_is_safe_against_pgd_and_ordered_by_method() -> None:
    net = load_network(_sample("digits_conv_ibp"))
    xs, ys = _gallery(3)
    for x, y in zip(xs, ys, strict=True):
        x_t, y_t = torch.tensor(x), int(y)
        found = {m: largest_certified_eps(net, x_t, y_t, m, tol=1e-3) for m in QUICK_METHODS}
        # intersecting with intervals makes the linear relaxations never weaker than IBP
        assert found["crown"] >= found["interval"] - 1e-3
        assert found["deepz"] >= found["interval"] - 1e-3
        for method, eps in found.items():
            if eps == 0:
                continue
            assert certify(net, x_t, y_t, eps, method).certified
            assert not certify(net, x_t, y_t, min(0.5, eps + 5e-3), method).certified or eps >= 0.495
            adv = pgd(net, x_t[None], torch.tensor([y_t]), eps, steps=30, restarts=2,
                      generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                assert int(net(adv).argmax()) == y_t


@pytest.mark.parametrize("name", ["mnist_0.1.onnx", "convSmall_pgd_cifar.onnx"])
def test_proof_features_on_published_networks(name: str) -> None:
    net = load_network(str(shared_path("profit_nets", name)))
    if name.startswith("mnist"):
        row = np.loadtxt(shared_path("eran", "mnist_test.csv"), delimiter=",", max_rows=1)
        x = torch.tensor(row[1:] / 255.0, dtype=torch.float32).reshape(net.input_shape)
        eps = 0.02
    else:
        row = np.loadtxt(shared_path("eran", "cifar10_test.csv"), delimiter=",", max_rows=1)
        x = torch.tensor(row[1:] / 255.0, dtype=torch.float32).reshape(32, 32, 3).permute(2, 0, 1)
        eps = 0.5 / 255
    label = int(row[0])
    result = proof_features(net, x, label, eps, "crown")
    assert result.certificate.certified and result.sufficient
    assert len(result.kept) < result.num_nonzero <= result.num_features == 100
    assert result.gradient_maps.shape == (len(result.kept), *net.input_shape)
    assert np.abs(result.gradient_maps).sum() > 0
