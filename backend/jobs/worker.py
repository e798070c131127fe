"""The Dask task: run one job in a worker process and record everything in the job DB.

The task gets only the job id and where the data lives; it loads the model and input
itself, so any worker that shares the data dir and database can run any job.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from distributed import WorkerPlugin

from app import AtlasError, Cancelled
from backend.analyses import REGISTRY, load_all
from backend.analyses.base import JobContext, jsonable
from backend.jobs.store import JobStore
from backend.storage import Storage

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.25


class Progress:
    """Progress callback: writes to the DB at most every ``interval`` seconds (and at the
    end) and raises :class:`app.Cancelled` once the job is flagged for cancellation."""

    def __init__(self, store: JobStore, job_id: str, interval: float = PROGRESS_INTERVAL_S):
        self.store, self.job_id, self.interval = store, job_id, interval
        self.last = float("-inf")

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and fraction < 1.0:
            return
        self.last = now
        if self.store.progress(self.job_id, min(1.0, max(0.0, float(fraction))), message):
            raise Cancelled("cancelled by the user")


class Preload(WorkerPlugin):
    """Imports torch and every analysis plug-in when a worker joins, so the first job on a
    fresh worker does not pay seconds of imports."""

    name = "atlas-preload"

    def __init__(self, extra_analyses: str = "") -> None:
        self.extra_analyses = extra_analyses

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed.Worker
        load_all(self.extra_analyses)


def run_job(job_id: str, data_dir: str, db_url: str, extra_analyses: str = "") -> str:
    """Run job ``job_id`` to a final state; returns that state (or "skipped" if another
    worker has it or it was cancelled before it started)."""
    load_all(extra_analyses)
    store, storage = JobStore(db_url), Storage(Path(data_dir), db_url)
    if not store.claim(job_id):
        return "skipped"
    job = store.get(job_id)
    try:
        result = _execute(job, store, storage)
        text = json.dumps(jsonable(result), allow_nan=False)
    except Cancelled:
        store.mark_cancelled(job_id)
        return "cancelled"
    except (AtlasError, LookupError, ValueError) as exc:
        store.fail(job_id, str(exc) or type(exc).__name__)
        return "failed"
    except Exception as exc:  # noqa: BLE001 - every engine failure must end the job
        log.exception("job %s failed", job_id)
        store.fail(job_id, f"{type(exc).__name__}: {exc}")
        return "failed"
    if store.get(job_id).cancel_requested:
        store.mark_cancelled(job_id)
        return "cancelled"
    store.finish(job_id, text)
    return "finished"


def _execute(job, store: JobStore, storage: Storage) -> dict:  # noqa: ANN001 - JobRecord
    analysis = REGISTRY.get(job.analysis)
    if analysis is None:
        raise LookupError(f"unknown analysis '{job.analysis}'")
    params = analysis.params.model_validate(job.params)
    model = storage.model(job.model_id)
    if model is None:
        raise LookupError(f"model {job.model_id} no longer exists")
    net = storage.network(model)

    def load_input(input_id: str) -> tuple[torch.Tensor, int | None]:
        try:
            x, label, _ = storage.load_input(model, input_id)
        except KeyError:
            raise LookupError(f"unknown input '{input_id}' for this model") from None
        return torch.as_tensor(x, dtype=net.dtype), label

    x, label = load_input(job.input_id) if job.input_id else (None, None)
    if analysis.needs_input and x is None:
        raise LookupError(f"analysis '{analysis.name}' needs an input_id")
    artifacts = storage.data_dir / "artifacts" / job.id
    artifacts.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(
        net=net, x=x, label=label, card=dict(model.card or {}), artifacts=artifacts,
        progress=Progress(store, job.id), model_id=model.id, input_id=job.input_id,
        _load_input=load_input, _gallery=lambda n: storage.gallery(model, n),
    )
    ctx.progress(0.0, "started")
    result = analysis.run(ctx, params)
    if not isinstance(result, dict):
        raise TypeError(f"analysis '{analysis.name}' returned {type(result).__name__}, not dict")
    return result
