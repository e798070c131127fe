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
from tests.service import Server, module_server
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
