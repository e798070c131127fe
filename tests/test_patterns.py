"""Pattern rules against independent oracles.

* Every counterexample is re-checked here by a forward pass (premise, domain, decision).
* Every proven rule survives 10^4 inputs sampled in ``{x in domain : premise holds}`` by a
  hit-and-run slice sampler whose only membership test is a forward pass.
* On tiny networks the verifier agrees with exhaustive enumeration of activation patterns,
  each pattern region solved as an LP written here directly from the weights.
* Mining statistics are recomputed from forward passes; the rule list against the network.
"""

from __future__ import annotations

import itertools
import re
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from sklearn.datasets import load_digits
from torch import nn

from app import load_network
from app.analyses.patterns import (
    InputDomain,
    Rule,
    distill,
    input_property,
    mine_rules,
    rules_firing,
    verify_rule,
    verify_rules,
)
from tests.conftest import shared_path

torch.set_num_threads(1)


# -- oracles ------------------------------------------------------------------------------


def _premise(net, rule: Rule, xs: torch.Tensor) -> torch.Tensor:
    """Forward-pass check of a rule's premise (not via Rule.fires)."""
    pat = net.activation_patterns(xs)[rule.node].reshape(xs.shape[0], -1)
    ok = torch.ones(xs.shape[0], dtype=torch.bool)
    for n, on in rule.literals:
        ok &= pat[:, n] == on
    return ok


def _decide(net, xs: torch.Tensor, lowest: bool = False) -> torch.Tensor:
    with torch.no_grad():
        y = net(xs).reshape(xs.shape[0], -1)
    return y.argmin(1) if lowest else y.argmax(1)


def _hit_and_run(member, starts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 n: int = 10_000, seed: int = 0) -> torch.Tensor:
    """``n`` points of ``{x in [lo, hi] : member(x)}`` by hit-and-run with slice shrinkage.

    Each chain picks a random direction, takes the chord through the box, and shrinks the
    chord towards its current point until a proposal passes ``member`` (Neal's shrinkage,
    valid for any set). Only forward passes decide membership.
    """
    gen = torch.Generator().manual_seed(seed)
    x = starts.clone().to(torch.float64)
    chains, dims = x.shape[0], x[0].numel()
    steps = -(-n // chains)
    lo_f, hi_f = lo.reshape(1, -1).to(torch.float64), hi.reshape(1, -1).to(torch.float64)
    out = []
    for _ in range(steps):
        flat = x.reshape(chains, dims)
        d = torch.randn((chains, dims), generator=gen, dtype=torch.float64)
        d /= d.norm(dim=1, keepdim=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            t1, t2 = (lo_f - flat) / d, (hi_f - flat) / d
        a = torch.nan_to_num(torch.minimum(t1, t2), nan=-np.inf).amax(1).clamp(max=0)
        b = torch.nan_to_num(torch.maximum(t1, t2), nan=np.inf).amin(1).clamp(min=0)
        moved = torch.zeros(chains, dtype=torch.bool)
        for _ in range(40):
            t = a + (b - a) * torch.rand(chains, generator=gen, dtype=torch.float64)
            prop = (flat + t[:, None] * d).clamp(lo_f, hi_f).reshape(x.shape)
            ok = member(prop) & ~moved
            x[ok] = prop[ok]
            moved |= ok
            a = torch.where(~moved & (t < 0), t, a)
            b = torch.where(~moved & (t >= 0), t, b)
            if bool(moved.all()):
                break
        out.append(x.clone())
    return torch.cat(out)[:n]


def _check_counterexample(net, rule: Rule, domain: InputDomain, verdict) -> None:
    """In float64, exactly inside the domain, satisfying the premise, with another class."""
    x = verdict.counterexample.reshape(1, *net.input_shape)
    assert x.dtype == torch.float64
    assert bool(((x >= domain.lo) & (x <= domain.hi)).all())
    net64 = net.with_dtype(torch.float64)
    assert bool(_premise(net64, rule, x)[0])
    assert int(_decide(net64, x, rule.lowest)[0]) != rule.target
    assert int(_decide(net64, x, rule.lowest)[0]) == verdict.counterexample_class


def _check_proven_by_sampling(net, rule: Rule, domain: InputDomain, starts: torch.Tensor) -> None:
    net64 = net.with_dtype(torch.float64)
    starts = starts[_premise(net64, rule, starts.to(torch.float64))]
    assert starts.shape[0] > 0, "need a start point satisfying the premise"
    chains = starts[torch.arange(100) % starts.shape[0]]
    pts = _hit_and_run(lambda z: _premise(net64, rule, z), chains, domain.lo, domain.hi)
    assert pts.shape[0] == 10_000
    assert bool(_premise(net64, rule, pts).all())
    assert bool((_decide(net64, pts, rule.lowest) == rule.target).all())


# -- models -------------------------------------------------------------------------------


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.tensor(d.target)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits_mlp():
    torch.manual_seed(0)
    x, y = _digits()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16),
                          nn.ReLU(), nn.Linear(16, 10))
    _train(model, x[:1200], y[:1200], 300)
    return load_network(model, input_shape=(1, 8, 8)), x


@pytest.fixture(scope="module")
def digits_conv():
    torch.manual_seed(1)
    x, y = _digits()
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(48, 12), nn.ReLU(), nn.Linear(12, 10))
    _train(model, x[:1200], y[:1200], 150)
    return load_network(model, input_shape=(1, 8, 8)), x


def _tiny(seed: int):
    """2-5-4-3 network fitted to three wedges of the square, so all classes occur."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(),
                          nn.Linear(4, 3)).double()
    x = torch.rand(300, 2, dtype=torch.float64) * 2 - 1
    y = ((torch.atan2(x[:, 1], x[:, 0]) + np.pi) / (2 * np.pi / 3)).long().clamp(max=2)
    return model, load_network(_train(model, x, y, 150), input_shape=(2,))


# -- tests --------------------------------------------------------------------------------


def _enumerate_violation(model: nn.Sequential, rule: Rule, lo: float, hi: float) -> bool:
    """Exhaustive oracle: does any activation pattern region consistent with the premise
    contain a point of the box where a rival beats the target? LPs written from the weights;
    layer-2 patterns are only enumerated under feasible layer-1 patterns."""
    w = [m.weight.detach().numpy() for m in model if isinstance(m, nn.Linear)]
    b = [m.bias.detach().numpy() for m in model if isinstance(m, nn.Linear)]
    premise = {0 if rule.node == 1 else 1: rule.literals}
    box = [(lo, hi)] * 2

    def region(k, pat, m, c, rows, rhs):
        pm, pc = w[k] @ m, w[k] @ c + b[k]
        sign = np.where(pat == 1, -1.0, 1.0)
        return pm * pat[:, None], pc * pat, rows + [sign[:, None] * pm], rhs + [-sign * pc]

    def feasible(rows, rhs) -> bool:
        res = linprog(np.zeros(2), A_ub=np.vstack(rows), b_ub=np.concatenate(rhs), bounds=box,
                      method="highs")
        return res.status == 0

    for p1 in itertools.product((0, 1), repeat=len(b[0])):
        p1 = np.array(p1)
        if any(p1[n] != on for n, on in premise.get(0, ())):
            continue
        m1, c1, rows1, rhs1 = region(0, p1, np.eye(2), np.zeros(2), [], [])
        if not feasible(rows1, rhs1):
            continue
        for p2 in itertools.product((0, 1), repeat=len(b[1])):
            p2 = np.array(p2)
            if any(p2[n] != on for n, on in premise.get(1, ())):
                continue
            m2, c2, rows, rhs = region(1, p2, m1, c1, rows1, rhs1)
            om, oc = w[2] @ m2, w[2] @ c2 + b[2]
            for j in {0, 1, 2} - {rule.target}:
                res = linprog(-(om[j] - om[rule.target]), A_ub=np.vstack(rows),
                              b_ub=np.concatenate(rhs), bounds=box, method="highs")
                if res.status == 0 and -res.fun + oc[j] - oc[rule.target] > 1e-7:
                    return True
    return False


def test_verifier_agrees_with_exhaustive_pattern_enumeration() -> None:
    rng = np.random.default_rng(0)
    outcomes = []
    for seed in range(2):
        model, net = _tiny(seed)
        probe = torch.rand(4000, 2, dtype=torch.float64) * 2 - 1
        for _ in range(6):
            node = int(rng.choice([1, 3]))
            width = 5 if node == 1 else 4
            neurons = rng.choice(width, size=int(rng.integers(1, 4)), replace=False)
            literals = tuple((int(n), bool(rng.integers(2))) for n in neurons)
            rule = Rule(1 if node == 1 else 2, node, literals, 0)
            hit = _premise(net, rule, probe)
            if not bool(hit.any()):
                continue
            classes = _decide(net, probe[hit])
            target = int(torch.mode(classes).values) if rng.random() < 0.7 else int(classes[0])
            rule = Rule(rule.layer, node, literals, target)
            domain = InputDomain.box(net, -1.0, 1.0)
            expected = _enumerate_violation(model, rule, -1.0, 1.0)
            for method in ("milp", "split"):  # one MILP, and input splitting + MILP leaves
                verdict = verify_rule(net, rule, domain, timeout=20, method=method)
                assert verdict.status != "unknown"
                assert (verdict.status == "counterexample") == expected, (method, str(rule))
                if expected:
                    _check_counterexample(net, rule, domain, verdict)
                outcomes.append(verdict.status)
            if not expected:
                _check_proven_by_sampling(net, rule, domain, probe[hit][:100])
    assert {"proven", "counterexample"} <= set(outcomes)


def test_mined_rules_are_readable_and_scored_on_heldout_inputs(digits_mlp) -> None:
    net, x = digits_mlp
    mined = mine_rules(net, x, layer=2, min_support=10, min_precision=0.95, seed=1)
    assert mined.rules and mined.layer == 2 and mined.node == net.relu_indices[1]
    pattern = re.compile(
        r"^if L2\.n\d+ (on|off)( and L2\.n\d+ (on|off))* then class \d "
        r"\(support \d+, precision \d+%\)$"
    )
    held = x[mined.heldout]
    labels = _decide(net, held)
    assert held.shape[0] == round(0.3 * x.shape[0])
    for rule in mined.rules:
        assert pattern.match(str(rule)), str(rule)
        fires = _premise(net, rule, held)
        hits = labels == rule.target
        assert rule.support == int(fires.sum())
        if rule.support:
            assert rule.precision == pytest.approx(float((fires & hits).sum() / fires.sum()))
        assert rule.recall == pytest.approx(float((fires & hits).sum() / hits.sum()))
    assert max(r.precision for r in mined.rules) >= 0.95
    # one target: every rule concludes it
    sevens = mine_rules(net, x, layer=-1, target=7, min_support=10)
    assert sevens.rules and all(r.target == 7 for r in sevens.rules)


def _verify_on_balls_and_check(net, rules, held, eps: float) -> list[str]:
    """Verify each rule on the eps-ball around its first covered held-out input; every
    counterexample and every proof is checked by the oracles. Returns the statuses."""
    statuses = []
    for rule in rules:
        start = held[_premise(net, rule, held)][:1]
        domain = InputDomain.linf_ball(net, start[0], eps)
        verdict = verify_rule(net, rule, domain, timeout=30)
        statuses.append(verdict.status)
        if verdict.status == "counterexample":
            _check_counterexample(net, rule, domain, verdict)
        elif verdict.status == "proven":
            _check_proven_by_sampling(net, rule, domain, start)
    return statuses


def test_digits_rules_verified_on_balls_and_checked_by_oracles(digits_mlp) -> None:
    net, x = digits_mlp
    mined = mine_rules(net, x, layer=2, min_support=10, seed=1)
    statuses = _verify_on_balls_and_check(net, mined.rules[:4], x[mined.heldout], 0.04)
    assert "proven" in statuses
    # the whole pixel box: any verdict, but a counterexample must be real
    box = InputDomain.box(net, 0.0, 1.0)
    verdicts = verify_rules(net, mined.rules[:1], box, timeout=4)
    for rule, verdict in zip(mined.rules[:1], verdicts, strict=True):
        if verdict.status == "counterexample":
            _check_counterexample(net, rule, box, verdict)


def test_maxpool_network_verdicts_survive_oracles(digits_conv) -> None:
    net, x = digits_conv
    mined = mine_rules(net, x, layer=2, min_support=10, seed=0)
    seen = _verify_on_balls_and_check(net, mined.rules[:3], x[mined.heldout], 0.05)
    assert set(seen) & {"proven", "counterexample"}


@pytest.mark.parametrize("fixture", ["digits_mlp", "digits_conv"])
def test_input_polytope_matches_forward_patterns(fixture, request) -> None:
    net, x = request.getfixturevalue(fixture)
    net64 = net.with_dtype(torch.float64)
    # a little noise: blank image regions tie max-pool windows, putting x on a boundary
    gen = torch.Generator().manual_seed(0)
    x0 = (x[1300].to(torch.float64)
          + 0.01 * torch.rand(x[0].shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    domain = InputDomain.linf_ball(net, x0, 0.1)
    poly = input_property(net, x0, domain, layer=-1)
    node = poly.node

    def same(z: torch.Tensor) -> torch.Tensor:
        ref = net64.activation_patterns(x0.unsqueeze(0))
        got = net64.activation_patterns(z)
        ok = torch.ones(z.shape[0], dtype=torch.bool)
        for i in net64.relu_indices:
            if i <= node:
                ok &= (got[i] == ref[i]).reshape(z.shape[0], -1).all(1)
        for i in net64.maxpool_indices:  # same winners too
            if i <= node:
                outs_z, outs_0 = net64.trace(z), net64.trace(x0.unsqueeze(0))
                wz = net64.layers[i].windows(net64.node_inputs(outs_z, z, i)[0]).argmax(-1)
                w0 = net64.layers[i].windows(net64.node_inputs(outs_0, x0[None], i)[0]).argmax(-1)
                ok &= (wz == w0).reshape(z.shape[0], -1).all(1)
        return ok

    assert poly.num_constraints > 0 and 0 < poly.num_facets <= poly.num_constraints
    # membership: the H-representation agrees with forward passes near the input
    scale = torch.logspace(-3, -0.5, 2000, dtype=torch.float64).reshape(-1, 1, 1, 1)
    z = x0 + scale * (torch.rand((2000, *net.input_shape), generator=gen,
                                 dtype=torch.float64) * 2 - 1)
    assert torch.equal(poly.contains(z), same(z))
    # radius around the input: inside at 0.999 r, and the nearest facet is crossed at 1.01 r
    d = torch.randn((500, 64), generator=gen, dtype=torch.float64)
    l2 = x0 + 0.999 * poly.radius_l2 * (d / d.norm(dim=1, keepdim=True)).reshape(-1, 1, 8, 8)
    linf = x0 + 0.999 * poly.radius_linf * d.sign().reshape(-1, 1, 8, 8)
    assert bool(same(l2).all()) and bool(same(linf).all())
    slack = poly.b - poly.a @ x0.reshape(-1).numpy()
    k = int(np.argmin(slack / np.linalg.norm(poly.a, axis=1)))
    normal = torch.from_numpy(poly.a[k] / np.linalg.norm(poly.a[k])).reshape(1, 1, 8, 8)
    assert not bool(same(x0 + 1.01 * poly.radius_l2 * normal)[0])
    # Chebyshev balls lie inside polytope ∩ domain
    (r2, c2), (ri, ci) = poly.chebyshev_l2, poly.chebyshev_linf
    assert r2 > 0 and ri > 0
    pts = torch.cat([
        torch.from_numpy(c2).reshape(1, 1, 8, 8)
        + 0.999 * r2 * (d / d.norm(dim=1, keepdim=True)).reshape(-1, 1, 8, 8),
        torch.from_numpy(ci).reshape(1, 1, 8, 8) + 0.999 * ri * d.sign().reshape(-1, 1, 8, 8),
    ])
    assert bool(same(pts).all()) and bool(domain.contains(pts).all())
    # output property on the whole polytope ∩ domain
    target = int(_decide(net64, x0[None])[0])
    assert poly.target == target
    if poly.verdict.status == "counterexample":
        ce = poly.verdict.counterexample.to(torch.float64)[None]
        assert bool(same(ce)[0]) and int(_decide(net64, ce)[0]) != target
    else:
        assert poly.verdict.status == "proven"
        pts = _hit_and_run(same, x0[None].repeat(100, 1, 1, 1), domain.lo, domain.hi)
        assert bool(same(pts).all()) and bool((_decide(net64, pts) == target).all())


def test_distilled_rule_list_fidelity_and_firing_rules(digits_mlp) -> None:
    net, x = digits_mlp
    rule_list = distill(net, x, layer=-1, max_depth=10)
    held = x[rule_list.heldout]
    preds = rule_list.predict(net, held)
    assert rule_list.fidelity == pytest.approx(float((preds == _decide(net, held).numpy()).mean()))
    # on/off alone at a 16-unit layer loses the magnitudes; still far above the majority class
    majority = float(np.bincount(_decide(net, held).numpy()).max() / len(held))
    assert rule_list.fidelity > 3 * majority
    # each held-out input: the prediction is the class of the first rule whose premise holds
    for i in range(20):
        first = next(r for r in rule_list.rules if bool(_premise(net, r, held[i:i + 1])[0]))
        assert preds[i] == first.target
        fired = rules_firing(net, rule_list.rules, held[i])
        assert fired and all(bool(_premise(net, r, held[i:i + 1])[0]) for r in fired)


def test_acasxu_clear_of_conflict_rules(capsys) -> None:
    path = shared_path("vnncomp2021", "acasxu", "ACASXU_run2a_1_1_batch_2000.onnx")
    net = load_network(str(path))
    lo = torch.tensor([-0.328422877, -0.5, -0.5, -0.5, -0.5]).reshape(1, 1, 5)
    hi = torch.tensor([0.679857769, 0.5, 0.5, 0.5, 0.5]).reshape(1, 1, 5)
    gen = torch.Generator().manual_seed(0)
    x = lo + (hi - lo) * torch.rand((5000, 1, 1, 5), generator=gen)
    t0 = time.perf_counter()
    mined = mine_rules(net, x, layer=2, target=0, lowest=True, min_support=20, max_depth=10)
    mine_s = time.perf_counter() - t0
    assert mined.rules and all(r.target == 0 and r.lowest for r in mined.rules)
    assert "then class 0 (lowest score)" in str(mined.rules[0])
    full = InputDomain.box(net, lo, hi)
    held = x[mined.heldout]
    times, proven = [], 0
    for rule in mined.rules[:3]:
        # the whole normalized box, by input splitting: a definite verdict in bounded time
        verdict = verify_rule(net, rule, full, timeout=15)
        assert verdict.status != "unknown", verdict.message
        if verdict.status == "counterexample":
            _check_counterexample(net, rule, full, verdict)
        else:
            _check_proven_by_sampling(net, rule, full, held)
        # the box around a covered input
        start = held[_premise(net, rule, held)][:1]
        local = InputDomain.box(net, torch.max(start[0] - 0.05, lo), torch.min(start[0] + 0.05, hi))
        local_verdict = verify_rule(net, rule, local, timeout=15)
        times.append((verdict.status, round(verdict.seconds, 2), local_verdict.status,
                      round(local_verdict.seconds, 2)))
        if local_verdict.status == "proven":
            proven += 1
            _check_proven_by_sampling(net, rule, local, start)
        elif local_verdict.status == "counterexample":
            _check_counterexample(net, rule, local, local_verdict)
    with capsys.disabled():
        print(f"\nACAS Xu 1_1 clear-of-conflict: mined {len(mined.rules)} rules in {mine_s:.2f}s; "
              f"(full box status, s, local box status, s): {times}")
    assert proven >= 1
