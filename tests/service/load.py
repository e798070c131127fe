"""Concurrent HTTP load on a running server (reliability tests and the service benchmark).

Each thread keeps one ``httpx.Client`` (one kept-alive connection) for all its requests, and
the number of threads bounds the requests in flight, so what is timed is the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np


def _run(url: str, token: str | None, threads: int, work: Callable, items: list) -> list:
    """``work(client, item)`` for every item from ``threads`` threads, one client each."""
    local = threading.local()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    clients: list[httpx.Client] = []

    def call(item):  # noqa: ANN001, ANN202
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=60, headers=headers)
            clients.append(local.client)
        return work(local.client, item)

    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(call, items))
    finally:
        for client in clients:
            client.close()


def submit_concurrently(url: str, bodies: list[dict], threads: int = 16,
                        token: str | None = None) -> list[httpx.Response]:
    """POST every body to /api/jobs from ``threads`` threads at once; responses in order."""
    return _run(url, token, threads, lambda c, body: c.post("/api/jobs", json=body), bodies)


def time_cached(url: str, bodies: list[dict], threads: int = 4, token: str | None = None,
                rounds: int = 2) -> tuple[float, float]:
    """p50 and p95 (ms) of submit + fetch result for requests whose job already finished,
    from ``threads`` clients at once; each client's first request (connection set-up) is
    not timed, and every body is sent ``rounds`` times."""

    connected: set[int] = set()

    def one(client: httpx.Client, body: dict) -> float | None:
        warm = id(client) in connected
        connected.add(id(client))
        start = time.perf_counter()
        job = client.post("/api/jobs", json=body).json()
        r = client.get(f"/api/jobs/{job['id']}/result")
        elapsed = time.perf_counter() - start
        if not job.get("cached") or r.status_code != 200:
            raise AssertionError(f"not a cached result: {job}")
        return elapsed * 1000 if warm else None

    times = [t for t in _run(url, token, threads, one, bodies * rounds) if t is not None]
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))
