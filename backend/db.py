"""SQL tables for models, uploaded inputs and jobs (SQLAlchemy 2; SQLite or PostgreSQL).

The API process and every Dask worker open the same database, so any worker can report
progress on any job and a restarted API finds every job it had.

Owners: every upload, job and batch records the API token's owner that made it (``""`` is
the default owner: no token, or ``ATLAS_API_TOKEN``); rows written before owners existed
have NULL there and belong to the default owner. Models are stored once per content hash, so
who may see an uploaded model is the ``model_owners`` table (sample models: everyone).
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache

from sqlalchemy import (
    JSON,
    Boolean,
    ColumnElement,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    or_,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ModelRecord(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the file
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(200))  # under data_dir/models
    input_shape: Mapped[list] = mapped_column(JSON)
    num_outputs: Mapped[int] = mapped_column(Integer)
    card: Mapped[dict] = mapped_column(JSON, default=dict)
    summary: Mapped[dict] = mapped_column(JSON, default=dict)
    source: Mapped[str] = mapped_column(String(16), default="upload")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelOwner(Base):
    """Who may see an uploaded model: one row per owner that uploaded the same file, with
    that owner's own name and card for it (NULL on rows from before: the model's own)."""

    __tablename__ = "model_owners"

    model_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    card: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class InputRecord(Base):
    __tablename__ = "inputs"

    model_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(80), primary_key=True)  # upload:<sha256>
    label: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(200))  # .npy under data_dir/inputs
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobRecord(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    analysis: Mapped[str] = mapped_column(String(100))
    model_id: Mapped[str] = mapped_column(String(64), index=True)
    input_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    cache_key: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)  # the analysis' JSON
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The Dask task that runs the job: only it may report progress or a final state, and a
    # retry of the same task (its worker died) may claim the job again.
    attempt: Mapped[str | None] = mapped_column(String(100), nullable=True)
    time_limit_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    memory_limit_mb: Mapped[float | None] = mapped_column(Float, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, default="", index=True)


class BatchRecord(Base):
    """A parent job: one analysis fanned out over many (model, input) pairs."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    analysis: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    total: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, default="")


class BatchChild(Base):
    """A batch's child jobs in order; a cached job may be the child of several batches."""

    __tablename__ = "batch_children"

    batch_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)


def owned_by(column: ColumnElement, owner: str) -> ColumnElement[bool]:
    """Rows of ``owner``; rows from before owners existed (NULL) are the default owner's."""
    return column == owner if owner else or_(column == "", column.is_(None))


# The API serves requests from up to 40 threads (anyio's default): connections beyond the
# pool's size would be opened and closed per request, so the pool keeps that many open.
POOL = {"pool_size": 20, "max_overflow": 30}


@cache
def engine_for(url: str) -> Engine:
    """One engine per URL and process; SQLite gets WAL and a busy timeout for many writers."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               **POOL)

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record) -> None:  # noqa: ANN001 - DBAPI connection
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True, **POOL)
    had_owners = inspect(engine).has_table(ModelOwner.__tablename__)
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    if not had_owners:
        _give_uploads_to_default_owner(engine)
    return engine


def _give_uploads_to_default_owner(engine: Engine) -> None:
    """Models uploaded before owners existed belong to the default owner (as their jobs)."""
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO model_owners (model_id, owner) SELECT id, '' "
                              "FROM models WHERE source <> 'sample' AND id NOT IN "
                              "(SELECT model_id FROM model_owners)"))
    except IntegrityError:  # another process did it at the same time
        pass


def _add_missing_columns(engine: Engine) -> None:
    """Additive migration: a database written by an older version gets the new (nullable)
    columns, so upgrading keeps every existing record."""
    existing = inspect(engine)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have and column.nullable:
                kind = column.type.compile(dialect=engine.dialect)
                try:
                    with engine.begin() as conn:
                        conn.execute(text(
                            f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
                except DBAPIError:  # another process added it first
                    if column.name not in {c["name"] for c in
                                           inspect(engine).get_columns(table.name)}:
                        raise


@cache
def sessions_for(url: str) -> sessionmaker:
    return sessionmaker(engine_for(url), expire_on_commit=False)
