"""Fan-out: one analysis over many (model, input) pairs as many Dask tasks under one parent.

The parent is a batch record; its children are ordinary jobs (so each is cached, retried and
limited like any job, and a child finished earlier is reused). The parent's status, progress
and result are computed from its children whenever asked, so they can never disagree.

    batch = fanout(runner, "predict", {}, [(model_id, "gallery:digits:0"), ...])
    summary(batch, children)   # status, progress, counts per status
    aggregate(batch, children) # every child's result, in request order
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

from backend.db import BatchRecord, JobRecord
from backend.jobs.runner import JobRunner
from backend.jobs.store import ACTIVE, FINAL

Pair = tuple[str, str | None]


def fanout(runner: JobRunner, analysis: str, params: dict, pairs: Iterable[Pair],
           limits: tuple[float | None, float | None] = (None, None),
           owner: str = "") -> BatchRecord:
    """Create (or reuse) one child job per ``(model_id, input_id)`` and the parent batch,
    all ``owner``'s.

    ``params`` must already be validated; the pairs must exist (the API checks both).
    """
    job_ids = [runner.run_or_reuse(analysis, model_id, input_id, params, limits, owner)[0].id
               for model_id, input_id in pairs]
    return runner.store.create_batch(analysis, params, job_ids, owner)


def summary(batch: BatchRecord, children: list[JobRecord]) -> dict:
    """The parent's state: queued until a child starts, running while any is active,
    finished once every child has ended (whatever their outcome; see ``counts``)."""
    counts = Counter(job.status for job in children)
    done = sum(counts[s] for s in FINAL)
    active = sum(counts[s] for s in ACTIVE)
    if active == 0:
        status = "finished"
    else:
        status = "queued" if counts["queued"] == len(children) else "running"
    progress = sum(1.0 if job.status in FINAL else job.progress for job in children)
    failed = counts["failed"] + counts["cancelled"]
    message = f"{done} of {len(children)} done" + (f", {failed} failed or cancelled"
                                                    if failed else "")
    return {"id": batch.id, "analysis": batch.analysis, "params": batch.params,
            "total": batch.total, "status": status,
            "progress": progress / len(children) if children else 1.0,
            "counts": {s: counts[s] for s in (*ACTIVE, *FINAL)}, "message": message,
            "created_at": batch.created_at}


def aggregate(batch: BatchRecord, children: list[JobRecord]) -> dict:
    """Every child's outcome in request order: its result, or why it has none."""
    return {
        "batch_id": batch.id, "analysis": batch.analysis, "params": batch.params,
        "items": [{"job_id": job.id, "model_id": job.model_id, "input_id": job.input_id,
                   "status": job.status, "error": job.error,
                   "result": json.loads(job.result) if job.status == "finished" else None}
                  for job in children],
    }


def cancel(runner: JobRunner, children: list[JobRecord]) -> None:
    """Cancel every child still active (children shared with other batches included)."""
    for job in children:
        if job.status in ACTIVE:
            runner.store.request_cancel(job.id)
            runner.cancel(job.id)
