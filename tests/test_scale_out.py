"""Scale-out: a real ``dask scheduler`` + two ``dask worker`` processes on loopback, the API
(uvicorn) pointed at them with its job records in a fresh PostgreSQL database (the session
fixture ``scaled``, shared with tests/test_reliability.py), and a fan-out batch run to
completion. Results are checked against onnxruntime."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sqlalchemy import create_engine, text

from tests.service import Server, mlp_onnx
from tests.service.cluster import wait_for


@pytest.fixture
def deployment(scaled: dict) -> tuple:
    return scaled["server"], scaled["cluster"], scaled["db"]


def _upload_model(server: Server, path: Path) -> str:
    r = server.client.post("/api/models", files={"file": (path.name, path.read_bytes())})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _upload_input(server: Server, model_id: str, x: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, x)
    r = server.client.post(f"/api/models/{model_id}/inputs",
                           files={"file": ("x.npy", buf.getvalue())})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_fan_out_batch_runs_on_external_dask_workers(deployment, tmp_path: Path) -> None:
    server, cluster, db = deployment
    assert len(cluster.worker_pids()) == 2
    paths = [mlp_onnx(tmp_path / f"m{k}.onnx", seed=20 + k) for k in range(2)]
    model_ids = [_upload_model(server, p) for p in paths]
    xs = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    input_ids = [_upload_input(server, model_ids[0], x) for x in xs]
    assert [_upload_input(server, model_ids[1], x) for x in xs] == input_ids  # same content

    r = server.client.post("/api/batches", json={"analysis": "predict", "model_ids": model_ids,
                                                 "input_ids": input_ids})
    assert r.status_code == 201, r.text
    batch = r.json()
    assert batch["total"] == 8 and len(batch["children"]) == 8
    assert batch["status"] in ("queued", "running")
    seen_progress = set()

    def finished() -> dict | None:
        info = server.client.get(f"/api/batches/{batch['id']}").json()
        seen_progress.add(info["progress"])
        return info if info["status"] == "finished" else None

    done = wait_for(finished, timeout=120)
    assert done["counts"]["finished"] == 8 and done["progress"] == 1.0
    assert min(seen_progress) < 1.0  # progress was aggregated while children ran

    result = server.client.get(f"/api/batches/{batch['id']}/result").json()
    items = result["items"]
    assert [(i["model_id"], i["input_id"]) for i in items] == [
        (m, i) for m in model_ids for i in input_ids]
    for path, model_id in zip(paths, model_ids, strict=True):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[None]})[0]
                                 for x in xs])
        got = np.array([i["result"]["logits"] for i in items if i["model_id"] == model_id])
        np.testing.assert_allclose(got, logits, atol=1e-5)

    # The records live in PostgreSQL: one parent, eight children, all finished.
    engine = create_engine(db.url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM batch_children WHERE batch_id = :b"),
                            {"b": batch["id"]}).scalar() == 8
        statuses = conn.execute(text(
            "SELECT j.status FROM jobs j JOIN batch_children c ON c.job_id = j.id "
            "WHERE c.batch_id = :b"), {"b": batch["id"]}).scalars().all()
    engine.dispose()
    assert statuses == ["finished"] * 8

    # The same batch again: every child is the cached job, so it is finished at once.
    again = server.client.post("/api/batches", json={
        "analysis": "predict", "model_ids": model_ids, "input_ids": input_ids}).json()
    assert again["id"] != batch["id"] and again["status"] == "finished"
    assert [c["id"] for c in again["children"]] == [i["job_id"] for i in items]
    assert batch["id"] in {b["id"] for b in server.client.get("/api/batches").json()}


def test_batch_rejects_bad_requests_and_cancels(deployment, tmp_path: Path) -> None:
    server, _, _ = deployment
    model_id = _upload_model(server, mlp_onnx(tmp_path / "c.onnx", seed=30))
    inp = _upload_input(server, model_id, np.zeros((1, 8, 8), np.float32))

    def post(**body):
        return server.client.post("/api/batches", json={"analysis": "test_slow", **body})

    r = post(model_ids=[model_id], input_ids=[inp, "upload:" + "0" * 64])
    assert r.status_code == 404 and "unknown input" in r.json()["detail"]
    r = post(model_ids=[model_id], input_ids=[inp], params={"steps": -1})
    assert r.status_code == 422 and "steps" in r.json()["detail"]
    r = post(model_ids=[], input_ids=[inp])
    assert r.status_code == 422 and "model_ids" in r.json()["detail"]
    r = post(model_ids=[model_id])
    assert r.status_code == 422 and "input_id" in r.json()["detail"]
    assert server.client.get("/api/batches/nope").status_code == 404

    r = post(model_ids=[model_id], input_ids=[inp],
             params={"steps": 200, "step_s": 0.1, "tag": "batch-cancel"})
    assert r.status_code == 201, r.text
    batch_id = r.json()["id"]
    assert server.client.get(f"/api/batches/{batch_id}/result").status_code == 409
    child = r.json()["children"][0]["id"]
    server.wait_job(child, until=("running",))
    assert server.client.post(f"/api/batches/{batch_id}/cancel").status_code == 200
    done = wait_for(lambda: (b := server.client.get(f"/api/batches/{batch_id}").json())
                    ["status"] == "finished" and b, timeout=30)
    assert done["counts"]["cancelled"] == 1 and "1 failed or cancelled" in done["message"]
    result = server.client.get(f"/api/batches/{batch_id}/result").json()
    assert result["items"][0]["status"] == "cancelled" and result["items"][0]["result"] is None
