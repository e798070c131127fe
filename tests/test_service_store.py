"""The job store on SQLite and on a real PostgreSQL (skipped when none is reachable)."""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, text

from backend.analyses.base import jsonable
from backend.db import engine_for
from backend.jobs.store import JobStore, cache_key

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        yield JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
        return
    name = f"atlas_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT",
                              connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection failure means "not here"
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield JobStore(url)
    finally:
        engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_job_lifecycle_and_cache(store: JobStore) -> None:
    job, reused = store.create_or_reuse("predict", "m" * 64, "upload:a", {"k": 1})
    assert not reused and job.status == "queued"
    same, reused = store.create_or_reuse("predict", "m" * 64, "upload:a", {"k": 1})
    assert reused and same.id == job.id  # an identical request joins the queued job
    other, reused = store.create_or_reuse("predict", "m" * 64, "upload:a", {"k": 2})
    assert not reused and other.id != job.id

    assert store.claim(job.id) and not store.claim(job.id)
    assert store.progress(job.id, 0.5, "half") is False
    assert store.get(job.id).progress == 0.5 and store.get(job.id).message == "half"
    assert store.finish(job.id, '{"ok": true}')
    done = store.get(job.id)
    assert done.status == "finished" and done.result == '{"ok": true}' and done.progress == 1.0
    cached, reused = store.create_or_reuse("predict", "m" * 64, "upload:a", {"k": 1})
    assert reused and cached.id == job.id and cached.status == "finished"
    assert not store.fail(job.id, "too late")  # final states are final

    assert store.claim(other.id) and store.fail(other.id, "boom")
    retry, reused = store.create_or_reuse("predict", "m" * 64, "upload:a", {"k": 2})
    assert not reused and retry.id != other.id  # a failed job is retried, not served
    assert {j.id for j in store.list()} == {job.id, other.id, retry.id}


def test_cancel_queued_and_running(store: JobStore) -> None:
    queued, _ = store.create_or_reuse("slow", "m", None, {"n": 1})
    assert store.request_cancel(queued.id).status == "cancelled"
    assert not store.claim(queued.id)

    running, _ = store.create_or_reuse("slow", "m", None, {"n": 2})
    assert store.claim(running.id)
    assert store.request_cancel(running.id).status == "running"
    assert store.progress(running.id, 0.2, "step") is True  # the worker learns it here
    assert store.mark_cancelled(running.id)
    assert store.get(running.id).status == "cancelled"


def test_restart_requeues_then_fails_after_three(store: JobStore) -> None:
    job, _ = store.create_or_reuse("slow", "m", None, {"n": 3})
    waiting, _ = store.create_or_reuse("slow", "m", None, {"n": 4})
    for attempt in (1, 2):
        assert store.claim(job.id)
        assert sorted(store.requeue_interrupted()) == sorted([job.id, waiting.id])
        assert store.get(job.id).status == "queued" and store.get(job.id).restarts == attempt
    assert store.claim(job.id)
    assert store.requeue_interrupted() == []
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error == "interrupted by restart 3 times"


def test_only_one_worker_claims_a_job(store: JobStore) -> None:
    job, _ = store.create_or_reuse("slow", "m", None, {"n": 5})
    barrier = threading.Barrier(6)

    def claim() -> bool:
        barrier.wait()
        return store.claim(job.id)

    with ThreadPoolExecutor(6) as pool:
        assert sum(pool.map(lambda _: claim(), range(6))) == 1


def test_cache_key_is_canonical() -> None:
    assert cache_key("a", "m", "i", {"x": 1, "y": 2}) == cache_key("a", "m", "i", {"y": 2, "x": 1})
    assert cache_key("a", "m", "i", {"x": 1}) != cache_key("a", "m", None, {"x": 1})


def test_jsonable_makes_strict_json() -> None:
    out = jsonable({"a": np.float32(1.5), 2: torch.tensor([1, 2]), "n": float("nan"),
                    "arr": np.array([[1.0, math.inf]]), "t": (np.int64(3), True)})
    assert out == {"a": 1.5, "2": [1, 2], "n": None, "arr": [[1.0, None]], "t": [3, True]}
