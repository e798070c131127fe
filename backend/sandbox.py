"""Uploaded model files are parsed in a separate, locked-down process, never in the API.

Parsing a stranger's file is the riskiest thing the service does: a loader bug, a size the
declarations hide, or a format feature that runs code would otherwise hit the API process.
So the API hands the bytes to one long-lived child (``python -m backend.sandbox``) that:

* has its own address-space, file-size and core rlimits, set before it reads a byte (a
  memory budget no upload can grow the API past), runs in a fresh empty working directory
  with a minimal environment, and as ``nobody`` where the service runs as root and the
  interpreter is reachable by that user;
* answers with data only: the model's shape, output count and summary, and, for ``.pt2``
  archives, the model converted to ONNX, which the API stores instead of the archive, so
  workers only ever load ONNX;
* is killed and restarted when it dies, runs out of memory or takes longer than the limit.

Frames on the pipes are a 4-byte big-endian length, a JSON header, an 8-byte length and raw
bytes: nothing is pickled in either direction.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from app.errors import InvalidInputError, UnsupportedModelError
from app.loaders.limits import LoadLimits

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
MEMORY_MESSAGE = "the model does not fit the memory budget for checking uploads"


class TooLarge(UnsupportedModelError):
    """The model did not fit the memory budget of the checking process."""


@dataclass
class CheckedModel:
    """What the API keeps of an upload: the bytes to store (ONNX for .pt2) and its shape."""

    data: bytes
    suffix: str
    input_shape: list[int]
    num_outputs: int
    summary: dict = field(default_factory=dict)


# -- framing ----------------------------------------------------------------------------------

def _write(out: BinaryIO, header: dict, data: bytes = b"") -> None:
    head = json.dumps(header).encode()
    out.write(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(data)) + data)
    out.flush()


def _read_exact(inp: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = inp.read(left)
        if not chunk:
            raise EOFError("the other end closed the pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read(inp: BinaryIO, max_bytes: int) -> tuple[dict, bytes]:
    (head_len,) = struct.unpack(">I", _read_exact(inp, 4))
    if head_len > 1 << 24:
        raise EOFError(f"header of {head_len} bytes is over the limit")
    header = json.loads(_read_exact(inp, head_len))
    (data_len,) = struct.unpack(">Q", _read_exact(inp, 8))
    if data_len > max_bytes:
        raise EOFError(f"frame of {data_len} bytes is over the limit")
    return header, _read_exact(inp, data_len)


# -- the API's side ---------------------------------------------------------------------------

class ModelChecker:
    """Parses uploads in the sandbox process, one request at a time."""

    def __init__(self, memory_mb: float, timeout_s: float, limits: LoadLimits,
                 max_bytes: int, workdir_root: Path | None = None) -> None:
        self.memory_mb, self.timeout_s, self.limits = memory_mb, timeout_s, limits
        self.max_bytes = max_bytes
        self.workdir_root = workdir_root  # the data dir's tmp/: files stay inside it
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._workdir: Path | None = None

    def check(self, data: bytes, suffix: str, input_shape: tuple[int, ...] | None,
              ) -> CheckedModel:
        """The parsed model, or :class:`UnsupportedModelError` (:class:`TooLarge` when the
        budget ran out) with a message for the user."""
        request = {"suffix": suffix, "input_shape": list(input_shape) if input_shape else None,
                   "limits": vars(self.limits)}
        with self._lock:
            proc = self._ensure()
            timer = threading.Timer(self.timeout_s, proc.kill)
            timer.start()
            try:
                _write(proc.stdin, request, data)
                header, payload = _read(proc.stdout, 4 * self.max_bytes + (64 << 20))
            except (EOFError, OSError, ValueError, struct.error):
                timed_out = not timer.is_alive()
                self._stop()
                if timed_out:
                    raise UnsupportedModelError(
                        f"checking the model took longer than {self.timeout_s:g} s") from None
                raise TooLarge(f"{MEMORY_MESSAGE} ({self.memory_mb:g} MB)") from None
            finally:
                timer.cancel()
        if header.get("error"):
            kind = TooLarge if header.get("kind") == "memory" else UnsupportedModelError
            raise kind(header["error"])
        return CheckedModel(data=payload or data, suffix=header["suffix"],
                            input_shape=header["input_shape"],
                            num_outputs=header["num_outputs"], summary=header["summary"])

    def start(self) -> None:
        """Start the process now (it imports torch while the service starts up)."""
        with self._lock:
            self._ensure()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._stop()
        self._workdir = Path(tempfile.mkdtemp(prefix="atlas-sandbox-", dir=self.workdir_root))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self._workdir),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(self._workdir),
               "ATLAS_SANDBOX_MEMORY_MB": str(self.memory_mb)}
        command = [sys.executable, "-m", "backend.sandbox"]
        options = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=self._workdir,
                       env=env, close_fds=True, start_new_session=True)
        if os.geteuid() == 0:
            try:
                os.chown(self._workdir, NOBODY, NOBODY)
                self._proc = subprocess.Popen(command, user=NOBODY, group=NOBODY,
                                              extra_groups=[], **options)
                return self._proc
            except PermissionError:
                log.warning("the upload sandbox runs as root: %s is not reachable by nobody",
                            sys.executable)
                os.chown(self._workdir, 0, 0)
        self._proc = subprocess.Popen(command, **options)
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


# -- the sandbox's side -----------------------------------------------------------------------

def _limit_self(memory_mb: float) -> None:
    """Rlimits set before any untrusted byte is read (lowering needs no privilege)."""
    budget = int(memory_mb * 1024 * 1024)
    resource.setrlimit(resource.RLIMIT_AS, (budget, budget))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _parse(request: dict, data: bytes, workdir: Path) -> tuple[dict, bytes]:
    from app.loaders import load_onnx
    from app.loaders.torch_loader import archive_to_onnx

    limits = LoadLimits(**request["limits"])
    suffix = request["suffix"]
    shape = tuple(request["input_shape"]) if request["input_shape"] else None
    if suffix == ".onnx":
        onnx_bytes, converted = data, b""
    else:
        path = workdir / f"upload{suffix}"
        path.write_bytes(data)
        try:
            onnx_bytes = converted = archive_to_onnx(path, shape, limits=limits)
        finally:
            path.unlink(missing_ok=True)
    net = load_onnx(onnx_bytes, name="upload", limits=limits)
    header = {"suffix": ".onnx", "input_shape": list(net.input_shape),
              "num_outputs": net.num_outputs, "summary": net.summary()}
    return header, converted


def _answer(request: dict, data: bytes, workdir: Path) -> tuple[dict, bytes]:
    try:
        return _parse(request, data, workdir)
    except (UnsupportedModelError, InvalidInputError) as exc:
        return {"error": str(exc)}, b""
    except MemoryError:
        return {"error": MEMORY_MESSAGE, "kind": "memory"}, b""
    except RuntimeError as exc:
        if "allocate" in str(exc):
            return {"error": MEMORY_MESSAGE, "kind": "memory"}, b""
        return {"error": f"cannot load the model: {exc}"}, b""
    except Exception as exc:  # noqa: BLE001 - any parser failure is the file's fault
        return {"error": f"cannot load the model: {type(exc).__name__}: {exc}"}, b""


def serve() -> None:
    """The child's loop: one request in, one answer out, until the pipe closes."""
    _limit_self(float(os.environ.get("ATLAS_SANDBOX_MEMORY_MB", "2048")))
    import torch  # noqa: F401 - imported once, before the first request

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the frames
    workdir = Path.cwd()
    while True:
        try:
            request, data = _read(inp, 1 << 31)
        except EOFError:
            return
        _write(out, *_answer(request, data, workdir))


if __name__ == "__main__":
    serve()
