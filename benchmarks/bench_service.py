"""The service under load and faults, on real processes: ``dask scheduler`` + two ``dask
worker`` + the API (uvicorn) with job records in a fresh PostgreSQL database.

Scenarios, in one run:
  1. load: ``--jobs`` distinct analysis jobs POSTed concurrently; every one must reach a final
     state exactly once (lost = submitted but not listed or not final, stuck = still active
     after the deadline); throughput; then p50/p95 time-to-result of the same requests again
     (cached: submit + fetch result), from one client and from ``--clients`` at once (each
     keeping its connection; the RESULT reports the latter);
  2. a Dask worker killed (-9) in the middle of a job: the job must still finish;
  3. the API killed (-9) with jobs queued and running, then restarted: every record must be
     there and end finished or failed with a reason;
  4. schemathesis fuzzing of every endpoint of the live OpenAPI schema, counting 500s.

Ends with ``RESULT jobs=<n> lost=<l> stuck=<s> p95_cached_ms=<x> fuzz_500s=<f>``.
Needs PostgreSQL at 127.0.0.1:5432 (database ``test``, trust auth). Run from the repo root:
``.venv/bin/python benchmarks/bench_service.py [--jobs 200] [--clients 4] [--fuzz-examples 10]``.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from tests.service import Server, mlp_onnx  # noqa: E402
from tests.service.cluster import scaled_deployment, wait_for  # noqa: E402
from tests.service.load import submit_concurrently, time_cached  # noqa: E402

FINAL = ("finished", "failed", "cancelled")


def _setup(server: Server, root: Path) -> tuple[str, str]:
    path = mlp_onnx(root / "bench.onnx", seed=60)
    model_id = server.client.post("/api/models", files={"file": (path.name, path.read_bytes())}
                                  ).json()["id"]
    buf = io.BytesIO()
    np.save(buf, np.full((1, 8, 8), 0.5, np.float32))
    input_id = server.client.post(f"/api/models/{model_id}/inputs",
                                  files={"file": ("x.npy", buf.getvalue())}).json()["id"]
    return model_id, input_id


def _count(server: Server, ids: list[str], deadline_s: float) -> tuple[int, int, int]:
    """(lost, stuck, duplicated) once every job is final or the deadline passed."""
    def listed() -> list[dict]:
        wanted = set(ids)
        return [j for j in server.client.get("/api/jobs", params={"limit": 1000}).json()
                if j["id"] in wanted]

    try:
        wait_for(lambda: all(j["status"] in FINAL for j in listed()) and len(listed()) >= len(
            set(ids)), timeout=deadline_s, interval=0.5)
    except AssertionError:
        pass
    jobs = listed()
    seen = [j["id"] for j in jobs]
    unreasoned = sum(j["status"] == "failed" and not j["error"] for j in jobs)
    lost = len(set(ids) - set(seen)) + unreasoned
    stuck = sum(j["status"] not in FINAL for j in jobs)
    return lost, stuck, len(seen) - len(set(seen))


def _slow(model_id: str, input_id: str, tag: str, steps: int, step_s: float = 0.1) -> dict:
    return {"analysis": "test_slow", "model_id": model_id, "input_id": input_id,
            "params": {"steps": steps, "step_s": step_s, "tag": tag}}


def load(server: Server, target: tuple[str, str], n: int,
         clients: int) -> tuple[int, int, float]:
    bodies = [_slow(*target, f"bench-{time.time_ns()}-{k}", steps=1, step_s=0)
              for k in range(n)]
    start = time.perf_counter()
    responses = submit_concurrently(server.url, bodies, threads=16)
    ids = [r.json()["id"] for r in responses if r.status_code == 201]
    refused = n - len(ids)
    lost, stuck, dup = _count(server, ids, deadline_s=300)
    elapsed = time.perf_counter() - start
    print(f"load: {n} jobs, {refused} refused, {len(set(ids))} distinct ids, {dup} duplicated "
          f"in the listing, lost {lost}, stuck {stuck}; {n / elapsed:.1f} jobs/s end to end")
    for threads in sorted({1, clients}):
        p50, p95 = time_cached(server.url, bodies, threads=threads)
        print(f"cached time-to-result, {threads} client(s) at once: p50 {p50:.1f} ms, "
              f"p95 {p95:.1f} ms (target p95 < 50 ms)")
    return lost + refused + dup, stuck, p95


def kill_worker(server: Server, cluster, target: tuple[str, str]) -> tuple[int, int]:  # noqa: ANN001
    job = server.client.post("/api/jobs", json=_slow(*target, f"kw-{time.time_ns()}", 20)
                             ).json()
    server.wait_job(job["id"], until=("running",), timeout=60)
    busy = wait_for(lambda: [w for w, keys in cluster.processing().items()
                             if any(job["id"] in k for k in keys)], timeout=30)
    os.kill(cluster.worker_pids()[busy[0]], signal.SIGKILL)
    start = time.perf_counter()
    lost, stuck, _ = _count(server, [job["id"]], deadline_s=120)
    final = server.client.get(f"/api/jobs/{job['id']}").json()
    print(f"worker kill -9 mid-job: job {final['status']} {time.perf_counter() - start:.1f} s "
          f"after the kill (rescheduled)")
    return lost + (final["status"] != "finished"), stuck


def kill_api(server: Server, target: tuple[str, str]) -> tuple[int, int, Server]:
    ids = [server.client.post("/api/jobs", json=_slow(*target, f"ka-{time.time_ns()}-{k}", 15)
                              ).json()["id"] for k in range(4)]
    wait_for(lambda: any(server.client.get(f"/api/jobs/{i}").json()["status"] == "running"
                         for i in ids), timeout=60)
    server.kill()
    again = server.restarted()
    lost, stuck, _ = _count(again, ids, deadline_s=180)
    statuses = [again.client.get(f"/api/jobs/{i}").json()["status"] for i in ids]
    print(f"API kill -9 with 4 jobs queued/running, restart: {statuses}")
    return lost, stuck, again


def fuzz(server: Server, examples: int) -> int:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    errors, calls = [], [0]
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def one(case) -> None:  # noqa: ANN001 - schemathesis Case
            calls[0] += 1
            response = case.call(timeout=60)
            if response.status_code >= 500:
                errors.append(f"{case.method} {case.formatted_path}: {response.text[:200]}")

        one()
    healthy = server.client.get("/api/health").status_code == 200
    print(f"fuzz: {calls[0]} requests over {len(operations)} operations, {len(errors)} "
          f"server errors; healthy after: {healthy}")
    for e in errors[:5]:
        print("  ", e)
    return len(errors) + (not healthy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4,
                        help="concurrent clients for the cached time-to-result")
    parser.add_argument("--fuzz-examples", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
        root = Path(tmp)
        with scaled_deployment(root) as (server, cluster, _db):
            target = _setup(server, root)
            lost, stuck, p95 = load(server, target, args.jobs, args.clients)
            l2, s2 = kill_worker(server, cluster, target)
            l3, s3, server = kill_api(server, target)
            try:
                fuzz_500s = fuzz(server, args.fuzz_examples)
            finally:
                server.kill()
    print(f"RESULT jobs={args.jobs} lost={lost + l2 + l3} stuck={stuck + s2 + s3} "
          f"p95_cached_ms={p95:.1f} fuzz_500s={fuzz_500s}")


if __name__ == "__main__":
    main()
