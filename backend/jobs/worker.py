"""The Dask task: run one job in a child process and record everything in the job DB.

The task gets only the job id and where the data lives; it loads the model and input
itself, so any worker that shares the data dir and database can run any job.

Each job runs in a child process (forked from a forkserver that has torch and every analysis
imported, and kept warm for the next job): a job that exceeds its time limit is killed with
that process, one that exceeds its memory limit fails, and in both cases the Dask worker
survives. The memory limit is an address-space rlimit in the child on a CPU worker and a
watchdog of the child's resident memory on a GPU worker (``memory``), which loads the job's
network onto the device that ``ATLAS_DEVICE`` asks for (``resolve_device``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from functools import cache, partial
from multiprocessing import forkserver
from pathlib import Path

import torch
from distributed import WorkerPlugin

from app import AtlasError, Cancelled
from backend.analyses import REGISTRY, load_all
from backend.analyses.base import JobContext, jsonable
from backend.config import resolve_device
from backend.datasets import DatasetStore
from backend.jobs.memory import RssWatchdog, limit_address_space, restore_address_space
from backend.jobs.store import ACTIVE, JobStore
from backend.storage import Storage

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.25
CANCEL_POLL_S = 0.5
CHILDREN = multiprocessing.get_context("forkserver")
PR_SET_PDEATHSIG = 1


class Progress:
    """Progress callback: writes to the DB at most every ``interval`` seconds (and at the
    end) and raises :class:`app.Cancelled` once the job is flagged for cancellation."""

    def __init__(self, store: JobStore, job_id: str, interval: float = PROGRESS_INTERVAL_S,
                 attempt: str | None = None):
        self.store, self.job_id, self.interval, self.attempt = store, job_id, interval, attempt
        self.last = float("-inf")

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and fraction < 1.0:
            return
        self.last = now
        if self.store.progress(self.job_id, min(1.0, max(0.0, float(fraction))), message,
                               self.attempt):
            raise Cancelled("cancelled by the user")


def start_job_processes() -> None:
    """Start this process' forkserver with the analyses imported (seconds, once)."""
    forkserver.set_forkserver_preload([__name__])
    forkserver.ensure_running()


class Preload(WorkerPlugin):
    """Imports torch and every analysis plug-in when a worker joins, and starts the
    forkserver jobs run in, so the first job on a fresh worker does not pay seconds of
    imports."""

    name = "atlas-preload"

    def __init__(self, extra_analyses: str | None = None) -> None:
        self.extra_analyses = extra_analyses  # None: ATLAS_EXTRA_ANALYSES

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed.Worker
        load_all(self.extra_analyses)
        if not multiprocessing.current_process().daemon:
            start_job_processes()


def dask_setup(worker) -> None:  # noqa: ANN001 - distributed.Worker
    """``dask worker --preload backend.jobs.worker``: warm up before joining the scheduler
    (the API's :class:`Preload` plugin does the same for workers that are already up)."""
    Preload().setup(worker)


def run_job(job_id: str, data_dir: str, db_url: str, extra_analyses: str = "",
            attempt: str = "", time_limit_s: float = 3600,
            memory_limit_mb: float = 4096, device: str = "cpu") -> str:
    """Run job ``job_id`` to a final state in this thread's job process; returns that state
    (or "skipped" if another task has it or it was cancelled before it started).

    ``attempt`` names this task (a retry after a worker died has the same one); the limits
    are the defaults for jobs that do not set their own, and the maxima for those that do;
    ``device`` is ``ATLAS_DEVICE`` (see :func:`backend.config.resolve_device`).
    """
    store = JobStore(db_url)
    if not store.claim(job_id, attempt):
        return "skipped"
    job = store.get(job_id)
    time_limit = min(job.time_limit_s or time_limit_s, time_limit_s)
    memory_limit = min(job.memory_limit_mb or memory_limit_mb, memory_limit_mb)
    if multiprocessing.current_process().daemon:
        store.fail(job_id, "this Dask worker runs as a daemon and cannot start job processes: "
                           "start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False", attempt)
        return "failed"
    if not hasattr(_THREAD, "process"):
        _THREAD.process = JobProcess()

    def cancelled() -> bool:
        return bool(store.get(job_id).cancel_requested)

    outcome = _THREAD.process.run((job_id, data_dir, db_url, extra_analyses, attempt,
                                   memory_limit, device), time_limit, cancelled)
    if outcome == "cancelled":
        store.mark_cancelled(job_id, attempt)
    elif outcome == "timeout":
        store.fail(job_id, f"the job exceeded its time limit of {time_limit:g} s", attempt)
    elif store.get(job_id).status in ACTIVE:  # the process died without recording an end
        store.fail(job_id, f"the analysis process died ({outcome}); it may have exceeded "
                           f"the memory limit of {memory_limit:g} MB", attempt)
    return store.get(job_id).status


_THREAD = threading.local()


class JobProcess:
    """A child process that runs one job at a time and stays warm between jobs (imports,
    database engine, loaded networks); replaced when it dies or is killed for a limit."""

    def __init__(self) -> None:
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.conn = None
        self._starting: threading.Thread | None = None

    def _ready(self, cancelled: Callable[[], bool]) -> bool:
        """Start the process if needed; False if the job was cancelled meanwhile (a cold
        forkserver imports torch and every analysis first: seconds). The start goes on in
        the background and the next job uses the process."""
        if self._starting is None and (self.proc is None or not self.proc.is_alive()):
            self.conn, child_end = CHILDREN.Pipe()
            self.proc = CHILDREN.Process(target=_serve, args=(child_end,), daemon=True,
                                         name="atlas-job-process")

            def start() -> None:
                self.proc.start()
                child_end.close()

            self._starting = threading.Thread(target=start, daemon=True)
            self._starting.start()
        while self._starting is not None:
            self._starting.join(CANCEL_POLL_S)
            if not self._starting.is_alive():
                self._starting = None
            elif cancelled():
                return False
        return True

    def run(self, args: tuple, time_limit: float,
            cancelled: Callable[[], bool] = lambda: False) -> str:
        """Run one job: "done", "timeout" or "cancelled" (the process was killed), or why it
        died. ``cancelled`` is asked every ``CANCEL_POLL_S``: an analysis that reports
        progress stops itself sooner, one stuck in a solver call is killed."""
        if not self._ready(cancelled):
            return "cancelled"
        try:
            self.conn.send(args)
            deadline = time.monotonic() + time_limit
            while not self.conn.poll(min(CANCEL_POLL_S, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    self._discard()
                    return "timeout"
                if cancelled():
                    self._discard()
                    return "cancelled"
            return self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            code = self.proc.exitcode
            self._discard()
            return f"exit code {code}"

    def _discard(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()
        self.proc = self.conn = None


def _serve(conn) -> None:  # noqa: ANN001 - multiprocessing Connection
    """The job process: run the jobs the parent sends until the parent goes away."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the worker
    while True:
        try:
            args = conn.recv()
        except EOFError:
            return
        job_id, _, db_url, _, attempt, memory_limit_mb, device = args
        if _device(device).type == "cuda":  # CUDA maps huge virtual ranges: watch the RSS
            with RssWatchdog(memory_limit_mb, partial(_out_of_memory, db_url, job_id,
                                                      memory_limit_mb, attempt)):
                _run_here(*args)
        else:
            before = limit_address_space(memory_limit_mb)
            try:
                _run_here(*args)
            finally:
                restore_address_space(before)
        conn.send("done")


@cache
def _device(requested: str) -> torch.device:
    """The job device for ``ATLAS_DEVICE``; a fallback to the CPU is logged once."""
    device, note = resolve_device(requested)
    if note:
        log.warning(note)
    return device


def _out_of_memory(db_url: str, job_id: str, limit_mb: float, attempt: str, _rss: int) -> None:
    JobStore(db_url).fail(job_id, _memory_error(limit_mb), attempt)


def _memory_error(limit_mb: float) -> str:
    return f"the job exceeded its memory limit of {limit_mb:g} MB"


def _run_here(job_id: str, data_dir: str, db_url: str, extra_analyses: str,
              attempt: str, memory_limit_mb: float, device: str = "cpu") -> None:
    load_all(extra_analyses)
    store, storage = JobStore(db_url), Storage(Path(data_dir), db_url)
    job = store.get(job_id)
    memory_error = _memory_error(memory_limit_mb)
    try:
        result = _execute(job, store, storage, attempt, device)
        text = json.dumps(jsonable(result), allow_nan=False)
    except Cancelled:
        store.mark_cancelled(job_id, attempt)
        return
    except MemoryError:
        store.fail(job_id, memory_error, attempt)
        return
    except (AtlasError, LookupError) as exc:  # the request's fault: its message is for the user
        store.fail(job_id, str(exc) or type(exc).__name__, attempt)
        return
    except Exception as exc:  # noqa: BLE001 - every engine failure must end the job
        if "can't allocate memory" in str(exc):  # torch's allocator under the rlimit
            store.fail(job_id, memory_error, attempt)
            return
        log.exception("job %s failed with an unexpected error", job_id)
        store.fail(job_id, f"internal error ({type(exc).__name__}: {exc}); the worker log "
                           "has the traceback", attempt)
        return
    if store.get(job_id).cancel_requested:
        store.mark_cancelled(job_id, attempt)
        return
    store.finish(job_id, text, attempt)


def _execute(job, store: JobStore, storage: Storage, attempt: str,  # noqa: ANN001
             device: str = "cpu") -> dict:
    analysis = REGISTRY.get(job.analysis)
    if analysis is None:
        raise LookupError(f"unknown analysis '{job.analysis}'")
    params = analysis.params.model_validate(job.params)
    model = storage.model(job.model_id, job.owner or "")  # with the owner's card
    if model is None:
        raise LookupError(f"model {job.model_id} no longer exists")
    net = storage.network(model).to(_device(device))  # inputs stay on the CPU: the engine moves them

    def load_input(input_id: str) -> tuple[torch.Tensor, int | None]:
        try:
            x, label, _ = storage.load_input(model, input_id, job.owner or "")
        except KeyError:
            raise LookupError(f"unknown input '{input_id}' for this model") from None
        return torch.as_tensor(x, dtype=net.dtype), label

    def load_dataset(dataset_id: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            x, y = DatasetStore(storage.data_dir).load(model.id, dataset_id, job.owner or "")
        except KeyError:
            raise LookupError(f"unknown dataset '{dataset_id}' for this model") from None
        return torch.as_tensor(x, dtype=net.dtype), None if y is None else torch.from_numpy(y)

    x, label = load_input(job.input_id) if job.input_id else (None, None)
    if analysis.needs_input and x is None:
        raise LookupError(f"analysis '{analysis.name}' needs an input_id")
    artifacts = storage.data_dir / "artifacts" / job.id
    artifacts.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(
        net=net, x=x, label=label, card=dict(model.card or {}), artifacts=artifacts,
        progress=Progress(store, job.id, attempt=attempt), model_id=model.id,
        input_id=job.input_id, _load_input=load_input,
        _gallery=lambda n: storage.gallery(model, n),
        _load_dataset=load_dataset,
    )
    ctx.progress(0.0, "started")
    result = analysis.run(ctx, params)
    if not isinstance(result, dict):
        raise TypeError(f"analysis '{analysis.name}' returned {type(result).__name__}, not dict")
    return result
