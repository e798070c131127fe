"""Submit jobs to Dask: a LocalCluster of worker processes by default, or a remote scheduler.

The runner keeps each job's future (Dask forgets tasks whose futures are dropped) and turns
task-level failures (a worker killed too often, an unpicklable error) into failed jobs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid

import dask
import psutil
from distributed import Client, Future, LocalCluster

from backend.config import Settings
from backend.db import JobRecord
from backend.jobs.store import JobStore
from backend.jobs.worker import Preload, run_job

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.cluster: LocalCluster | None = None
        self.client: Client | None = None
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._closing = False

    def start(self) -> None:
        """Connect to the configured scheduler or start the embedded LocalCluster.

        Blocking (seconds): call it outside the event loop. Workers warm up in the background.
        """
        if self.settings.dask_scheduler_address:
            self.client = Client(self.settings.dask_scheduler_address, timeout=30)
        else:
            # Jobs run in child processes of the workers (limits), so workers are no daemons;
            # set for the whole process: the nannies read it again when they restart a worker.
            dask.config.set({"distributed.worker.daemon": False})
            self.cluster = LocalCluster(
                n_workers=self.settings.dask_workers, threads_per_worker=1, processes=True,
                dashboard_address="127.0.0.1:0", host="127.0.0.1",  # no fixed port to collide
            )
            self.client = Client(self.cluster)
        threading.Thread(target=self._preload, daemon=True).start()

    def _preload(self) -> None:
        try:
            self.client.register_plugin(Preload(self.settings.extra_analyses))
        except Exception:  # noqa: BLE001 - only an optimisation
            log.warning("worker preload failed", exc_info=True)

    def close(self, grace_s: float = 2.0) -> None:
        """Disconnect; jobs still queued or running stay so in the DB for the next start.

        The embedded cluster's processes (workers and their job processes) are ended within
        ``grace_s`` seconds: left to themselves they outlive the API by tens of seconds,
        and a nanny may even restart a worker it sees die during shutdown.
        """
        self._closing = True
        children = psutil.Process().children(recursive=True) if self.cluster else []
        for closable in (self.client, self.cluster):
            if closable is not None:
                try:
                    closable.close(timeout=grace_s)
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    log.warning("error while closing %s", closable, exc_info=True)
        self.client = self.cluster = None
        alive = [p for p in children if p.is_running()]
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()

    def submit(self, job_id: str) -> None:
        if self.client is None:
            raise RuntimeError("the job runner is not started")
        key = f"atlas-job-{job_id}-{uuid.uuid4().hex[:8]}"
        future = self.client.submit(
            run_job, job_id, str(self.settings.data_dir.resolve()), self.settings.db_url,
            self.settings.extra_analyses, key, self.settings.job_time_limit_s,
            self.settings.job_memory_limit_mb, self.settings.device, key=key, pure=False,
        )
        with self._lock:
            self._futures[job_id] = future
        future.add_done_callback(lambda f: self._done(job_id, f))

    def run_or_reuse(self, analysis: str, model_id: str, input_id: str | None, params: dict,
                     limits: tuple[float | None, float | None] = (None, None),
                     owner: str = "") -> tuple[JobRecord, bool]:
        """``owner``'s cached or active job for this request, or a new one handed to Dask:
        ``(job, reused)``. ``params`` must already be validated."""
        job, reused = self.store.create_or_reuse(analysis, model_id, input_id, params, limits,
                                                 owner)
        if reused:
            return job, True
        try:
            self.submit(job.id)
        except Exception as exc:  # noqa: BLE001 - the job must not stay queued forever
            self.store.fail(job.id, f"could not submit the job: {exc}")
            job = self.store.get(job.id)
        return job, False

    def cancel(self, job_id: str) -> None:
        """Drop a queued task; a running one stops at its next progress report."""
        with self._lock:
            future = self._futures.get(job_id)
        if future is not None:
            future.cancel()

    def _done(self, job_id: str, future: Future) -> None:
        with self._lock:
            self._futures.pop(job_id, None)
        if future.status == "error" and not self._closing:
            exc = future.exception()
            self.store.fail(job_id, f"the worker failed: {type(exc).__name__}: {exc}")
