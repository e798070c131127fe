"""Verified explanations (VeriX) against independent oracles: z3 over exact rationals of the
torch module's weights for soundness and irreducibility on small nets and for both complete
checks (MILP, ReLU-split branch and bound), the torch forward pass for every returned
counterexample, and a separate PGD on the complement of the explanation on the digits sample
models and the shared MNIST network."""

from __future__ import annotations

import time
from fractions import Fraction

import numpy as np
import pytest
import torch
import z3
from torch import nn

from app import load_network
from app.analyses.saliency import robust_milp, verix
from app.analyses.saliency.verix import UNPROVEN, WITNESSED, attack_batch, verified_explanation
from app.errors import InvalidInputError
from tests.conftest import SAMPLE_MODELS, shared_path


def _small(seed: int) -> nn.Sequential:
    """A 5-10-3 net whose hidden hyperplanes pass through the cube's centre, so that all
    three classes occur in [0, 1]^5 (random biases make one class win everywhere)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 3)).double().eval()
    with torch.no_grad():
        model[0].bias.copy_(-model[0].weight @ torch.full((5,), 0.5, dtype=torch.float64))
        model[2].bias.zero_()
    return model


def _near_boundary(model: nn.Sequential, seed: int, rank: int = 1000) -> np.ndarray:
    """The point of rank ``rank`` by class margin among 4000 random points."""
    pts = torch.from_numpy(np.random.default_rng(seed).uniform(0.1, 0.9, (4000, 5)))
    with torch.no_grad():
        top = model(pts).sort(1).values
    return pts[np.argsort((top[:, -1] - top[:, -2]).numpy())[rank]].numpy()


def _exists_other_class(model: nn.Sequential, lo: np.ndarray, hi: np.ndarray,
                        target: int) -> bool:
    """z3 in exact rational arithmetic: is some input in ``[lo, hi]`` scored at least as high
    for another class as for ``target``?"""
    q = lambda v: z3.RealVal(Fraction(float(v)))  # noqa: E731 - exact value of the double
    xs = [z3.Real(f"x{i}") for i in range(len(lo))]
    solver = z3.Solver()
    for v, a, b in zip(xs, lo, hi, strict=True):
        solver.add(v >= q(a), v <= q(b))
    values: list = xs
    for layer in model:
        if isinstance(layer, nn.Linear):
            w, bias = layer.weight.detach().numpy(), layer.bias.detach().numpy()
            values = [sum((q(w[r, c]) * values[c] for c in range(w.shape[1])), q(bias[r]))
                      for r in range(w.shape[0])]
        else:
            values = [z3.If(v > 0, v, q(0)) for v in values]
    solver.add(z3.Or([values[j] >= values[target] for j in range(len(values)) if j != target]))
    return solver.check() == z3.sat


def _box(res, x: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo_r, hi_r = res.input_range
    lo = np.where(fixed, x, np.minimum(x, np.clip(x - res.eps, lo_r, hi_r)))
    hi = np.where(fixed, x, np.maximum(x, np.clip(x + res.eps, lo_r, hi_r)))
    return lo, hi


def _check_mnist_explanation(net, x: torch.Tensor, res) -> None:
    """The kept features are the explanation; a kept feature is unproven exactly when it has
    no witness; PGD on the complement never flips it; every witness is real."""
    assert set(res.kept) == set(np.flatnonzero(res.explanation.reshape(-1)))
    assert all((v == UNPROVEN) == (i not in res.counterexamples) for i, v in res.kept.items())
    assert not _pgd_on_complement(net, x, res)
    _check_counterexamples(net, x.numpy(), res)


def _check_counterexamples(model, x: np.ndarray, res) -> None:
    """Each witness differs from ``x`` only off the explanation plus its own feature, within
    eps and the range, and the torch module classifies it otherwise."""
    flat_x, expl = x.reshape(-1), res.explanation.reshape(-1)
    for i, point in res.counterexamples.items():
        assert res.kept[i] == WITNESSED and expl[i]
        p = point.reshape(-1)
        fixed = expl.copy()
        fixed[i] = False
        assert np.array_equal(p[fixed], flat_x[fixed])
        assert np.all(np.abs(p - flat_x) <= res.eps + 1e-12)
        assert p.min() >= res.input_range[0] and p.max() <= res.input_range[1]
        with torch.no_grad():
            logits = model(torch.from_numpy(point).reshape(1, *x.shape))
        assert int(logits.argmax()) != res.target


@pytest.mark.parametrize("seed", range(4))
def test_small_nets_sound_and_irreducible_by_z3(seed: int) -> None:
    model = _small(seed)
    net = load_network(model, input_shape=(5,))
    x = _near_boundary(model, seed)
    for eps in (0.1, 0.3):
        res = verified_explanation(net, x, eps, timeout_s=30, check_timeout_s=10)
        with torch.no_grad():
            assert res.target == int(model(torch.from_numpy(x)[None]).argmax())
        expl = res.explanation.reshape(-1)
        assert sorted(res.freed + list(res.kept)) == list(range(5))
        assert set(np.flatnonzero(expl)) == set(res.kept)
        assert not _exists_other_class(model, *_box(res, x, expl), res.target)  # sound
        assert res.irreducible  # small nets: every kept feature decided
        _check_counterexamples(model, x, res)
        for i in np.flatnonzero(expl):  # irreducible, by z3 as well
            fixed = expl.copy()
            fixed[i] = False
            assert _exists_other_class(model, *_box(res, x, fixed), res.target)


@pytest.mark.parametrize("seed", range(3))
def test_complete_check_agrees_with_z3(seed: int) -> None:
    """The MILP alone (no attack first) on boxes of every size: ``robust`` only where z3 finds
    no other class, a counterexample only where the forward pass confirms it."""
    model = _small(10 + seed)
    net = load_network(model, input_shape=(5,)).with_dtype(torch.float64)
    x = _near_boundary(model, seed, rank=2000)
    verdicts = set()
    for eps in (0.005, 0.02, 0.05, 0.1, 0.3):
        lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
        with torch.no_grad():
            target = int(model(torch.from_numpy(x)[None]).argmax())
        out = robust_milp.check(net, torch.from_numpy(lo), torch.from_numpy(hi), target,
                                time.monotonic() + 30)
        verdicts.add(out.verdict)
        assert out.verdict != robust_milp.UNKNOWN
        assert (out.verdict == robust_milp.ROBUST) == (not _exists_other_class(model, lo, hi,
                                                                                target))
        if out.verdict == robust_milp.COUNTEREXAMPLE:
            p = out.point.numpy()
            assert np.all(p >= lo) and np.all(p <= hi)
            with torch.no_grad():
                assert int(model(out.point[None]).argmax()) != target
    assert verdicts == {robust_milp.ROBUST, robust_milp.COUNTEREXAMPLE}


@pytest.mark.parametrize("seed", range(3))
def test_branch_and_bound_check_agrees_with_z3(seed: int) -> None:
    """The ReLU-split branch and bound behind the search (no attack first), on one- and
    two-hidden-layer nets and boxes of every size: ``robust`` only where z3 finds no other
    class, a counterexample only where the forward pass confirms it."""
    verdicts = set()
    for model, n in ((_small(30 + seed), 5), (_wider(40 + seed), 7)):
        net = load_network(model, input_shape=(n,)).with_dtype(torch.float64)
        pts = torch.from_numpy(np.random.default_rng(seed).uniform(0.2, 0.8, (4000, n)))
        with torch.no_grad():
            top = model(pts).sort(1).values
        x = pts[int(np.argsort((top[:, -1] - top[:, -2]).numpy())[1000])].numpy()
        with torch.no_grad():
            target = int(model(torch.from_numpy(x)[None]).argmax())
        dense = verix._Dense.of(net)
        for eps in (0.005, 0.02, 0.05, 0.1, 0.3):
            lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
            verdict, point = verix._bab(net, dense, torch.from_numpy(lo), torch.from_numpy(hi),
                                        target, time.monotonic() + 30)
            verdicts.add(verdict)
            other = _exists_other_class(model, lo, hi, target)
            if verdict == robust_milp.ROBUST:
                assert not other
            elif verdict == robust_milp.COUNTEREXAMPLE:
                p = point.numpy()
                assert np.all(p >= lo) and np.all(p <= hi)
                with torch.no_grad():
                    assert int(model(point[None]).argmax()) != target
            else:  # unknown: only where no exact verdict is at hand either way
                assert verdict == robust_milp.UNKNOWN
    assert {robust_milp.ROBUST, robust_milp.COUNTEREXAMPLE} <= verdicts


def _pgd_on_complement(net, x: torch.Tensor, res, steps: int = 60, restarts: int = 16) -> bool:
    """An independent PGD (cross-entropy, random starts) over the features outside the
    explanation; True when it finds an input of another class."""
    free = torch.from_numpy(~res.explanation)
    lo_r, hi_r = res.input_range
    lo = torch.where(free, torch.clamp(x - res.eps, lo_r, hi_r), x)
    hi = torch.where(free, torch.clamp(x + res.eps, lo_r, hi_r), x)
    gen = torch.Generator().manual_seed(1)
    z = lo + (hi - lo) * torch.rand((restarts, *x.shape), generator=gen, dtype=x.dtype)
    label = torch.full((restarts,), res.target)
    for _ in range(steps):
        z.requires_grad_(True)
        loss = nn.functional.cross_entropy(net(z), label)
        grad, = torch.autograd.grad(loss, z)
        z = torch.minimum(torch.maximum(z.detach() + res.eps / 10 * grad.sign(), lo), hi)
    with torch.no_grad():
        return bool((net(z).argmax(1) != res.target).any())


@pytest.mark.parametrize("name", ["digits_fc_standard", "digits_conv_standard"])
def test_pgd_never_flips_an_explanation_on_the_digit_models(name: str) -> None:
    net = load_network(str(SAMPLE_MODELS / f"{name}.onnx")).with_dtype(torch.float64)
    digits = np.load(SAMPLE_MODELS / "gallery" / "digits.npz")["x"]
    for index in (0,):
        x = torch.from_numpy(digits[index].astype(np.float64))
        res = verified_explanation(net, x, 0.1, timeout_s=2, check_timeout_s=1)
        assert len(res.freed) > 0
        assert not _pgd_on_complement(net, x, res)
        _check_counterexamples(net, x.numpy(), res)
        # "sound, not proven irreducible" exactly where no witness was found
        assert all((v == UNPROVEN) == (i not in res.counterexamples) for i, v in res.kept.items())


def test_pgd_never_flips_an_explanation_on_mnist() -> None:
    path = shared_path("vnncomp2021", "mnistfc", "mnist-net_256x2.onnx")
    row = np.loadtxt(shared_path("eran", "mnist_test.csv"), delimiter=",", max_rows=1)
    net = load_network(str(path)).with_dtype(torch.float64)
    x = torch.from_numpy(row[1:] / 255.0).reshape(784, 1)
    res = verified_explanation(net, x, 0.05, timeout_s=3, check_timeout_s=1)
    assert res.target == int(row[0]) and len(res.freed) > 0
    assert not _pgd_on_complement(net, x, res)
    _check_counterexamples(net, x.numpy(), res)


def test_bad_parameters_are_refused() -> None:
    net = load_network(_small(0), input_shape=(5,))
    for kwargs in ({"eps": 0.0}, {"eps": float("nan")}, {"eps": 0.1, "input_range": (1, 0)}):
        with pytest.raises(InvalidInputError):
            verified_explanation(net, np.full(5, 0.5), **kwargs)


def test_job_returns_the_explanation_with_checked_counterexamples(tmp_path) -> None:
    from backend.analyses import verified_explanation as job
    from backend.analyses.base import JobContext

    net = load_network(str(SAMPLE_MODELS / "digits_fc_standard.onnx"))
    x = torch.from_numpy(np.load(SAMPLE_MODELS / "gallery" / "digits.npz")["x"][0])
    seen: list[float] = []
    ctx = JobContext(net=net, x=x, label=None, card={"input_range": [0.0, 1.0]},
                     artifacts=tmp_path, progress=lambda f, m: seen.append(f))
    out = job.run(ctx, job.Params(eps=0.1, timeout_s=2, check_timeout_s=1))
    assert seen and seen[-1] == 1.0
    expl = np.asarray(out["explanation"], bool).reshape(-1)
    assert out["size"] == expl.sum() == len(out["witnessed"]) + len(out["unproven"])
    assert sorted(out["freed"] + out["witnessed"] + out["unproven"]) == list(range(64))
    for item in out["counterexamples"]:
        point = torch.tensor(item["input"], dtype=torch.float64).reshape(1, 1, 8, 8)
        with torch.no_grad():
            cls = int(net.with_dtype(torch.float64)(point).argmax())
        assert cls == item["predicted"] != out["target"] and expl[item["feature"]]


def _wider(seed: int) -> nn.Sequential:
    """A 7-8-8-4 net with hidden hyperplanes through the cube's centre (two hidden layers:
    the MILP encodes stacked ReLUs, the z3 oracle the module itself)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 4)).double().eval()
    with torch.no_grad():
        centre = torch.full((7,), 0.5, dtype=torch.float64)
        model[0].bias.copy_(-model[0].weight @ centre)
        model[2].bias.copy_(-model[2].weight @ torch.relu(model[0](centre)))
        model[4].bias.zero_()
    return model


@pytest.mark.parametrize(("seed", "eps"), [(21, 0.07), (22, 0.05), (23, 0.12)])
def test_unseen_deeper_nets_sound_and_irreducible_by_z3(seed: int, eps: float) -> None:
    """Seeds, depth and eps not used while tuning the search: z3 proves the complement box
    of the explanation robust and finds another class once any kept feature is freed."""
    model = _wider(seed)
    net = load_network(model, input_shape=(7,))
    pts = torch.from_numpy(np.random.default_rng(seed).uniform(0.2, 0.8, (4000, 7)))
    with torch.no_grad():
        top = model(pts).sort(1).values
    x = pts[int(np.argsort((top[:, -1] - top[:, -2]).numpy())[400])].numpy()
    res = verified_explanation(net, x, eps, timeout_s=60, check_timeout_s=20)
    expl = res.explanation.reshape(-1)
    assert sorted(res.freed + list(res.kept)) == list(range(7))
    assert not _exists_other_class(model, *_box(res, x, expl), res.target)  # sound
    assert res.irreducible
    _check_counterexamples(model, x, res)
    for i in np.flatnonzero(expl):
        fixed = expl.copy()
        fixed[i] = False
        assert _exists_other_class(model, *_box(res, x, fixed), res.target)


def test_budget_leaves_untried_features_unproven_and_still_sound() -> None:
    """A budget too short to try every feature: every kept feature without a witness is
    "sound, not proven irreducible", and PGD on the complement still never flips."""
    path = shared_path("vnncomp2021", "mnistfc", "mnist-net_256x2.onnx")
    row = np.loadtxt(shared_path("eran", "mnist_test.csv"), delimiter=",", skiprows=7,
                     max_rows=1)
    net = load_network(str(path)).with_dtype(torch.float64)
    x = torch.from_numpy(row[1:] / 255.0).reshape(784, 1)
    res = verified_explanation(net, x, 0.04, timeout_s=1.5, check_timeout_s=0.5)
    assert res.target == int(row[0])
    assert res.checks["unchecked"] <= res.size
    _check_mnist_explanation(net, x, res)


def test_batched_attack_returns_points_of_another_class_inside_each_box() -> None:
    """The batched PGD behind witness search: every returned point lies in its own box and
    the torch module classifies it otherwise; boxes z3 proves robust return nothing."""
    model = _small(7)
    net = load_network(model, input_shape=(5,)).with_dtype(torch.float64)
    x = _near_boundary(model, 7)
    with torch.no_grad():
        target = int(model(torch.from_numpy(x)[None]).argmax())
    widths = np.array([0.002, 0.05, 0.2, 0.4])
    lo = np.clip(x[None] - widths[:, None], 0, 1)
    hi = np.clip(x[None] + widths[:, None], 0, 1)
    points = attack_batch(net, torch.from_numpy(lo), torch.from_numpy(hi), target)
    assert any(p is not None for p in points)
    for k, p in enumerate(points):
        if p is None:
            continue
        assert np.all(p.numpy() >= lo[k]) and np.all(p.numpy() <= hi[k])
        with torch.no_grad():
            assert int(model(p[None]).argmax()) != target
    robust = [k for k in range(len(widths)) if not _exists_other_class(model, lo[k], hi[k],
                                                                       target)]
    assert all(points[k] is None for k in robust)


@pytest.mark.slow
def test_mnist_kept_features_are_witnessed_by_sweeps() -> None:
    """mnist-net_256x2 at eps 0.05 with a generous budget: once the free set is tight, the
    sweeps from counterexamples witness kept features; every witness is checked by the torch
    forward pass, and PGD on the complement never flips the explanation."""
    path = shared_path("vnncomp2021", "mnistfc", "mnist-net_256x2.onnx")
    row = np.loadtxt(shared_path("eran", "mnist_test.csv"), delimiter=",", skiprows=1,
                     max_rows=1)
    net = load_network(str(path)).with_dtype(torch.float64)
    x = torch.from_numpy(row[1:] / 255.0).reshape(784, 1)
    res = verified_explanation(net, x, 0.05, timeout_s=90, check_timeout_s=4)
    assert res.target == int(row[0])
    assert sorted(res.freed + list(res.kept)) == list(range(784))
    assert len(res.counterexamples) > 0
    _check_mnist_explanation(net, x, res)
