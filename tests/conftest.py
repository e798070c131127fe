"""Shared fixtures: where the shared data lives, and skipping cleanly when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLE_MODELS = ROOT / "sample_models"


def shared_path(*parts: str) -> Path:
    """Path under ``../shared/data``; skips the calling test when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture
def shared() -> Path:
    return shared_path()


@pytest.fixture(scope="session")
def scaled(tmp_path_factory: pytest.TempPathFactory):
    """One scaled deployment for the whole session (API + ``dask scheduler`` + two ``dask
    worker`` + a fresh PostgreSQL database; starting one takes many seconds), shared by the
    access, fuzz, reliability and scale-out tests: ``{"server", "cluster", "db"}``. Tokens as
    in ``tests.service.TOKEN_ENV`` (``server.client`` sends the default one), sample models
    registered, uploads up to 2 MB. A test that restarts the API puts the new server in;
    skips when PostgreSQL is not reachable."""
    from sqlalchemy.exc import OperationalError

    from tests.service import TOKEN, TOKEN_ENV
    from tests.service.cluster import PostgresDatabase, scaled_deployment

    try:
        PostgresDatabase().drop()
    except OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    with scaled_deployment(tmp_path_factory.mktemp("scaled"), TOKEN, **TOKEN_ENV,
                           ATLAS_REGISTER_SAMPLES="true", ATLAS_MAX_UPLOAD_MB="2") as parts:
        holder = dict(zip(("server", "cluster", "db"), parts, strict=True))
        yield holder
        holder["server"].kill()  # a restarted server replaces the first one
