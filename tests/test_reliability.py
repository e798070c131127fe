"""Reliability of the scaled deployment (API + ``dask scheduler`` + two ``dask worker`` +
PostgreSQL, real processes): load without loss, worker and API crashes, job limits.

Times are reported (printed), never asserted.
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy.exc import OperationalError

from tests.service import Server, mlp_onnx
from tests.service.cluster import PostgresDatabase, scaled_deployment, wait_for
from tests.service.load import submit_concurrently, time_cached

N_JOBS = 200


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    try:
        PostgresDatabase().drop()
    except OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    with scaled_deployment(tmp_path_factory.mktemp("reliability")) as (server, cluster, db):
        holder = {"server": server, "cluster": cluster, "db": db}
        yield holder
        holder["server"].kill()  # a restarted server replaces the first one


@pytest.fixture(scope="module")
def target(deployment: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    server = deployment["server"]
    path = mlp_onnx(tmp_path_factory.mktemp("rel-models") / "rel.onnx", seed=40)
    model_id = server.client.post("/api/models", files={"file": (path.name, path.read_bytes())}
                                  ).json()["id"]
    buf = io.BytesIO()
    np.save(buf, np.full((1, 8, 8), 0.25, np.float32))
    input_id = server.client.post(f"/api/models/{model_id}/inputs",
                                  files={"file": ("x.npy", buf.getvalue())}).json()["id"]
    return model_id, input_id


def _job(server: Server, job_id: str) -> dict:
    return server.client.get(f"/api/jobs/{job_id}").json()


def _slow(server: Server, target: tuple[str, str], limits: dict | None = None,
          **params) -> dict:
    body = {"analysis": "test_slow", "model_id": target[0], "input_id": target[1],
            "params": params, "limits": limits or {}}
    r = server.client.post("/api/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def test_200_concurrent_jobs_none_lost_or_duplicated(deployment: dict, target) -> None:
    server = deployment["server"]
    bodies = [{"analysis": "test_slow", "model_id": target[0], "input_id": target[1],
               "params": {"steps": 1, "step_s": 0, "tag": f"load-{k}"}} for k in range(N_JOBS)]
    responses = submit_concurrently(server.url, bodies, threads=16)
    assert [r.status_code for r in responses] == [201] * N_JOBS
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == N_JOBS

    def all_final() -> list[dict] | None:
        jobs = [j for j in server.client.get("/api/jobs", params={"limit": 1000}).json()
                if j["id"] in set(ids)]
        return jobs if all(j["status"] in ("finished", "failed", "cancelled")
                           for j in jobs) and len(jobs) == N_JOBS else None

    jobs = wait_for(all_final, timeout=150, interval=0.5)
    assert sorted(j["id"] for j in jobs) == sorted(ids)  # each listed exactly once
    assert {j["status"] for j in jobs} == {"finished"}, [j for j in jobs if j["error"]][:3]
    tags = {server.client.get(f"/api/jobs/{i}").json()["params"]["tag"] for i in ids}
    assert tags == {f"load-{k}" for k in range(N_JOBS)}

    again = submit_concurrently(server.url, bodies, threads=16)
    assert [r.json()["id"] for r in again] == ids and all(r.json()["cached"] for r in again)
    p50, p95 = time_cached(server.url, bodies[:100], threads=8)
    print(f"\ncached time-to-result over HTTP: p50 {p50:.1f} ms, p95 {p95:.1f} ms")


def test_killed_worker_job_is_rescheduled_and_finishes(deployment: dict, target) -> None:
    server, cluster = deployment["server"], deployment["cluster"]
    job = _slow(server, target, steps=30, step_s=0.1, tag="kill-worker")
    server.wait_job(job["id"], until=("running",), timeout=60)
    busy = wait_for(lambda: [w for w, keys in cluster.processing().items()
                             if any(job["id"] in k for k in keys)], timeout=30)
    pids = cluster.worker_pids()
    os.kill(pids[busy[0]], signal.SIGKILL)
    done = server.wait_job(job["id"], timeout=120)
    assert done["status"] == "finished", done
    assert server.client.get(f"/api/jobs/{job['id']}/result").json()["steps"] == 30
    restarted = wait_for(lambda: len(p := cluster.worker_pids()) == 2 and p, timeout=60)
    assert restarted[busy[0]] != pids[busy[0]]  # the nanny started a fresh worker process


def test_time_and_memory_limits_fail_the_job_not_the_worker(deployment: dict, target) -> None:
    server, cluster = deployment["server"], deployment["cluster"]
    pids = cluster.worker_pids()
    slow = _slow(server, target, {"time_s": 1}, steps=100, step_s=0.1, tag="time-limit")
    hungry = _slow(server, target, {"memory_mb": 200}, steps=1, step_s=0, allocate_mb=4000,
                   tag="memory-limit")
    slow, hungry = server.wait_job(slow["id"], timeout=60), server.wait_job(hungry["id"])
    assert slow["status"] == "failed" and "time limit of 1 s" in slow["error"], slow
    assert hungry["status"] == "failed" and "memory limit of 200 MB" in hungry["error"], hungry
    assert cluster.worker_pids() == pids  # both workers survived
    fine = server.wait_job(_slow(server, target, steps=2, step_s=0, allocate_mb=50,
                                 tag="after-limits")["id"])
    assert fine["status"] == "finished", fine
    bad = server.client.post("/api/jobs", json={
        "analysis": "test_slow", "model_id": target[0], "input_id": target[1],
        "limits": {"time_s": -1}})
    assert bad.status_code == 422 and "time_s" in bad.json()["detail"]


def test_killed_api_loses_no_job(deployment: dict, target, tmp_path: Path) -> None:
    """kill -9 the API with two jobs running (one per worker) and two queued; restart it:
    every record is there and ends finished, none stays running."""
    server = deployment["server"]
    ids = [_slow(server, target, steps=15, step_s=0.1, tag=f"api-kill-{k}")["id"]
           for k in range(4)]
    wait_for(lambda: sum(_job(server, i)["status"] == "running" for i in ids) == 2, timeout=60)
    assert sum(_job(server, i)["status"] == "queued" for i in ids) == 2
    server.kill()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server.url}/api/health", timeout=2)

    again = Server(server.data_dir, **{k: v for k, v in server.env.items()
                                       if k != "ATLAS_DATA_DIR"}).start()
    deployment["server"] = again
    for job_id in ids:
        job = again.wait_job(job_id, timeout=120)
        assert job["status"] == "finished", job
        assert again.client.get(f"/api/jobs/{job_id}/result").json()["steps"] == 15
    listed = {j["id"]: j for j in again.client.get("/api/jobs", params={"limit": 1000}).json()}
    assert set(ids) <= set(listed)
    assert not [j for j in listed.values() if j["status"] in ("queued", "running")]
