"""Every analysis job through the real HTTP server, each result checked against an oracle
computed here from the sample model's ONNX file: onnxruntime (logits, every ReLU, the first
layer's pre-activations) and plain numpy over the file's own weights (gradients, gradient
attacks, Riemann-sum IG); Captum's IG for the conv model. One server serves the module; every job is submitted up front so
the worker runs them while the first results are checked.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from app import load_network
from app.analyses.linear_regions import captum_integrated_gradients
from tests.conftest import SAMPLE_MODELS
from tests.service import Server, module_server

FC, CONV = "digits_fc_ibp", "digits_conv_ibp"
X0, X1 = "gallery:digits:0", "gallery:digits:1"
ATOL = 1e-4  # float32 onnxruntime against the engine's results

PROPERTY_EPS = 0.02


def _ball_property(model: str, index: int, eps: float) -> tuple[str, int]:
    """VNN-LIB text of "the gallery input's class holds on its clipped eps-ball", written
    here from the gallery file and onnxruntime's decision: ``(text, class)``."""
    with np.load(SAMPLE_MODELS / "gallery" / "digits.npz") as gallery:
        x = gallery["x"][index].reshape(-1).astype(np.float64)
    session = ort.InferenceSession(str(SAMPLE_MODELS / f"{model}.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name:
                                x.astype(np.float32).reshape(1, 1, 8, 8)})[0][0]
    target = int(np.argmax(logits))
    lines = [f"(declare-const X_{i} Real)" for i in range(x.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(logits.size)]
    for i, v in enumerate(x):
        lines += [f"(assert (>= X_{i} {float(max(0.0, v - eps))!r}))",
                  f"(assert (<= X_{i} {float(min(1.0, v + eps))!r}))"]
    rivals = " ".join(f"(and (>= Y_{j} Y_{target}))" for j in range(logits.size) if j != target)
    lines.append(f"(assert (or {rivals}))")  # a violation: some rival reaches the class
    return "\n".join(lines), target


# key -> (model, analysis, input id, params): cheap settings, one job each
JOBS: dict[str, tuple[str, str, str | None, dict]] = {
    "predict": (FC, "predict", X0, {}),
    "predict_conv": (CONV, "predict", X0, {}),
    "line": (FC, "linear_regions_line", X0,
             {"mode": "input", "other_input_id": X1, "random_directions": 0}),
    "plane": (FC, "linear_regions_plane", X0, {"first": "fgsm", "second": "random",
                                               "length": 0.1}),
    "ig": (FC, "linear_regions_ig", X0, {}),
    "ig_conv": (CONV, "linear_regions_ig", X1, {}),
    "saliency": (FC, "saliency", X0, {"top_k": 5, "threshold": 0.6, "timeout_s": 20}),
    "saliency_conv": (CONV, "saliency", X1, {"top_k": 4, "threshold": 0.5, "timeout_s": 20}),
    "saliency_superpixel": (FC, "saliency", X1, {"top_k": 5, "threshold": 0.6,
                                                 "granularity": "superpixel", "timeout_s": 20}),
    "verified_explanation": (FC, "verified_explanation", X0, {"eps": 0.05, "timeout_s": 20}),
    "proof_features": (FC, "proof_features", X0, {"eps": 0.03, "method": "crown"}),
    "proof_eps": (FC, "proof_eps", X0, {"eps_max": 0.2, "tol": 0.01}),
    "proof_compare": (FC, "proof_compare", None, {"eps": 0.03, "n_inputs": 6}),
    "verify_property": (FC, "verify_property", None, {
        "vnnlib": _ball_property(FC, 0, PROPERTY_EPS)[0] if (SAMPLE_MODELS / "gallery"
                                                          / "digits.npz").exists() else "x",
        "method": "bab", "time_limit": 30}),
    "patterns": (FC, "patterns", X0, {"n_inputs": 200, "verify": 3, "timeout": 10,
                                      "thumbnails": 2}),
    "patterns_verify": (FC, "patterns_verify", None, {"layer": 1, "on": [0], "target": 0,
                                                      "timeout": 5}),
    "patterns_coverage": (FC, "patterns_coverage", None, {"n_inputs": 200, "coverage": 10}),
    "extraction": (FC, "extraction", None, {"budget": 20_000, "max_hidden_layers": 1}),
}


# -- oracles from the ONNX file ----------------------------------------------------------------

class OnnxOracle:
    """The sample model's ONNX file run by onnxruntime with every Relu's output and the first
    Relu's input as extra outputs; for the fully connected model also its Gemm weights."""

    def __init__(self, path: Path) -> None:
        model = onnx.load(path)
        nodes = model.graph.node
        self.relus = [n.output[0] for n in nodes if n.op_type == "Relu"]
        self.first_pre = next(n.input[0] for n in nodes if n.op_type == "Relu")
        model.graph.output.extend(onnx.ValueInfoProto(name=r)
                                  for r in [*self.relus, self.first_pre])
        self.session = ort.InferenceSession(model.SerializeToString(),
                                            providers=["CPUExecutionProvider"])
        inits = {i.name: numpy_helper.to_array(i).astype(np.float64)
                 for i in model.graph.initializer}
        self.layers = []
        for node in nodes:
            if node.op_type == "Gemm":
                w = inits[node.input[1]]
                trans = any(a.name == "transB" and a.i == 1 for a in node.attribute)
                self.layers.append((w if trans else w.T, inits[node.input[2]]))
        self.fully_connected = all(n.op_type in ("Flatten", "Gemm", "Relu") for n in nodes)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """``(logits [N, C], relu outputs [[N, n_k]], first pre-activations [N, n])``."""
        x = np.asarray(x, np.float32).reshape(-1, 1, 8, 8)
        outs = self.session.run(None, {self.session.get_inputs()[0].name: x})
        flat = [o.reshape(len(x), -1).astype(np.float64) for o in outs]
        return flat[0], flat[1:-1], flat[-1]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]

    def gradient(self, x: np.ndarray, coeff: np.ndarray) -> np.ndarray:
        """``d (logits @ coeff) / dx`` per row of ``x`` ``[N, 64]`` (numpy, float64)."""
        assert self.fully_connected
        masks, h = [], x.reshape(len(x), -1)
        for w, b in self.layers[:-1]:
            h = h @ w.T + b
            masks.append(h > 0)
            h = np.maximum(h, 0)
        v = np.broadcast_to(coeff, (len(h), len(self.layers[-1][1]))) @ self.layers[-1][0]
        for (w, _), mask in zip(self.layers[-2::-1], masks[::-1], strict=True):
            v = (v * mask) @ w
        return v


def _margins(logits: np.ndarray, target: int) -> np.ndarray:
    """``logit_target - logit_j`` per row and class (``inf`` at the target)."""
    m = logits[:, [target]] - logits
    m[:, target] = np.inf
    return m


def attack_points(oracle: OnnxOracle, x: np.ndarray, target: int, eps: float,
                  seed: int = 0) -> np.ndarray:
    """Points of the clipped L-inf ball around ``x`` chosen to break ``target``: numpy-gradient
    PGD on the margin from the centre and random starts (every iterate kept), random corners
    and uniform samples, all to be evaluated by onnxruntime."""
    rng = np.random.default_rng(seed)
    x = x.reshape(-1)
    lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    starts = np.vstack([x, rng.uniform(lo, hi, (5, x.size))])
    points = [starts, rng.choice([0, 1], (1000, x.size)) * (hi - lo) + lo,
              rng.uniform(lo, hi, (1000, x.size))]
    cur = starts
    for _ in range(40):
        margins = _margins(oracle.logits(cur), target)
        coeff = -np.eye(margins.shape[1])[margins.argmin(1)]
        coeff[:, target] += 1
        cur = np.clip(cur - eps / 8 * np.sign(oracle.gradient(cur, coeff)), lo, hi)
        points.append(cur)
    return np.vstack(points)


@pytest.fixture(scope="module")
def oracles() -> dict[str, OnnxOracle]:
    return {name: OnnxOracle(SAMPLE_MODELS / f"{name}.onnx") for name in (FC, CONV)}


# -- the server and its jobs -------------------------------------------------------------------

server = module_server("analyses")


@pytest.fixture(scope="module")
def models(server: Server) -> dict[str, str]:
    return {m["name"]: m["id"] for m in server.client.get("/api/models").json()}


@pytest.fixture(scope="module")
def jobs(server: Server, models: dict[str, str]) -> dict[str, str]:
    """Every job of ``JOBS`` submitted at once: key -> job id."""
    ids = {}
    for key, (model, analysis, input_id, params) in JOBS.items():
        r = server.client.post("/api/jobs", json={"analysis": analysis,
                                                  "model_id": models[model],
                                                  "input_id": input_id, "params": params})
        assert r.status_code == 201, r.text
        ids[key] = r.json()["id"]
    return ids


def _result(server: Server, jobs: dict[str, str], key: str) -> dict:
    job = server.wait_job(jobs[key], timeout=240)
    assert job["status"] == "finished", job
    r = server.client.get(f"/api/jobs/{job['id']}/result")
    assert r.status_code == 200, r.text
    return r.json()


def _input(server: Server, models: dict[str, str], input_id: str, model: str = FC) -> np.ndarray:
    r = server.client.get(f"/api/models/{models[model]}/inputs/{input_id}")
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["values"], np.float64)


# -- coverage, parameters and progress ---------------------------------------------------------

def test_every_registered_analysis_has_a_job_here(server: Server) -> None:
    listed = {a["name"] for a in server.client.get("/api/analyses").json()}
    real = {name for name in listed if not name.startswith("test_")}
    covered = {analysis for _, analysis, _, _ in JOBS.values()}
    assert real == covered, f"analyses without a service test: {sorted(real - covered)}"


def _out_of_range(schema: dict) -> list:
    """Values the JSON schema of one parameter forbids: past each bound, outside each enum."""
    options = schema.get("anyOf", [schema])
    numeric = [o for o in options if o.get("type") in ("integer", "number")]
    bad: list = []
    for o in numeric:
        step = 1 if o["type"] == "integer" else 1e-3
        if "minimum" in o:
            bad.append(o["minimum"] - step)
        if "exclusiveMinimum" in o:
            bad.append(o["exclusiveMinimum"])
        if "maximum" in o:
            bad.append(o["maximum"] + step)
        if "exclusiveMaximum" in o:
            bad.append(o["exclusiveMaximum"])
    words = [v for o in options for v in o.get("enum", [o["const"]] if "const" in o else [])]
    if words:
        bad.append("not-a-choice")
    # a bound of one option can be a valid value of another (int | 'superpixel' | None)
    return [v for v in bad if not any(_allowed(v, o) for o in options)]


def _allowed(value, option: dict) -> bool:
    if option.get("type") == "null":
        return value is None
    if "const" in option or "enum" in option:
        return value in option.get("enum", [option.get("const")])
    if option.get("type") in ("integer", "number") and isinstance(value, int | float):
        if option["type"] == "integer" and not float(value).is_integer():
            return False
        return (option.get("minimum", -math.inf) <= value <= option.get("maximum", math.inf)
                and option.get("exclusiveMinimum", -math.inf) < value
                < option.get("exclusiveMaximum", math.inf))
    return False


def test_every_params_schema_rejects_out_of_range_values(server: Server,
                                                         models: dict[str, str]) -> None:
    checked = set()
    for info in server.client.get("/api/analyses").json():
        name = info["name"]
        for field, schema in info["params_schema"].get("properties", {}).items():
            for value in _out_of_range(schema):
                r = server.client.post("/api/jobs", json={
                    "analysis": name, "model_id": models[FC], "input_id": X0,
                    "params": {field: value}})
                assert r.status_code == 422, (name, field, value, r.text)
                assert field in r.json()["detail"], r.text
                checked.add(name)
    with_params = {a for _, a, _, p in JOBS.values() if p}
    assert with_params <= checked


@pytest.mark.parametrize("key", list(JOBS))
def test_job_finishes_with_full_progress(server: Server, jobs: dict[str, str], key: str) -> None:
    job = server.wait_job(jobs[key], timeout=240)
    assert job["status"] == "finished", job
    assert job["progress"] == 1.0 and job["message"] and job["error"] is None


# -- one oracle per analysis -------------------------------------------------------------------

@pytest.mark.parametrize("key, model", [("predict", FC), ("predict_conv", CONV)])
def test_predict_matches_onnxruntime(server, jobs, models, oracles, key, model) -> None:
    result = _result(server, jobs, key)
    x = _input(server, models, X0, model)
    logits, relus, _ = oracles[model].run(x)
    np.testing.assert_allclose(result["logits"], logits[0], atol=ATOL)
    assert result["predicted"] == int(logits.argmax())
    for layer, out in zip(result["layers"], relus, strict=True):
        assert layer["active"] == int((out > 0).sum())
        assert np.array(layer["pattern"]).reshape(-1).tolist() == (out[0] > 0).astype(int).tolist()


def test_line_pieces_are_affine_under_onnxruntime(server, jobs, models, oracles) -> None:
    line = _result(server, jobs, "line")["line"]
    oracle = oracles[FC]
    a, b = _input(server, models, X0).reshape(-1), _input(server, models, X1).reshape(-1)
    ts = np.array(line["ts"])
    assert ts[0] == 0 and ts[-1] == 1 and np.all(np.diff(ts) > 0)
    at = lambda t: a + np.asarray(t)[:, None] * (b - a)  # noqa: E731
    # logits at every breakpoint, and affine on each piece (midpoint = mean of its ends)
    np.testing.assert_allclose(line["logits"], oracle.logits(at(ts)), atol=ATOL)
    mids = (ts[:-1] + ts[1:]) / 2
    ends = np.array(line["logits"])
    np.testing.assert_allclose(oracle.logits(at(mids)), (ends[:-1] + ends[1:]) / 2, atol=ATOL)
    assert line["classes"] == oracle.logits(at(mids)).argmax(1).tolist()
    # dense sampling: each sample's pattern is its piece's, and patterns change only at ts
    dense = np.linspace(0, 1, 4001)
    patterns = np.hstack([r > 0 for r in oracle.run(at(dense))[1]])
    piece = np.clip(np.searchsorted(ts, dense, side="right") - 1, 0, len(ts) - 2)
    inside = np.all(np.abs(dense[:, None] - ts[None, :]) > 1e-6, axis=1)
    mid_patterns = np.hstack([r > 0 for r in oracle.run(at(mids))[1]])
    assert (patterns[inside] == mid_patterns[piece[inside]]).all()
    ids = np.array(line["pattern_ids"])
    distinct = {tuple(r) for r in mid_patterns}
    assert line["num_patterns"] == len(distinct)
    for i in range(len(mids)):
        for j in range(len(mids)):
            assert (ids[i] == ids[j]) == (mid_patterns[i] == mid_patterns[j]).all()


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(x @ np.roll(y, -1) - y @ np.roll(x, -1))


def test_plane_polygons_tile_it_and_are_affine_regions(server, jobs, oracles) -> None:
    result = _result(server, jobs, "plane")
    oracle = oracles[FC]
    p0, p1, p2 = (np.asarray(c, np.float64).reshape(-1) for c in result["corners"])
    assert np.abs(p2 - p0).max() == pytest.approx(0.1)
    polys = [np.asarray(p, np.float64) for p in result["polygons"]]
    assert sum(_area(p) for p in polys) == pytest.approx(1.0, abs=1e-9)
    to_input = lambda uv: p0 + uv[:, :1] * (p1 - p0) + uv[:, 1:] * (p2 - p0)  # noqa: E731
    patterns = []
    for poly, cls in zip(polys, result["polygon_classes"], strict=True):
        if _area(poly) < 1e-9:
            patterns.append(None)
            continue
        centre = poly.mean(0)
        near = centre + 0.9 * (poly - centre)  # vertices pulled inside
        vals = oracle.logits(to_input(np.vstack([centre, near])))
        np.testing.assert_allclose(vals[0], vals[1:].mean(0), atol=ATOL)  # affine inside
        assert int(vals[0].argmax()) == cls
        patterns.append(np.hstack([r[0] > 0 for r in oracle.run(to_input(centre[None]))[1]]))
    ids = result["pattern_ids"]
    real = [i for i, p in enumerate(patterns) if p is not None]
    for i in real:
        for j in real:
            assert (ids[i] == ids[j]) == bool((patterns[i] == patterns[j]).all())


def test_exact_ig_matches_a_numpy_riemann_sum(server, jobs, models, oracles) -> None:
    result = _result(server, jobs, "ig")
    oracle = oracles[FC]
    x = _input(server, models, X0).reshape(-1)
    t = result["target"]
    logits = oracle.logits(np.vstack([x, np.zeros_like(x)]))
    assert t == int(logits[0].argmax())
    assert result["f_x"] == pytest.approx(logits[0, t], abs=ATOL)
    assert result["f_baseline"] == pytest.approx(logits[1, t], abs=ATOL)
    exact = np.asarray(result["exact"]).reshape(-1)
    assert exact.sum() == pytest.approx(logits[0, t] - logits[1, t], abs=ATOL)
    steps = 20_000
    alphas = (np.arange(steps) + 0.5) / steps
    grads = oracle.gradient(alphas[:, None] * x, np.eye(len(logits[0]))[t])
    riemann = x * grads.mean(0)
    np.testing.assert_allclose(exact, riemann, atol=1e-3 * np.abs(exact).sum())


def test_exact_ig_on_a_conv_model_matches_captum(server, jobs, models, oracles) -> None:
    """The conv model's exact IG (the event sweep): ends and completeness by onnxruntime,
    attributions by Captum's 10^4-step Riemann sum on the engine's network."""
    result = _result(server, jobs, "ig_conv")
    x = _input(server, models, X1, CONV).reshape(-1)
    t = result["target"]
    logits = oracles[CONV].logits(np.vstack([x, np.zeros_like(x)]))
    assert t == int(logits[0].argmax())
    assert result["f_x"] == pytest.approx(logits[0, t], abs=ATOL)
    assert result["f_baseline"] == pytest.approx(logits[1, t], abs=ATOL)
    exact = np.asarray(result["exact"]).reshape(-1)
    assert exact.sum() == pytest.approx(logits[0, t] - logits[1, t], abs=ATOL)
    assert result["num_pieces"] > 50
    net = load_network(SAMPLE_MODELS / f"{CONV}.onnx")
    ref = captum_integrated_gradients(net, x.reshape(net.input_shape), None, t, 10_000,
                                      method="riemann_trapezoid").reshape(-1)
    np.testing.assert_allclose(exact, ref, atol=1e-3 * np.abs(exact).sum())


def _check_saliency(result: dict, x: np.ndarray, oracle: OnnxOracle) -> None:
    """Thresholds hold on the masked input, by onnxruntime's first-layer outputs; an optimal
    mask loses a constraint without any one kept group; the mask keeps whole groups."""
    groups = np.asarray(result["groups"]).reshape(-1)
    mask = np.asarray(result["mask"]).reshape(-1).astype(bool)
    for g in np.unique(groups):
        assert len(set(mask[groups == g])) == 1
    idx = [n["index"] for n in result["neurons"]]
    assert idx
    pre = oracle.run(x)[2][0]
    np.testing.assert_allclose([n["pre_activation"] for n in result["neurons"]], pre[idx],
                               atol=ATOL)
    need = result["threshold"] * pre[idx] - ATOL
    assert np.all(oracle.run(x * mask)[2][0, idx] >= need)
    kept = np.unique(groups[mask])
    assert len(kept) == result["mask_size"]
    if result["status"] == "optimal" and len(kept):
        drops = np.stack([x * (mask & (groups != g)) for g in kept])
        assert np.all(np.any(oracle.run(drops)[2][:, idx] < need + 2 * ATOL, axis=1))
    survives = int(oracle.logits(x * mask).argmax()) == result["target"]
    assert result["grades"]["smt"]["survives"] == survives


@pytest.mark.parametrize("key, model, input_id", [("saliency", FC, X0),
                                                  ("saliency_conv", CONV, X1)])
def test_saliency_mask_holds_under_onnxruntime(server, jobs, models, oracles, key, model,
                                               input_id) -> None:
    result = _result(server, jobs, key)
    assert result["num_groups"] == 64 and result["status"] == "optimal"
    _check_saliency(result, _input(server, models, input_id, model).reshape(-1), oracles[model])


def test_superpixel_saliency_masks_whole_connected_regions(server, jobs, models,
                                                           oracles) -> None:
    result = _result(server, jobs, "saliency_superpixel")
    assert result["patch"] is None and 4 <= result["num_groups"] < 64
    groups = np.asarray(result["groups"]).reshape(8, 8)
    for g in range(result["num_groups"]):
        assert ndimage.label(groups == g)[1] == 1
    _check_saliency(result, _input(server, models, X1).reshape(-1), oracles[FC])


def test_proof_certificate_is_never_contradicted_by_attacks(server, jobs, models,
                                                            oracles) -> None:
    result = _result(server, jobs, "proof_features")
    oracle = oracles[FC]
    x = _input(server, models, X0).reshape(-1)
    target = result["predicted"]
    assert target == int(oracle.logits(x).argmax())
    assert result["certified"]
    points = attack_points(oracle, x, target, result["eps"])
    logits, relus, _ = oracle.run(points)
    margins = _margins(logits, target).min(0)
    assert margins.min() > 0  # the attack finds no counterexample
    for j, bound in enumerate(result["margins"]):
        if j != target:
            assert margins[j] >= bound - ATOL  # each certified lower bound is below the truth
    assert result["margin"] <= margins.min() + ATOL
    feature = relus[-1]  # the penultimate layer's ReLU outputs are the proof's features
    assert result["feature_node"] == 4 and feature.shape[1] == result["num_features"]
    assert np.all(feature >= np.array(result["lower"]) - ATOL)
    assert np.all(feature <= np.array(result["upper"]) + ATOL)


def test_vnnlib_verdict_is_never_contradicted(server, jobs, models, oracles) -> None:
    """A proof survives PGD and sampling in the box; a counterexample lies in the box and
    violates the property under onnxruntime."""
    result = _result(server, jobs, "verify_property")
    _, target = _ball_property(FC, 0, PROPERTY_EPS)
    oracle = oracles[FC]
    x = _input(server, models, X0).reshape(-1)
    assert result["status"] in ("proven", "counterexample", "unknown"), result
    if result["status"] == "proven":
        logits, _, _ = oracle.run(attack_points(oracle, x, target, PROPERTY_EPS))
        assert _margins(logits, target).min() > 0
    elif result["status"] == "counterexample":
        point = np.asarray(result["counterexample"], np.float64).reshape(-1)
        assert np.all(point >= np.clip(x - PROPERTY_EPS, 0, 1) - 1e-9)
        assert np.all(point <= np.clip(x + PROPERTY_EPS, 0, 1) + 1e-9)
        logits = oracle.logits(point)
        assert np.delete(logits, target).max() >= logits[target] - ATOL
    print(f"verify_property: {result['status']} in {result['seconds']:.2f} s")


def test_largest_certified_eps_survives_attacks(server, jobs, models, oracles) -> None:
    result = _result(server, jobs, "proof_eps")
    oracle = oracles[FC]
    x = _input(server, models, X0).reshape(-1)
    target = result["predicted"]
    assert set(result["largest_eps"]) == {"interval", "deepz", "crown"}
    for method, eps in result["largest_eps"].items():
        assert 0 < eps <= result["eps_max"], method
        points = attack_points(oracle, x, target, eps, seed=1)
        assert (oracle.logits(points).argmax(1) == target).all(), method


def test_proof_compare_rates_are_bounded_by_attacks(server, jobs, models, oracles) -> None:
    result = _result(server, jobs, "proof_compare")
    oracle = oracles[FC]
    n, eps = result["n_inputs"], result["eps"]
    assert n == 6 and result["training"] == "ibp"
    inputs = server.client.get(f"/api/models/{models[FC]}/inputs").json()[:n]
    robust, true_margins = 0, []
    for info in inputs:
        x = _input(server, models, info["id"]).reshape(-1)
        margins = _margins(oracle.logits(attack_points(oracle, x, info["target"], eps)),
                           info["target"])
        true_margins.append(margins.min())
        robust += int(margins.min() > 0)
    for row in result["rows"]:
        assert row["certified_rate"] * n <= robust + 1e-9, row
        # lower bounds input by input, so their median is below the attacks' median
        assert row["median_margin"] <= np.median(true_margins) + ATOL, row


def _fires(rule: dict, relu_out: np.ndarray) -> np.ndarray:
    on, off = relu_out[:, rule["on"]] > 0, relu_out[:, rule["off"]] <= 0
    return on.all(1) & off.all(1)


def test_pattern_rules_hold_under_onnxruntime(server, jobs, models, oracles) -> None:
    result = _result(server, jobs, "patterns")
    oracle = oracles[FC]
    layer = result["layer"] - 1
    rng = np.random.default_rng(0)
    verified = [r for r in result["rules"] if r["status"] != "not verified"]
    assert verified
    tried = 0  # sampled inputs on which a proven rule fires
    for rule in result["rules"]:
        for x in rule["covered"]:  # the thumbnails are inputs the rule covers
            assert _fires(rule, oracle.run(np.asarray(x))[1][layer]).all()
    for rule in verified:
        if rule["status"] == "proven":
            centre = np.asarray(rule["covered"][0]).reshape(-1)
            for radius in (result["eps"], result["eps"] / 4):
                pts = np.clip(centre + rng.uniform(-radius, radius, (3000, centre.size)), 0, 1)
                logits, relus, _ = oracle.run(pts)
                fires = _fires(rule, relus[layer])
                tried += int(fires.sum())
                assert (logits[fires].argmax(1) == rule["target"]).all(), rule["text"]
        elif rule["status"] == "counterexample":
            logits, relus, _ = oracle.run(np.asarray(rule["counterexample"]))
            assert _fires(rule, relus[layer]).all()
            assert int(logits.argmax()) != rule["target"]
    assert tried > 0 or not any(r["status"] == "proven" for r in verified)
    x = _input(server, models, X0)
    relus = oracle.run(x)[1][layer]
    fired = [i for i, r in enumerate(result["rules"]) if _fires(r, relus)[0]]
    assert result["current"]["fired"] == fired
    assert result["current"]["decision"] == int(oracle.logits(x).argmax())


def test_extraction_grades_recomputed_from_returned_weights(server, jobs, oracles) -> None:
    result = _result(server, jobs, "extraction")
    w_true, b_true = oracles[FC].layers[0]
    w, b = (np.asarray(v, np.float64) for v in result["first_layer"])
    hidden = result["grading"]["layers"][0]
    assert hidden["layer"] == "hidden 1" and hidden["true_neurons"] == len(b_true)
    assert hidden["found_neurons"] == len(b) == result["layer_sizes"][0] > 0
    # every first-layer critical point lies on some true neuron's hyperplane
    points = np.asarray(result["critical_points"])
    owner = np.asarray(result["point_neuron"])
    first = points[owner >= 0]
    dist = np.abs(first @ w_true.T + b_true) / np.linalg.norm(w_true, axis=1)
    assert np.all(dist.min(1) < 1e-4)
    # recovered rows against the true ones: match, fit a scale, relative errors
    true_rows, rows = np.hstack([w_true, b_true[:, None]]), np.hstack([w, b[:, None]])
    cos = (true_rows / np.linalg.norm(true_rows, axis=1, keepdims=True)) @ (
        rows / np.linalg.norm(rows, axis=1, keepdims=True)).T
    ti, ri = linear_sum_assignment(-np.abs(cos))
    fit = np.einsum("ij,ij->i", true_rows[ti], rows[ri]) / np.einsum("ij,ij->i", rows[ri],
                                                                      rows[ri])
    def err(scale: np.ndarray) -> np.ndarray:
        return (np.linalg.norm(true_rows[ti] - scale[:, None] * rows[ri], axis=1)
                / np.linalg.norm(true_rows[ti], axis=1))
    positive, signed = err(np.maximum(fit, 0)), err(fit)
    assert hidden["median_rel_err"] == pytest.approx(np.median(positive), rel=1e-6, abs=1e-9)
    assert hidden["max_rel_err"] == pytest.approx(positive.max(), rel=1e-6, abs=1e-9)
    assert hidden["max_rel_err_up_to_sign"] == pytest.approx(signed.max(), rel=1e-6, abs=1e-9)
    assert np.median(signed) < 1e-3  # most neurons are recovered
    # the side-by-side pairs are true rows of the file and close recovered ones
    pairs_true, pairs_found = (np.asarray(v) for v in (result["pairs"]["true"],
                                                       result["pairs"]["found"]))
    for row in pairs_true:
        assert np.abs(w_true - row).max(1).min() < 1e-9
    assert np.median(np.abs(pairs_true - pairs_found).max(1)) < 1e-3
