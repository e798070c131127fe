"""Pattern rules through the real HTTP server: mine, then verify many rules in parallel.

Mining runs as a ``patterns`` job; the rules then go to ``POST /api/patterns/verify``, one
``patterns_verify`` child job per rule under one batch, on two Dask workers. Verdicts are
checked with onnxruntime on the sample model's ONNX file (not with the engine): a
counterexample must fire the rule and change the decision, a proven rule must hold on every
sampled input of its ball that fires it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.conftest import SAMPLE_MODELS
from tests.service import Server, mlp_onnx, module_server
from tests.test_service_analyses import OnnxOracle

FC = "digits_fc_ibp"


server = module_server("patterns", ATLAS_DASK_WORKERS="2")


@pytest.fixture(scope="module")
def model_id(server: Server) -> str:
    return next(m["id"] for m in server.client.get("/api/models").json() if m["name"] == FC)


def _fires(rule: dict, relu_out: np.ndarray) -> np.ndarray:
    return (relu_out[:, rule["on"]] > 0).all(1) & (relu_out[:, rule["off"]] <= 0).all(1)


def _wait_batch(server: Server, batch_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = server.client.get(f"/api/batches/{batch_id}").json()
        if batch["status"] == "finished":
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {batch['status']} after {timeout} s")


def _mine(server: Server, model_id: str) -> dict:
    r = server.client.post("/api/jobs", json={
        "analysis": "patterns", "model_id": model_id, "input_id": "gallery:digits:0",
        "params": {"n_inputs": 300, "verify": 0, "thumbnails": 1}})
    assert r.status_code == 201, r.text
    job = server.wait_job(r.json()["id"], timeout=180)
    assert job["status"] == "finished", job
    return server.client.get(f"/api/jobs/{job['id']}/result").json()


def test_rules_mined_then_verified_in_parallel_hold_under_onnxruntime(server, model_id) -> None:
    mined = _mine(server, model_id)
    rules = [r for r in mined["rules"] if r["covered"]][:3]
    assert len(rules) >= 2 and all(r["status"] == "not verified" for r in rules)
    specs = [{"layer": r["layer"], "on": r["on"], "off": r["off"], "target": r["target"],
              "center": np.asarray(r["covered"][0]).reshape(-1).tolist()} for r in rules]
    body = {"model_id": model_id, "rules": specs, "domain": "ball", "eps": 0.05, "timeout": 10}
    r = server.client.post("/api/patterns/verify", json=body)
    assert r.status_code == 201, r.text
    batch = r.json()
    assert batch["analysis"] == "patterns_verify" and batch["total"] == len(rules)
    assert [c["params"]["on"] for c in batch["children"]] == [s["on"] for s in specs]
    batch = _wait_batch(server, batch["id"])
    assert batch["counts"]["finished"] == len(rules) and batch["progress"] == 1.0
    items = server.client.get(f"/api/batches/{batch['id']}/result").json()["items"]
    oracle = OnnxOracle(SAMPLE_MODELS / f"{FC}.onnx")
    layer = mined["layer"] - 1
    rng = np.random.default_rng(0)
    statuses = []
    for rule, spec, item in zip(rules, specs, items, strict=True):
        verdict = item["result"]
        statuses.append(verdict["status"])
        assert set(verdict["condition"].split(" and ")) == set(rule["condition"].split(" and "))
        if verdict["status"] == "counterexample":
            x = np.asarray(verdict["counterexample"]).reshape(-1)
            assert np.abs(x - spec["center"]).max() <= 0.05 + 1e-6
            logits, relus, _ = oracle.run(x)
            assert _fires(rule, relus[layer]).all()
            assert int(logits.argmax()) == verdict["counterexample_class"] != rule["target"]
        elif verdict["status"] == "proven":
            centre = np.asarray(spec["center"])
            pts = np.clip(centre + rng.uniform(-0.05, 0.05, (4000, centre.size)), 0, 1)
            logits, relus, _ = oracle.run(pts)
            fires = _fires(rule, relus[layer])
            assert fires.any()
            assert (logits[fires].argmax(1) == rule["target"]).all(), rule["text"]
    assert "proven" in statuses
    # the same request again: every child is the cached job, so the batch is done at once
    again = server.client.post("/api/patterns/verify", json=body).json()
    assert again["status"] == "finished"
    assert [c["id"] for c in again["children"]] == [c["id"] for c in batch["children"]]


def test_verification_batch_reports_progress_and_cancels(server, model_id) -> None:
    # input splitting over the whole 64-pixel box: hopeless on purpose, it reports progress
    spec = {"layer": 1, "on": [0], "off": [1], "target": 0}
    r = server.client.post("/api/patterns/verify", json={
        "model_id": model_id, "rules": [spec], "domain": "box", "method": "split",
        "timeout": 300})
    assert r.status_code == 201, r.text
    batch = r.json()
    job_id = batch["children"][0]["id"]
    server.wait_job(job_id, timeout=120, until=("running", "finished", "failed"))
    deadline = time.monotonic() + 60
    while "settled" not in server.client.get(f"/api/jobs/{job_id}").json()["message"] and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    running = server.client.get(f"/api/jobs/{job_id}").json()
    assert running["status"] == "running" and "settled" in running["message"], running
    cancelled = server.client.post(f"/api/batches/{batch['id']}/cancel")
    assert cancelled.status_code == 200
    assert server.wait_job(job_id, timeout=60)["status"] == "cancelled"
    assert _wait_batch(server, batch["id"])["counts"]["cancelled"] == 1


def test_verify_request_errors_are_clear(server, model_id) -> None:
    bad_layer = {"model_id": model_id, "rules": [{"layer": 9, "target": 0}]}
    assert server.client.post("/api/patterns/verify", json=bad_layer).status_code == 422
    unknown = {"model_id": "nope", "rules": [{"layer": 1, "target": 0}]}
    assert server.client.post("/api/patterns/verify", json=unknown).status_code == 404


# -- what a refuted rule still offers, and proven coverage ------------------------------------


def _forward64(oracle: OnnxOracle, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and every ReLU layer's pre-activations in float64, from the ONNX file's own
    Gemm weights (the fully connected sample model), independent of the engine."""
    h, pre = np.asarray(x, np.float64).reshape(-1, 64), []
    for w, b in oracle.layers[:-1]:
        h = h @ w.T + b
        pre.append(h)
        h = np.maximum(h, 0.0)
    w, b = oracle.layers[-1]
    return h @ w.T + b, pre


def _same_pattern(pre: list[np.ndarray], ref: list[np.ndarray], layers: int) -> np.ndarray:
    """Rows of ``pre`` whose on/off pattern equals ``ref``'s (one row) up to ReLU ``layers``."""
    keep = np.ones(len(pre[0]), bool)
    for k in range(layers):
        keep &= ((pre[k] > 0) == (ref[k][0] > 0)).all(1)
    return keep


def _around(x: np.ndarray, radius: float, n: int, rng) -> np.ndarray:
    """Points at L-inf distance up to ``radius`` from ``x`` at scales from radius/100 up,
    clipped to the pixel box [0, 1]."""
    scale = radius * np.geomspace(0.01, 1.0, n)[:, None]
    return np.clip(x + scale * rng.uniform(-1, 1, (n, x.size)), 0.0, 1.0)


def _job(server: Server, analysis: str, model_id: str, params: dict,
         input_id: str | None = None, timeout: float = 240) -> dict:
    body = {"analysis": analysis, "model_id": model_id, "params": params}
    if input_id is not None:
        body["input_id"] = input_id
    r = server.client.post("/api/jobs", json=body)
    assert r.status_code in (200, 201), r.text
    job = server.wait_job(r.json()["id"], timeout=timeout)
    assert job["status"] == "finished", job
    return server.client.get(f"/api/jobs/{job['id']}/result").json()


def test_refuted_rules_offer_refinements_and_input_properties(server, model_id) -> None:
    """On the whole pixel box the top rules are refuted; each refuted rule comes with a
    restriction and the input properties of inputs it covers. Every counterexample, every
    proven property and its radius are checked in float64 on the ONNX file's weights."""
    result = _job(server, "patterns", model_id, {
        "n_inputs": 300, "domain": "box", "verify": 2, "timeout": 5, "refine": 2,
        "properties": 2, "coverage": 0, "thumbnails": 1}, input_id="gallery:digits:0")
    assert result["proven_coverage"] is None
    oracle = OnnxOracle(SAMPLE_MODELS / f"{FC}.onnx")
    rng = np.random.default_rng(1)
    layers = result["layer"]
    refuted = [r for r in result["rules"] if r["status"] == "counterexample"]
    assert refuted, [r["status"] for r in result["rules"]]
    checked = {"counterexample": 0, "proven": 0}
    for rule in result["rules"]:
        if rule["status"] != "counterexample":
            assert rule["refined"] is None and rule["properties"] is None
            continue
        ce = np.asarray(rule["counterexample"], np.float64).reshape(1, -1)
        assert ce.min() >= 0.0 and ce.max() <= 1.0
        logits, pre = _forward64(oracle, ce)
        assert (pre[layers - 1][0, rule["on"]] > 0).all()
        assert (pre[layers - 1][0, rule["off"]] <= 0).all()
        assert int(logits.argmax()) == rule["counterexample_class"] != rule["target"]
        refined = rule["refined"]
        assert set(rule["on"]) <= set(refined["on"]) and set(rule["off"]) <= set(refined["off"])
        added = len(refined["on"]) + len(refined["off"]) - len(rule["on"]) - len(rule["off"])
        assert added == refined["literals_added"] >= 1
        assert refined["outcome"] in ("proven", "counterexample", "unknown", "no support")
        assert 1 <= len(rule["properties"]) <= 2
        for prop in rule["properties"]:
            x = np.asarray(prop["input"], np.float64).reshape(1, -1)
            logits, ref = _forward64(oracle, x)
            assert int(logits.argmax()) == rule["target"]  # a covered input: it fires ...
            assert (ref[layers - 1][0, rule["on"]] > 0).all()  # ... and decides the class
            assert (ref[layers - 1][0, rule["off"]] <= 0).all()
            # the radius is an extent: the whole L-inf ball of it keeps the pattern
            inner = _around(x, 0.999 * prop["radius_linf"], 500, rng)
            out, pre = _forward64(oracle, inner)
            assert _same_pattern(pre, ref, layers).all()
            if prop["status"] == "counterexample":
                ce = np.asarray(prop["counterexample"], np.float64).reshape(1, -1)
                assert ce.min() >= 0.0 and ce.max() <= 1.0
                out, pre = _forward64(oracle, ce)
                assert _same_pattern(pre, ref, layers).all()
                assert int(out.argmax()) == prop["counterexample_class"] != rule["target"]
                checked["counterexample"] += 1
            if prop["status"] == "proven":
                assert prop["ball"] is None
                assert (out.argmax(1) == rule["target"]).all()
                pts = _around(x, 1.0, 4000, rng)
                out, pre = _forward64(oracle, pts)
                same = _same_pattern(pre, ref, layers)
                assert (out[same].argmax(1) == rule["target"]).all()
                checked["proven"] += 1
            ball = prop["ball"]
            if ball is not None and ball["status"] == "proven":
                pts = _around(x, ball["eps"], 4000, rng)
                out, pre = _forward64(oracle, pts)
                same = _same_pattern(pre, ref, layers)
                assert same.any() and (out[same].argmax(1) == rule["target"]).all()
    assert sum(checked.values()) >= 1


def test_proven_coverage_job_matches_the_pattern_job(server, model_id) -> None:
    """``patterns_coverage`` (no input: one cell per model on the Compare page) gives the
    pattern job's proven coverage for the same settings; each input it counts as covered
    keeps its decision at every sampled point of its eps-ball with its pattern."""
    shared = {"n_inputs": 300, "coverage": 12, "eps": 0.05}
    alone = _job(server, "patterns_coverage", model_id, shared)
    page = _job(server, "patterns", model_id, shared | {"verify": 0, "thumbnails": 1,
                                                        "refine": 0, "properties": 0},
                input_id="gallery:digits:0")
    cov = alone["proven_coverage"]
    assert {k: v for k, v in cov.items() if k != "seconds"} == \
        {k: v for k, v in page["proven_coverage"].items() if k != "seconds"}
    assert alone["fidelity"] == page["fidelity"]
    assert alone["rule_list_size"] == page["rule_list_size"]
    assert cov["checked"] == len(cov["per_input"]) == len(alone["heldout"]) == 12
    assert cov["covered"] == cov["per_input"].count("proven") and cov["by_rule"] == 0
    assert cov["fraction"] == cov["covered"] / 12 and cov["covered"] >= 1
    oracle = OnnxOracle(SAMPLE_MODELS / f"{FC}.onnx")
    rng = np.random.default_rng(2)
    for index, status in zip(alone["heldout"], cov["per_input"], strict=True):
        served = server.client.get(
            f"/api/models/{model_id}/inputs/gallery:digits:{index}").json()
        x = np.asarray(served["values"], np.float64).reshape(1, -1)
        logits, ref = _forward64(oracle, x)
        if status == "proven":
            out, pre = _forward64(oracle, _around(x, 0.05, 3000, rng))
            same = _same_pattern(pre, ref, len(ref))
            assert same.any()
            assert (out[same].argmax(1) == logits.argmax()).all(), index
    # a model-level analysis: listed without an input, refused on a bad layer
    listed = {a["name"]: a for a in server.client.get("/api/analyses").json()}
    assert listed["patterns_coverage"]["needs_input"] is False
    bad = server.client.post("/api/jobs", json={"analysis": "patterns_coverage",
                                                "model_id": model_id,
                                                "params": {"coverage": 0}})
    assert bad.status_code == 422


def test_proven_coverage_of_a_model_without_a_gallery_says_why(server, tmp_path) -> None:
    """The Compare page runs ``patterns_coverage`` on every model; a card-less upload has no
    held-out inputs, so the job finishes with no numbers and the reason, instead of failing."""
    path = mlp_onnx(tmp_path / "bare.onnx", seed=5)
    r = server.client.post("/api/models", files={"file": ("bare.onnx", path.read_bytes())})
    assert r.status_code in (200, 201), r.text
    result = _job(server, "patterns_coverage", r.json()["id"], {})
    assert result["proven_coverage"] is None and result["fidelity"] is None
    assert "no gallery" in result["reason"]
