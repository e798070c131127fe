"""Owners without a server: the token list's parsing, and a database written before owners
existed (its uploads and jobs become the default owner's, nobody else's).

Isolation itself is tested through the real server in tests/test_fuzz_api.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from backend.config import Settings
from backend.db import Base
from backend.jobs.store import JobStore, cache_key
from backend.storage import Storage


def test_token_list_names_owners() -> None:
    owners = Settings(api_token="t0", api_tokens=" alice:t1, bob:t:2 ,t3,").token_owners()
    assert owners == {"t0": "", "t1": "alice", "t:2": "bob",
                      "t3": f"token-{hashlib.sha256(b't3').hexdigest()[:8]}"}
    assert Settings(api_token="", api_tokens="").token_owners() == {}
    for bad in ("alice:", "al ice:sekrit", "x" * 65 + ":sekrit"):
        with pytest.raises(ValueError, match="entry 1") as err:
            Settings(api_tokens=bad).token_owners()
        assert "sekrit" not in str(err.value)


def test_old_database_belongs_to_the_default_owner(tmp_path: Path) -> None:
    """Tables as an older version wrote them (no owner columns, no model_owners): opening the
    database adds them, and the old rows are the default owner's."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    Base.metadata.create_all(old)
    with old.begin() as conn:
        conn.execute(text("DROP TABLE model_owners"))
        for table in ("jobs", "inputs", "batches"):
            conn.execute(text(f"DROP INDEX IF EXISTS ix_{table}_owner"))
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN owner"))
        conn.execute(text(
            "INSERT INTO models (id, name, format, filename, input_shape, num_outputs, card, "
            "summary, source, created_at) VALUES ('m1', 'old', 'onnx', 'm1.onnx', '[4]', 2, "
            "'{}', '{}', 'upload', '2024-01-01'), ('s1', 'sample', 'onnx', 's1.onnx', '[4]', "
            "2, '{}', '{}', 'sample', '2024-01-01')"))
        key = cache_key("predict", "m1", None, {})
        conn.execute(text(
            "INSERT INTO jobs (id, analysis, model_id, params, cache_key, status, progress, "
            "message, cancel_requested, restarts, created_at, updated_at) VALUES ('j1', "
            "'predict', 'm1', '{}', :key, 'finished', 1, 'finished', 0, 0, '2024-01-01', "
            "'2024-01-01')"), {"key": key})
    old.dispose()

    store, storage = JobStore(url), Storage(tmp_path, url)
    assert {m.id for m in storage.models("")} == {"m1", "s1"}
    assert {m.id for m in storage.models("alice")} == {"s1"}
    assert storage.model("m1", "alice") is None and storage.model("m1", "").id == "m1"
    assert [j.id for j in store.list(owner="")] == ["j1"] and store.list(owner="alice") == []
    assert store.get("j1", "alice") is None and store.get("j1", "").id == "j1"
    job, reused = store.create_or_reuse("predict", "m1", None, {})  # the old cache still hits
    assert reused and job.id == "j1"
    job, reused = store.create_or_reuse("predict", "m1", None, {}, owner="alice")
    assert not reused and job.owner == "alice"
    assert [j.id for j in store.list(owner="alice")] == [job.id]
