"""Job records: creation with result caching, atomic claim, progress, final states, restart.

Every state change is one short transaction, so the API process and any number of Dask
workers can share the database. Status moves queued -> running -> finished|failed|cancelled.

Owners: a job belongs to the API token's owner that asked for it, and its cache key includes
that owner, so a cached job is only ever reused for the same owner (owners never see each
other's job ids; the price is that two owners asking the same thing compute it twice).
``owner=None`` in the read methods means every owner (workers, start-up).
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid

from sqlalchemy import or_, select, update

from backend.db import BatchChild, BatchRecord, JobRecord, owned_by, sessions_for, utcnow

FINAL = ("finished", "failed", "cancelled")
ACTIVE = ("queued", "running")
MAX_RESTARTS = 3


def cache_key(analysis: str, model_id: str, input_id: str | None, params: dict,
              owner: str = "") -> str:
    """Hash of the canonical JSON of a request and its owner: equal requests of one owner,
    equal keys (the default owner's keys are those from before owners existed)."""
    canon = json.dumps([analysis, model_id, input_id, params, *([owner] if owner else [])],
                       sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


class JobStore:
    """Job table access for one database URL (usable in the API and in workers)."""

    def __init__(self, url: str) -> None:
        self.sessions = sessions_for(url)
        self._create_lock = threading.Lock()

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        with self.sessions() as s:
            job = s.get(JobRecord, job_id)
        return job if job is None or owner is None or (job.owner or "") == owner else None

    def list(self, limit: int = 200, model_id: str | None = None,
             owner: str | None = None) -> list[JobRecord]:
        q = select(JobRecord).order_by(JobRecord.created_at.desc()).limit(limit)
        if model_id:
            q = q.where(JobRecord.model_id == model_id)
        if owner is not None:
            q = q.where(owned_by(JobRecord.owner, owner))
        with self.sessions() as s:
            return list(s.scalars(q))

    def reusable(self, key: str) -> JobRecord | None:
        """The newest finished or active job with cache key ``key``: one indexed lookup."""
        with self.sessions() as s:
            return s.scalars(
                select(JobRecord).where(JobRecord.cache_key == key,
                                        JobRecord.status.in_(("finished", *ACTIVE)))
                .order_by(JobRecord.created_at.desc()).limit(1)
            ).first()

    def create_or_reuse(
        self, analysis: str, model_id: str, input_id: str | None, params: dict,
        limits: tuple[float | None, float | None] = (None, None), owner: str = "",
    ) -> tuple[JobRecord, bool]:
        """A new queued job, or ``owner``'s existing finished/active one for the same request.

        ``limits`` is ``(time_limit_s, memory_limit_mb)`` for a new job (None: the
        worker's default). Returns ``(job, reused)``; failed and cancelled jobs are not
        reused (a retry runs).
        """
        key = cache_key(analysis, model_id, input_id, params, owner)
        existing = self.reusable(key)  # the common case under load, without the lock
        if existing is not None:
            return existing, True
        with self._create_lock:
            existing = self.reusable(key)
            if existing is not None:
                return existing, True
            job = JobRecord(id=uuid.uuid4().hex, analysis=analysis, model_id=model_id,
                            input_id=input_id, params=params, cache_key=key, status="queued",
                            progress=0.0, message="queued", cancel_requested=False, restarts=0,
                            time_limit_s=limits[0], memory_limit_mb=limits[1], owner=owner,
                            created_at=utcnow(), updated_at=utcnow())
            with self.sessions() as s:
                s.add(job)
                s.commit()
            return job, False

    def _update(self, job_id: str, *conds, **values) -> bool:
        with self.sessions() as s:
            res = s.execute(update(JobRecord).where(JobRecord.id == job_id, *conds)
                            .values(updated_at=utcnow(), **values))
            s.commit()
            return res.rowcount > 0

    def claim(self, job_id: str, attempt: str = "") -> bool:
        """queued -> running, atomically: only one task ever runs a job.

        The same ``attempt`` (Dask task key) may claim a running job again: Dask re-runs a
        task whose worker died, and that retry must take the job over.
        """
        mine = JobRecord.attempt == attempt if attempt else JobRecord.status != "running"
        return self._update(job_id, or_(JobRecord.status == "queued",
                                        (JobRecord.status == "running") & mine),
                            JobRecord.cancel_requested.is_(False),
                            status="running", progress=0.0, attempt=attempt or None,
                            message="started")

    def _mine(self, attempt: str | None) -> tuple:
        return (JobRecord.attempt == attempt,) if attempt else ()

    def progress(self, job_id: str, fraction: float, message: str,
                 attempt: str | None = None) -> bool:
        """Record progress of a running job; returns whether cancellation was requested."""
        self._update(job_id, JobRecord.status == "running", *self._mine(attempt),
                     progress=fraction, message=message[:1000])
        with self.sessions() as s:
            return bool(s.scalar(select(JobRecord.cancel_requested)
                                 .where(JobRecord.id == job_id)))

    def finish(self, job_id: str, result_json: str, attempt: str | None = None) -> bool:
        return self._update(job_id, JobRecord.status == "running", *self._mine(attempt),
                            status="finished", progress=1.0, message="finished",
                            result=result_json)

    def fail(self, job_id: str, error: str, attempt: str | None = None) -> bool:
        """Mark a job that has not ended as failed with ``error`` as the reason (only if
        ``attempt``, when given, still owns it)."""
        return self._update(job_id, JobRecord.status.in_(ACTIVE), *self._mine(attempt),
                            status="failed", message="failed", error=error[:4000])

    def forget_cached(self, model_id: str, owner: str) -> None:
        """Stop reusing ``owner``'s finished jobs on the model (its card changed)."""
        with self.sessions() as s:
            s.execute(update(JobRecord).where(JobRecord.model_id == model_id,
                                              owned_by(JobRecord.owner, owner),
                                              JobRecord.status == "finished")
                      .values(cache_key="stale"))
            s.commit()

    def mark_cancelled(self, job_id: str, attempt: str | None = None) -> bool:
        return self._update(job_id, JobRecord.status.in_(ACTIVE), *self._mine(attempt),
                            status="cancelled", message="cancelled")

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Flag a job for cancellation; a queued job is cancelled at once."""
        self._update(job_id, JobRecord.status.in_(ACTIVE), cancel_requested=True)
        self._update(job_id, JobRecord.status == "queued", status="cancelled",
                     message="cancelled")
        return self.get(job_id)

    def requeue_interrupted(self, max_restarts: int = MAX_RESTARTS) -> list[str]:
        """After a restart: re-queue every queued/running job, or fail it after too many.

        Returns the ids of the jobs to submit again.
        """
        requeued: list[str] = []
        with self.sessions() as s:
            jobs = list(s.scalars(select(JobRecord).where(JobRecord.status.in_(ACTIVE))))
            for job in jobs:
                job.restarts += 1
                job.updated_at = utcnow()
                if job.cancel_requested:
                    job.status, job.message = "cancelled", "cancelled"
                elif job.restarts >= max_restarts:
                    job.status, job.message = "failed", "failed"
                    job.error = f"interrupted by restart {job.restarts} times"
                else:
                    job.status, job.progress = "queued", 0.0
                    job.message = f"re-queued after restart ({job.restarts})"
                    requeued.append(job.id)
            s.commit()
        return requeued

    # -- batches: one parent record, children are ordinary (cacheable) jobs ------------------

    def create_batch(self, analysis: str, params: dict, job_ids: list[str],
                     owner: str = "") -> BatchRecord:
        batch = BatchRecord(id=uuid.uuid4().hex, analysis=analysis, params=params,
                            total=len(job_ids), owner=owner, created_at=utcnow())
        with self.sessions() as s:
            s.add(batch)
            s.add_all(BatchChild(batch_id=batch.id, position=i, job_id=job_id)
                      for i, job_id in enumerate(job_ids))
            s.commit()
        return batch

    def batch(self, batch_id: str, owner: str | None = None,
              ) -> tuple[BatchRecord, list[JobRecord]] | None:
        """The batch and its child jobs in submission order (None if unknown or not
        ``owner``'s)."""
        with self.sessions() as s:
            batch = s.get(BatchRecord, batch_id)
            if batch is None or owner is not None and (batch.owner or "") != owner:
                return None
            rows = s.execute(select(BatchChild.position, JobRecord)
                             .join(JobRecord, JobRecord.id == BatchChild.job_id)
                             .where(BatchChild.batch_id == batch_id)
                             .order_by(BatchChild.position)).all()
            return batch, [job for _, job in rows]

    def batches(self, limit: int = 200, owner: str | None = None) -> list[BatchRecord]:
        q = select(BatchRecord).order_by(BatchRecord.created_at.desc()).limit(limit)
        if owner is not None:
            q = q.where(owned_by(BatchRecord.owner, owner))
        with self.sessions() as s:
            return list(s.scalars(q))
