"""The GPU worker's memory limit: a resident-memory watchdog instead of an address-space cap
(CUDA maps large virtual ranges). Checked on the CPU: a child that allocates past a small
limit is stopped and reported as out of memory; one that stays below finishes."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.config import Settings, resolve_device
from backend.jobs.memory import RssWatchdog, rss_bytes

CTX = multiprocessing.get_context("fork")  # cheap: the child only allocates numpy arrays


def _allocate(limit_mb: float, total_mb: int, marker: str) -> None:
    base = rss_bytes()  # the forked test process' own memory, which the limit comes on top of

    def report(rss: int) -> None:
        Path(marker).write_text(f"out of memory after {(rss - base) // (1 << 20)} MB")

    blocks = []
    with RssWatchdog(limit_mb, report, interval=0.01):
        for _ in range(total_mb // 8):
            blocks.append(np.ones(1 << 20))  # 8 MB, touched, so resident
    Path(marker).write_text(f"finished with {len(blocks)} blocks")


def _run(tmp_path: Path, limit_mb: float, total_mb: int) -> tuple[int | None, str]:
    marker = tmp_path / "marker.txt"
    proc = CTX.Process(target=_allocate, args=(limit_mb, total_mb, str(marker)))
    proc.start()
    proc.join(60)
    assert not proc.is_alive()
    return proc.exitcode, marker.read_text() if marker.exists() else ""


def test_child_past_the_limit_is_stopped_and_reported(tmp_path: Path) -> None:
    code, text = _run(tmp_path, limit_mb=64, total_mb=1024)
    assert code == -9  # killed by the watchdog, long before allocating 1 GB
    assert text.startswith("out of memory after")
    assert 64 <= int(text.split()[4]) < 1024


def test_child_below_the_limit_finishes(tmp_path: Path) -> None:
    code, text = _run(tmp_path, limit_mb=512, total_mb=64)
    assert code == 0
    assert text == "finished with 8 blocks"


def test_rss_reads_a_process() -> None:
    """In a fresh interpreter: a long test process can hand out memory it already holds
    (its RSS then does not grow; seen on CI at 1.4 GB)."""
    code = ("import numpy as np; from backend.jobs.memory import rss_bytes; b = rss_bytes(); "
            "x = np.ones(8 << 20); print(rss_bytes() - b)")  # 64 MB touched
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert int(out.stdout) >= 32 << 20


def test_device_setting() -> None:
    assert Settings().device == "cpu"
    assert resolve_device("cpu") == (resolve_device("cpu")[0], None)
    device, note = resolve_device("cuda")
    if device.type == "cpu":  # no GPU here: a clear fallback note
        assert note is not None and "no CUDA device" in note
    with pytest.raises(ValueError, match="ATLAS_DEVICE"):
        Settings(device="tpu")
