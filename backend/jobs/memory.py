"""Memory limits of a job process.

On a CPU worker the job's address space is capped (``RLIMIT_AS``): an allocation past the cap
fails at once with a ``MemoryError``. CUDA maps very large virtual ranges for its own
bookkeeping, so an address-space cap breaks a GPU worker; there a watchdog thread reads the
process's resident memory from ``/proc`` instead, and stops the process when the job has
grown past its limit (after ``on_exceed`` has recorded why).
"""

from __future__ import annotations

import os
import resource
import signal
import threading
from collections.abc import Callable
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
WATCH_INTERVAL_S = 0.05


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from ``/proc/<pid>/statm``."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def limit_address_space(limit_mb: float) -> tuple[int, int]:
    """Cap the address space at what this process uses now plus ``limit_mb``; returns the
    previous limits, for :func:`restore_address_space`."""
    before = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status").read_text()
    used_kb = int(status.split("VmSize:")[1].split()[0])
    cap = used_kb * 1024 + int(limit_mb * 1024 * 1024)
    hard = before[1]
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard < 0 else min(cap, hard), hard))
    return before


def restore_address_space(before: tuple[int, int]) -> None:
    resource.setrlimit(resource.RLIMIT_AS, before)


class RssWatchdog:
    """While active, stop this process once its resident memory exceeds what it held on entry
    plus ``limit_mb``: ``on_exceed(rss_bytes)`` runs first (e.g. marks the job failed as out
    of memory), then the process kills itself (the parent sees it die and starts a new one).
    """

    def __init__(self, limit_mb: float, on_exceed: Callable[[int], None],
                 interval: float = WATCH_INTERVAL_S) -> None:
        self.limit = int(limit_mb * 1024 * 1024)
        self.on_exceed, self.interval = on_exceed, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssWatchdog:
        cap = rss_bytes() + self.limit
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(cap,), daemon=True,
                                        name="atlas-rss-watchdog")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self, cap: int) -> None:
        while not self._stop.wait(self.interval):
            rss = rss_bytes()
            if rss > cap:
                try:
                    self.on_exceed(rss)
                finally:
                    os.kill(os.getpid(), signal.SIGKILL)
