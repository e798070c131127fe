"""Pattern-rule verdicts at any scale of the weights and logits, against independent oracles.

* Scaling the logits (or every pre-activation) by ``s > 0`` changes no pattern and no
  decision, so a rule with a counterexample at ``s = 1`` must never be proven at another ``s``.
* Solver infeasibility is not a proof when a known input satisfies the premise.
* Counterexamples are float64, exactly inside the domain, and re-checked here in float64.
* On small 2-D networks every verdict is compared with an exhaustive oracle: all activation
  regions enumerated layer by layer, each one an LP written here from the weights (scipy's
  ``linprog``), at several scales.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from app import load_network
from app.analyses.patterns import InputDomain, Rule, mine_rules, verify_rule
from app.analyses.patterns import milp as milp_module
from tests.conftest import SAMPLE_MODELS

torch.set_num_threads(1)


def _premise64(net, rule: Rule, x: torch.Tensor) -> bool:
    net64 = net.with_dtype(torch.float64)
    pre = net64.pre_activations(x.to(torch.float64).reshape(1, *net.input_shape))[rule.node]
    pre = pre.reshape(-1)
    return all(bool(pre[n] > 0) == on for n, on in rule.literals)


def _class64(net, x: torch.Tensor, lowest: bool = False) -> int:
    with torch.no_grad():
        y = net.with_dtype(torch.float64)(x.to(torch.float64).reshape(1, *net.input_shape))[0]
    return int(y.argmin() if lowest else y.argmax())


def _assert_real(net, rule: Rule, domain: InputDomain, verdict) -> None:
    """A counterexample: float64, inside the domain with no tolerance, premise, other class."""
    x = verdict.counterexample
    assert x.dtype == torch.float64 and tuple(x.shape) == net.input_shape
    assert bool(((x >= domain.lo) & (x <= domain.hi)).all())
    assert _premise64(net, rule, x)
    assert _class64(net, x, rule.lowest) == verdict.counterexample_class != rule.target


def _scale_logits(net, s: float):
    """A copy whose last linear layer (so every logit) is multiplied by ``s``."""
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled.layers[-1].weight.mul_(s)
        scaled.layers[-1].bias.mul_(s)
    return scaled


def _scale_everything(net, s: float):
    """A copy whose every pre-activation is multiplied by ``s``: the first layer scaled and
    every later bias too (ReLU is positively homogeneous)."""
    scaled = copy.deepcopy(net)
    linears = [layer for layer in scaled.layers if hasattr(layer, "weight")]
    with torch.no_grad():
        linears[0].weight.mul_(s)
        for layer in linears:
            layer.bias.mul_(s)
    return scaled


@pytest.fixture(scope="module")
def fc_pgd():
    net = load_network(str(SAMPLE_MODELS / "digits_fc_pgd.onnx"))
    xs = torch.from_numpy(np.load(SAMPLE_MODELS / "gallery" / "digits.npz")["x"]
                          .astype(np.float32))
    return net, xs


def test_scaled_logits_never_turn_a_counterexample_into_a_proof(fc_pgd) -> None:
    """The issue's case (eps = 0.1 balls at L2 of digits_fc_pgd), with bounds float32 cannot
    represent, so a float32 counterexample on the ball's faces would fall outside."""
    net, xs = fc_pgd
    mined = mine_rules(net, xs, layer=2)
    held = xs[mined.heldout]
    for rule in mined.rules[:6]:
        start = held[rule.fires(net, held)][0]
        domain = InputDomain.linf_ball(net, start, 0.1 + 1e-9, clip=(1e-9, 1 - 1e-9))
        base = verify_rule(net, rule, domain, timeout=20, known=start)
        if base.status == "counterexample":
            break
    else:
        pytest.fail("need a rule with a counterexample at scale 1")
    _assert_real(net, rule, domain, base)
    scaled = [_scale_logits(net, s) for s in (3e-7, 1e-7, 1e-9)]
    scaled.append(_scale_everything(net, 1e-12))  # hidden pre-activations too
    for other in scaled:
        verdict = verify_rule(other, rule, domain, timeout=20)
        assert verdict.status == "counterexample", verdict.message
        _assert_real(other, rule, domain, verdict)


def test_solver_infeasibility_with_a_known_premise_point_is_not_a_proof(fc_pgd, monkeypatch):
    """A solver that wrongly calls every MILP infeasible: where the verdict rests on it, the
    rule is unknown, since the covered input (or the ball's centre) satisfies the premise."""
    net, xs = fc_pgd
    mined = mine_rules(net, xs, layer=2)
    held = xs[mined.heldout]
    calls: list[bool] = []

    class Infeasible:
        status, x, fun, mip_dual_bound = 2, None, None, None

    def solve(self, objective, time_limit, maximize=True, relax=False):
        calls.append(relax)
        return Infeasible()

    monkeypatch.setattr(milp_module.Program, "solve", solve)
    rested = 0
    for rule in mined.rules[:6]:
        start = held[rule.fires(net, held)][0]
        assert _premise64(net, rule, start)
        domain = InputDomain.linf_ball(net, start, 0.1)
        for known in (start, None):  # the caller's input, or only the domain's centre
            calls.clear()
            verdict = verify_rule(net, rule, domain, timeout=5, method="milp", known=known)
            if False in calls:  # a MILP was asked
                rested += 1
                assert verdict.status == "unknown", verdict.message
                assert "known input" in verdict.message
    assert rested >= 2


# -- exhaustive oracle on 2-D networks ------------------------------------------------------


def _tiny(seed: int, widths: tuple[int, ...]):
    torch.manual_seed(seed)
    dims = (2, *widths)
    mods: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        mods += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*mods, nn.Linear(dims[-1], 3)).double()
    x = torch.rand(400, 2, dtype=torch.float64) * 2 - 1
    y = ((torch.atan2(x[:, 1], x[:, 0]) + np.pi) / (2 * np.pi / 3)).long().clamp(max=2)
    y = torch.where(x.norm(dim=1) < 0.4, 2 - y, y)  # a ring: more regions per class
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _regions(weights, biases, box):
    """Every activation region of the box: ``(patterns per ReLU layer, pairwise max gaps)``
    where ``gaps[j, t]`` is the largest ``y_j - y_t`` over the region (an LP). Regions are
    enumerated layer by layer, a pattern kept when its LP is feasible; constraints are
    closed, so shared faces belong to both sides."""
    found = []

    def lp(c, rows, rhs):
        return linprog(c, A_ub=np.vstack(rows), b_ub=np.concatenate(rhs), bounds=box,
                       method="highs")

    def walk(k, m, c, rows, rhs, pats):
        if k == len(weights) - 1:
            om, oc = weights[k] @ m, weights[k] @ c + biases[k]
            n = len(oc)
            gaps = np.full((n, n), -np.inf)
            for j, t in itertools.permutations(range(n), 2):
                res = lp(-(om[j] - om[t]), rows, rhs)
                if res.status == 0:
                    gaps[j, t] = -res.fun + oc[j] - oc[t]
            found.append((pats, gaps))
            return
        pm, pc = weights[k] @ m, weights[k] @ c + biases[k]
        for pat in itertools.product((0, 1), repeat=len(pc)):
            pat = np.array(pat)
            sign = np.where(pat == 1, -1.0, 1.0)
            new_rows, new_rhs = rows + [sign[:, None] * pm], rhs + [-sign * pc]
            if lp(np.zeros(2), new_rows, new_rhs).status != 0:
                continue
            walk(k + 1, pm * pat[:, None], pc * pat, new_rows, new_rhs, (*pats, pat))

    walk(0, np.eye(2), np.zeros(2), [np.zeros((1, 2))], [np.zeros(1)], ())
    return found


def _oracle_worst(regions, rule: Rule) -> float:
    """Largest score gap of a rival over the target on the regions the premise allows
    (``-inf`` when none does)."""
    worst = -np.inf
    for pats, gaps in regions:
        if any(pats[rule.layer - 1][n] != on for n, on in rule.literals):
            continue
        for j in range(gaps.shape[0]):
            if j != rule.target:
                worst = max(worst, gaps[rule.target, j] if rule.lowest else gaps[j, rule.target])
    return worst


def test_every_rule_verdict_on_2d_nets_matches_region_enumeration() -> None:
    """Mined and random rules at each of three ReLU layers, by one MILP and by input
    splitting, with the logits as trained and scaled by 1e-8 (the oracle's gaps scale
    exactly: ReLU is positively homogeneous)."""
    seed, widths = 7, (4, 3, 3)
    model = _tiny(seed, widths)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    regions = _regions([m.weight.detach().numpy() for m in linears],
                       [m.bias.detach().numpy() for m in linears], [(-1.0, 1.0)] * 2)
    grid = torch.cartesian_prod(*[torch.linspace(-1, 1, 41, dtype=torch.float64)] * 2)
    rng = np.random.default_rng(seed)
    compared = {"proven": 0, "counterexample": 0}
    for s in (1.0, 1e-8):
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            scaled[-1].weight.mul_(s)
            scaled[-1].bias.mul_(s)
        net = load_network(scaled, input_shape=(2,))
        domain = InputDomain.box(net, -1.0, 1.0)
        rules = []
        for layer in range(1, len(linears)):
            rules += mine_rules(net, grid, layer=layer, min_support=4, min_precision=0.9,
                                max_depth=4, seed=seed).rules[:3]
        # random premises and targets as well: not only the ones mining would pick
        for _ in range(5):
            layer = int(rng.integers(1, len(linears)))
            width = widths[layer - 1]
            neurons = rng.choice(width, size=int(rng.integers(1, width)), replace=False)
            literals = tuple((int(n), bool(rng.integers(2))) for n in neurons)
            rules.append(Rule(layer, net.relu_indices[layer - 1], literals,
                              int(rng.integers(3)), lowest=bool(rng.integers(2))))
        for rule in rules:
            worst = s * _oracle_worst(regions, rule)
            for method in ("milp", "split"):
                verdict = verify_rule(net, rule, domain, timeout=20, method=method)
                if verdict.status == "counterexample":
                    _assert_real(net, rule, domain, verdict)
                    assert worst > 0
                elif verdict.status == "proven":
                    assert worst <= 0, (s, method, str(rule), worst)
                if abs(worst) > 1e-6 * s and np.isfinite(worst):  # not a tie: must decide
                    assert verdict.status == ("counterexample" if worst > 0 else "proven"), (
                        s, method, str(rule), worst, verdict.message)
                    compared[verdict.status] += 1
    assert compared["proven"] >= 2 and compared["counterexample"] >= 2, compared
