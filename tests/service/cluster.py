"""A real scale-out deployment on loopback: ``dask scheduler`` + ``dask worker`` processes
(the venv's Dask CLI) and a fresh PostgreSQL database, for the scale-out and reliability
tests and the service benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text

from tests.service import ROOT, SLOW_ANALYSIS, Server, free_port

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DASK = Path(sys.executable).with_name("dask")


class PostgresDatabase:
    """A fresh database on the local PostgreSQL server, dropped on ``drop()``."""

    def __init__(self) -> None:
        self.name = f"atlas_test_{uuid.uuid4().hex[:12]}"
        self.admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT",
                                   connect_args={"connect_timeout": 3})
        with self.admin.connect() as conn:  # raises when PostgreSQL is not reachable
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = PG_ADMIN.rsplit("/", 1)[0] + f"/{self.name}"

    def drop(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


class DaskCluster:
    """``dask scheduler`` and ``n`` ``dask worker`` processes (one thread each, with a
    nanny that restarts a killed worker), each in its own process group."""

    def __init__(self, log_dir: Path, n_workers: int = 2) -> None:
        self.log_dir, self.n_workers = log_dir, n_workers
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                    "DASK_DISTRIBUTED__WORKER__DAEMON": "False",
                    "ATLAS_EXTRA_ANALYSES": SLOW_ANALYSIS}

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([str(DASK), *args], cwd=ROOT, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 90.0, wait: bool = True) -> DaskCluster:
        """Spawn the processes; workers warm up (imports, job processes) before they join,
        so ``wait=False`` lets them do that while the caller starts the API."""
        self._spawn("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                    "--no-dashboard")
        for k in range(self.n_workers):
            self._spawn(f"worker{k}", "worker", self.address, "--nthreads", "1",
                        "--nworkers", "1", "--no-dashboard", "--name", f"w{k}",
                        "--host", "127.0.0.1", "--memory-limit", "0",
                        "--preload", "backend.jobs.worker")
        return self.wait(timeout) if wait else self

    def wait(self, timeout: float = 90.0) -> DaskCluster:
        """Block until every worker has joined the scheduler."""
        from distributed import Client

        with Client(self.address, timeout=timeout) as client:
            client.wait_for_workers(self.n_workers, timeout=timeout)
        return self

    def worker_pids(self) -> dict[str, int]:
        """Worker name -> pid of its worker process (not the nanny)."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"]
                     .items()}
            return {names[a]: pid for a, pid in client.run(os.getpid).items()}

    def processing(self) -> dict[str, list[str]]:
        """Worker name -> keys of the tasks it is running or about to run."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"]
                     .items()}
            return {names[a]: list(keys) for a, keys in client.processing().items()}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1):  # noqa: ANN001
    """Poll ``predicate()`` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")


@contextmanager
def scaled_deployment(root: Path, token: str = "", **env: str) -> Iterator[
        tuple[Server, DaskCluster, PostgresDatabase]]:
    """API + ``dask scheduler`` + two ``dask worker`` + a fresh PostgreSQL database; ``env``
    adds to or overrides the API's settings, ``token`` is what its client sends.

    Raises whatever connecting to PostgreSQL raises when it is not reachable.
    """
    db = PostgresDatabase()
    cluster = server = None
    try:
        cluster = DaskCluster(root).start(wait=False)
        server = Server(root / "data", token, **{
            "ATLAS_DASK_SCHEDULER_ADDRESS": cluster.address, "ATLAS_DATABASE_URL": db.url,
            "ATLAS_REGISTER_SAMPLES": "false", **env}).start()
        yield server, cluster.wait(), db
    finally:
        if server is not None:
            server.kill()
        if cluster is not None:
            cluster.stop()
        db.drop()
