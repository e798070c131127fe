"""Reliability of the scaled deployment (API + ``dask scheduler`` + two ``dask worker`` +
PostgreSQL, real processes, shared with tests/test_scale_out.py through the session fixture
``scaled``): load without loss, worker and API crashes, job limits.

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

from tests.service import TOKEN, Server, mlp_onnx
from tests.service.cluster import wait_for
from tests.service.load import submit_concurrently, time_cached

# The issue asks for 200 concurrent jobs: benchmarks/bench_service.py runs those (on the same
# helpers); the suite asserts the same properties on fewer, to stay fast on 2 cores.
N_JOBS = 60


@pytest.fixture(scope="module")
def deployment(scaled: dict) -> dict:
    return scaled


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


def test_concurrent_jobs_none_lost_or_duplicated(deployment: dict, target) -> None:
    """N_JOBS distinct jobs POSTed from 16 threads at once: each gets its own id, ends
    finished, is listed exactly once; the same requests again are all cached (the benchmark
    does this with 200)."""
    server = deployment["server"]
    bodies = [{"analysis": "test_slow", "model_id": target[0], "input_id": target[1],
               "params": {"steps": 1, "step_s": 0, "tag": f"load-{k}"}} for k in range(N_JOBS)]
    responses = submit_concurrently(server.url, bodies, threads=16, token=TOKEN)
    assert [r.status_code for r in responses] == [201] * N_JOBS
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == N_JOBS

    def all_final() -> list[dict] | None:
        jobs = [j for j in server.client.get("/api/jobs", params={"limit": 1000}).json()
                if j["id"] in set(ids)]
        return jobs if all(j["status"] in ("finished", "failed", "cancelled")
                           for j in jobs) and len(jobs) == N_JOBS else None

    jobs = wait_for(all_final, timeout=150, interval=0.25)
    assert sorted(j["id"] for j in jobs) == sorted(ids)  # each listed exactly once
    assert {j["status"] for j in jobs} == {"finished"}, [j for j in jobs if j["error"]][:3]
    tags = {server.client.get(f"/api/jobs/{i}").json()["params"]["tag"] for i in ids}
    assert tags == {f"load-{k}" for k in range(N_JOBS)}

    again = submit_concurrently(server.url, bodies, threads=16, token=TOKEN)
    assert [r.json()["id"] for r in again] == ids and all(r.json()["cached"] for r in again)
    p50, p95 = time_cached(server.url, bodies, threads=4, token=TOKEN, rounds=1)
    print(f"\ncached time-to-result over HTTP, 4 clients: p50 {p50:.1f} ms, p95 {p95:.1f} ms")


def test_killed_worker_job_is_rescheduled_and_finishes(deployment: dict, target) -> None:
    server, cluster = deployment["server"], deployment["cluster"]
    job = _slow(server, target, steps=20, step_s=0.1, tag="kill-worker")
    server.wait_job(job["id"], until=("running",), timeout=60)
    busy = wait_for(lambda: [w for w, keys in cluster.processing().items()
                             if any(job["id"] in k for k in keys)], timeout=30)
    pids = cluster.worker_pids()
    os.kill(pids[busy[0]], signal.SIGKILL)
    done = server.wait_job(job["id"], timeout=120)
    assert done["status"] == "finished", done
    assert server.client.get(f"/api/jobs/{job['id']}/result").json()["steps"] == 20
    restarted = wait_for(lambda: len(p := cluster.worker_pids()) == 2 and p, timeout=60)
    assert restarted[busy[0]] != pids[busy[0]]  # the nanny started a fresh worker process


def test_time_and_memory_limits_fail_the_job_not_the_worker(deployment: dict, target) -> None:
    server, cluster = deployment["server"], deployment["cluster"]
    pids = cluster.worker_pids()
    slow = _slow(server, target, {"time_s": 1}, steps=100, step_s=0.05, tag="time-limit")
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


def test_cached_results_need_neither_dask_nor_model_files(deployment: dict, target) -> None:
    """A cached request is one lookup in the job table: it is answered with the Dask scheduler
    and workers frozen (SIGSTOP) and the model and input files moved away. A new request made
    meanwhile is queued, not lost, and runs once Dask is back."""
    server, cluster = deployment["server"], deployment["cluster"]
    body = {"analysis": "predict", "model_id": target[0], "input_id": target[1]}
    first = server.client.post("/api/jobs", json=body).json()
    assert server.wait_job(first["id"])["status"] == "finished"
    expected = server.client.get(f"/api/jobs/{first['id']}/result").json()
    files = [server.data_dir / "models" / f"{target[0]}.onnx",
             server.data_dir / "inputs" / f"{target[1].removeprefix('upload:')}.npy"]
    assert all(f.is_file() for f in files)
    for proc in cluster.procs:
        os.killpg(proc.pid, signal.SIGSTOP)
    try:
        for f in files:
            f.rename(f.with_suffix(".away"))
        with httpx.Client(base_url=server.url, timeout=10,
                          headers=server.client.headers) as client:
            for _ in range(3):
                again = client.post("/api/jobs", json=body)
                assert again.status_code == 200 and again.json()["cached"], again.text
                assert again.json()["id"] == first["id"]
                assert client.get(f"/api/jobs/{first['id']}/result").json() == expected
        for f in files:
            f.with_suffix(".away").rename(f)
        fresh = _slow(server, target, steps=1, step_s=0, tag="while-dask-frozen")
        assert fresh["status"] == "queued"
    finally:
        for proc in cluster.procs:
            os.killpg(proc.pid, signal.SIGCONT)
    assert server.wait_job(fresh["id"], timeout=60)["status"] == "finished"


def test_killed_api_loses_no_job(deployment: dict, target, tmp_path: Path) -> None:
    """kill -9 the API with two jobs running (one per worker) and two queued; restart it:
    every record is there and ends finished, none stays running."""
    server = deployment["server"]
    ids = [_slow(server, target, steps=20, step_s=0.05, tag=f"api-kill-{k}")["id"]
           for k in range(4)]
    wait_for(lambda: sum(_job(server, i)["status"] == "running" for i in ids) == 2, timeout=60)
    assert sum(_job(server, i)["status"] == "queued" for i in ids) == 2
    server.kill()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server.url}/api/health", timeout=2)

    again = deployment["server"] = server.restarted()
    for job_id in ids:
        job = again.wait_job(job_id, timeout=120)
        assert job["status"] == "finished", job
        assert again.client.get(f"/api/jobs/{job_id}/result").json()["steps"] == 20
    listed = {j["id"]: j for j in again.client.get("/api/jobs", params={"limit": 1000}).json()}
    assert set(ids) <= set(listed)
    assert not [j for j in listed.values() if j["status"] in ("queued", "running")]
