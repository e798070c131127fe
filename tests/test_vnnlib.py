"""The VNN-LIB reader against z3 (which reads the same SMT-LIB text itself) and the shared
VNN-COMP 2021 files; the property verifier against onnxruntime and the competition results."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import z3

from app import load_network
from app.errors import InvalidInputError
from app.properties import milp
from app.properties.verify import check_counterexample, verify
from app.properties.vnnlib import Case, VnnProperty, read_vnnlib
from tests.conftest import shared_path
from tests.test_bounds import _known_outcomes, _milp_range, _tiny_mlp, _vnnlib


def _meets(prop: VnnProperty, x: np.ndarray, y: np.ndarray) -> bool:
    return any(((c.lo <= x) & (x <= c.hi)).all() and (c.rows @ y <= c.rhs).all()
               for c in prop.cases)


def _z3_meets(text: str, x: np.ndarray, y: np.ndarray) -> bool:
    solver = z3.Solver()
    solver.add(z3.parse_smt2_string(text))
    for name, values in (("X", x), ("Y", y)):
        for i, v in enumerate(values):
            solver.add(z3.Real(f"{name}_{i}") == z3.RealVal(repr(float(v))))
    return solver.check() == z3.sat


def _points_near(prop: VnnProperty, gen: np.random.Generator, n: int) -> list:
    """Points inside, on the edge of and just outside the cases' boxes, with outputs near
    the rows' thresholds (where a wrong sign or a swapped side would show)."""
    pts = []
    for k in range(n):
        case = prop.cases[k % len(prop.cases)]
        x = gen.uniform(case.lo, case.hi)
        if k % 3 == 1:
            i = gen.integers(len(x))
            x[i] = case.hi[i] + (1e-3 if k % 2 else -1e-3) * (case.hi[i] - case.lo[i] + 1)
        y = gen.normal(size=prop.n_outputs)
        if case.rows.shape[0] and k % 2:
            # put one row exactly at its threshold direction's edge
            r = case.rows[0]
            y = y + r * (case.rhs[0] - r @ y + gen.normal() * 0.1) / (r @ r)
        pts.append((x, y))
    return pts


@pytest.mark.parametrize("name", ["acasxu:prop_1", "acasxu:prop_2", "acasxu:prop_5",
                                  "acasxu:prop_6", "acasxu:prop_7", "acasxu:prop_8",
                                  "acasxu:prop_10", "mnistfc:prop_3_0.05"])
def test_reader_agrees_with_z3_on_shared_files(name: str) -> None:
    folder, stem = name.split(":")
    path = shared_path("vnncomp2021", folder, f"{stem}.vnnlib")
    text = path.read_text()
    prop = read_vnnlib(path)
    gen = np.random.default_rng(0)
    pts = _points_near(prop, gen, 24 if folder == "acasxu" else 6)
    answers = [(_meets(prop, x, y), _z3_meets(text, x, y)) for x, y in pts]
    assert all(a == b for a, b in answers), answers
    assert any(a for a, _ in answers) and not all(a for a, _ in answers)


def test_reader_reads_every_mnistfc_file_like_the_regex_reader() -> None:
    folder = shared_path("vnncomp2021", "mnistfc")
    files = sorted(folder.glob("*.vnnlib"))
    assert len(files) == 30
    for path in files:
        prop = read_vnnlib(path)
        lo, hi, label = _vnnlib(path)
        assert (prop.n_inputs, prop.n_outputs, len(prop.cases)) == (784, 10, 9)
        others = set()
        for case in prop.cases:
            np.testing.assert_array_equal(case.lo, lo)
            np.testing.assert_array_equal(case.hi, hi)
            (row,) = case.rows
            assert row[label] == 1 and row.sum() == 0 and case.rhs[0] == 0
            others.add(int(np.flatnonzero(row == -1)[0]))
        assert others == set(range(10)) - {label}


def test_reader_handles_linear_terms_and_refuses_what_it_cannot_read() -> None:
    text = """; comment
    (declare-const X_0 Real) (declare-const X_1 Real)
    (declare-const Y_0 Real) (declare-const Y_1 Real)
    (assert (>= X_0 -1)) (assert (<= X_0 (- 1)))  ; X_0 in [-1, -1]... no: (- 1) is -1
    (assert (and (>= X_1 0.5) (<= X_1 2.5)))
    (assert (or (<= (+ Y_0 (* 2 Y_1)) 3) (and (> Y_1 (- Y_0 1)) (= Y_0 4))))
    """
    prop = read_vnnlib(text)
    assert len(prop.cases) == 2
    gen = np.random.default_rng(1)
    for _ in range(40):
        x = np.array([-1.0, gen.uniform(0, 3)])
        y = gen.integers(-3, 6, size=2).astype(float)
        assert _meets(prop, x, y) == _z3_meets(text, x, y)
    bad = [
        "(declare-const X_0 Real) (declare-const Y_0 Real) (assert (<= X_0 1))",  # unbounded below
        "(declare-const X_0 Real) (declare-const Y_0 Real) (assert (<= (* X_0 Y_0) 1))",
        "(declare-const X_0 Real) (declare-const Y_0 Real) (assert (<= X_0 Y_0))",
        "(declare-const X_0 Real) (declare-const Y_0 Real) (assert (<= X_0 1)",
        "(declare-const X_0 Real) (declare-const Y_0 Real) (assert (<= (+ X_0 X_0 X_1) 1))",
        "(declare-const Z Real)",
    ]
    for text in bad:
        with pytest.raises(InvalidInputError):
            read_vnnlib(text)


_SESSIONS: dict[str, ort.InferenceSession] = {}


def _onnx_output(path, x: np.ndarray) -> np.ndarray:
    """The model file's output by onnxruntime (batch size 1, as the ACAS Xu files fix it)."""
    sess = _SESSIONS.get(str(path))
    if sess is None:
        sess = _SESSIONS[str(path)] = ort.InferenceSession(str(path),
                                                           providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    return sess.run(None, {inp.name: x.astype(np.float32).reshape(shape)})[0].reshape(-1)


@pytest.mark.parametrize("onnx_name,prop_name,truth", [
    ("ACASXU_run2a_1_3_batch_2000.onnx", "prop_2.vnnlib", "violated"),
    ("ACASXU_run2a_1_3_batch_2000.onnx", "prop_1.vnnlib", "holds"),
    ("ACASXU_run2a_1_2_batch_2000.onnx", "prop_4.vnnlib", "holds"),
    # beyond input splitting with one branching rule alone (unknown at 60 s): 4 cases each
    ("ACASXU_run2a_3_3_batch_2000.onnx", "prop_9.vnnlib", "holds"),
    ("ACASXU_run2a_1_1_batch_2000.onnx", "prop_5.vnnlib", "holds"),
])
def test_branch_and_bound_on_acasxu(onnx_name: str, prop_name: str, truth: str) -> None:
    folder = shared_path("vnncomp2021", "acasxu")
    outcomes = _known_outcomes(shared_path("vnncomp2021", "results_csv"))
    assert outcomes.get((onnx_name, prop_name), truth) == truth
    net = load_network(str(folder / onnx_name))
    prop = read_vnnlib(folder / prop_name)
    verdict = verify(net, prop, "bab", time_limit=60)
    if truth == "violated":
        assert verdict.status == "counterexample"
        y = _onnx_output(folder / onnx_name, verdict.counterexample)  # independent forward pass
        assert _meets(prop, verdict.counterexample.reshape(-1).astype(np.float64), y)
        return
    assert verdict.status == "proven", verdict.message
    # dense sampling of the boxes with onnxruntime finds no point that meets a case
    gen = np.random.default_rng(0)
    for case in prop.cases:
        xs = gen.uniform(case.lo, case.hi, size=(1000, prop.n_inputs))
        y = np.stack([_onnx_output(folder / onnx_name, x) for x in xs])
        assert not ((y @ case.rows.T <= case.rhs).all(1)).any()


def test_mnistfc_verdicts_follow_the_competition_and_onnxruntime() -> None:
    folder = shared_path("vnncomp2021", "mnistfc")
    outcomes = _known_outcomes(shared_path("vnncomp2021", "results_csv"))
    net = load_network(str(folder / "mnist-net_256x2.onnx"))
    seen = set()
    for prop_name in ("prop_1_0.05.vnnlib", "prop_10_0.03.vnnlib", "prop_12_0.05.vnnlib"):
        truth = outcomes[("mnist-net_256x2.onnx", prop_name)]
        prop = read_vnnlib(folder / prop_name)
        verdict = verify(net, prop, "crown", time_limit=30)
        assert not (verdict.status == "proven" and truth == "violated")
        assert not (verdict.status == "counterexample" and truth == "holds")
        if verdict.status == "counterexample":
            x = verdict.counterexample.reshape(-1).astype(np.float64)
            y = _onnx_output(folder / "mnist-net_256x2.onnx", x)
            assert _meets(prop, x, y)
            assert check_counterexample(net, prop.cases[verdict.case], torch.tensor(x))
        seen.add(verdict.status)
    assert seen == {"proven", "counterexample"}


def test_verify_refuses_a_property_of_the_wrong_size() -> None:
    net = load_network(str(shared_path("vnncomp2021", "acasxu", "ACASXU_run2a_1_1_batch_2000.onnx")))
    prop = read_vnnlib(shared_path("vnncomp2021", "mnistfc", "prop_0_0.03.vnnlib"))
    with pytest.raises(InvalidInputError):
        verify(net, prop)


@pytest.mark.parametrize("seed", [0, 2])
def test_milp_matches_an_independent_milp_and_its_points_are_counterexamples(seed: int) -> None:
    """The case MILP's minimum of each output equals the test's own big-M MILP (written
    separately, interval big-M); thresholds just above it are met by a checked point,
    thresholds just below are refuted."""
    model, layers = _tiny_mlp(seed, residual=False)
    net = load_network(model, input_shape=(3,))
    assert milp.supports(net)
    x = np.array([0.2, 0.5, 0.7])
    lo, hi = x - 0.15, x + 0.15
    exact_lo, _ = _milp_range(layers, lo, hi, residual=False)
    for j in range(3):
        row = np.eye(3)[j:j + 1]
        _, bound, _ = milp.refute(net, Case(lo, hi, row, np.zeros(1)), 30)
        assert abs(bound - exact_lo[j]) <= 1e-6 * (1 + abs(exact_lo[j]))
        gap = 1e-2 * (1 + abs(exact_lo[j]))
        refuted, _, _ = milp.refute(net, Case(lo, hi, row, np.array([exact_lo[j] - gap])), 30)
        assert refuted
        below = Case(lo, hi, row, np.array([exact_lo[j] + gap]))
        refuted, _, point = milp.refute(net, below, 30)
        assert not refuted and check_counterexample(net, below, torch.as_tensor(point))


def test_verify_property_job_answers_from_the_vnnlib_text() -> None:
    """The service's ``verify_property`` runner on a shared ACAS Xu instance of each kind;
    the counterexample it returns is re-checked by onnxruntime."""
    from types import SimpleNamespace

    from backend.analyses.proof_features import PropertyParams, run_property

    folder = shared_path("vnncomp2021", "acasxu")
    onnx_path = folder / "ACASXU_run2a_1_3_batch_2000.onnx"
    ctx = SimpleNamespace(net=load_network(str(onnx_path)), progress=lambda frac, msg: None)
    seen = {}
    for prop_name in ("prop_1.vnnlib", "prop_2.vnnlib"):
        text = (folder / prop_name).read_text()
        out = run_property(ctx, PropertyParams(vnnlib=text, method="bab", time_limit=60))
        seen[prop_name] = out["status"]
        if out["status"] == "counterexample":
            x = np.array(out["counterexample"], dtype=np.float64).reshape(-1)
            assert _meets(read_vnnlib(text), x, _onnx_output(onnx_path, x))
    assert seen == {"prop_1.vnnlib": "proven", "prop_2.vnnlib": "counterexample"}
    with pytest.raises(InvalidInputError):
        run_property(ctx, PropertyParams(vnnlib="(assert (<= X_0 1)", method="crown"))


@pytest.mark.parametrize("shift,truth", [(0.5, "holds"), (-0.1, "violated")])
def test_input_splitting_refutes_by_a_mean_of_rows_only_where_that_is_true(
        shift: float, truth: str) -> None:
    """``y = (x0, -x0)`` on ``[-1, 1]^2`` (through ReLUs), one case: ``y0 + shift <= 0`` and
    ``y1 + shift <= 0``. With ``shift = 0.5`` neither row is positive on the
    whole box, but their mean (0.5) is: refuted without a split. With ``-0.1`` the point
    ``x0 = 0`` meets both rows, so the mean must not refute it (oracle: that point, by hand)."""
    w1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[0].bias.fill_(2.0)  # both units on everywhere on the box: y is linear
        model[2].weight.copy_(torch.eye(2))
        model[2].bias.fill_(-2.0)
    net = load_network(model.eval(), input_shape=(2,))
    case = Case(np.full(2, -1.0), np.ones(2), np.eye(2), np.full(2, -shift))
    verdict = verify(net, VnnProperty(2, 2, [case]), "bab", time_limit=10)
    if truth == "holds":
        assert verdict.status == "proven", verdict.message
        assert verdict.boxes == 1  # the mean of the two rows refutes the whole box
    else:
        assert verdict.status == "counterexample", verdict.message
        assert check_counterexample(net, case, torch.zeros(2))
