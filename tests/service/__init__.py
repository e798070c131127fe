"""Helpers for the service tests: a real uvicorn server in a subprocess, ONNX builders.

The server runs ``python -m backend.cli serve`` on a free loopback port with its own data
dir, in its own process group so a test can kill it (and its Dask workers) like a crash.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
SLOW_ANALYSIS = "tests.service.slow"
# API tokens of the session's scaled deployment (tests/conftest.py ``scaled``): ATLAS_API_TOKEN
# is the default owner; ATLAS_API_TOKENS has a named one (alice) and a bare one (bob).
TOKEN, ALICE, BOB = "test-token-default", "tok-alice-1", "tok-bob-2"
TOKEN_ENV = {"ATLAS_API_TOKEN": TOKEN, "ATLAS_API_TOKENS": f"alice:{ALICE}, {BOB}"}


def module_server(name: str, **env: str):
    """A module-scoped fixture: a real server on a fresh data dir ``<name>``, killed after."""

    @pytest.fixture(scope="module")
    def server(tmp_path_factory: pytest.TempPathFactory):
        srv = Server(tmp_path_factory.mktemp(name) / "data", **env).start()
        yield srv
        srv.kill()

    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real API server process; ``client`` talks to it over loopback HTTP."""

    def __init__(self, data_dir: Path, token: str = "", **env: str) -> None:
        self.data_dir, self.token = data_dir, token  # ``client`` sends ``token`` if given
        self.env = {"ATLAS_DATA_DIR": str(data_dir), "ATLAS_DASK_WORKERS": "1",
                    "ATLAS_EXTRA_ANALYSES": SLOW_ANALYSIS, "OMP_NUM_THREADS": "1", **env}
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.client: httpx.Client | None = None

    def start(self, timeout: float = 120.0) -> Server:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, **self.env, "ATLAS_PORT": str(port)}
        self.log = open(self.data_dir.parent / f"server-{port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve"], cwd=ROOT,
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(base_url=self.url, timeout=60, headers=auth)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.read_log()[-3000:]}")
            try:
                if self.client.get("/api/health").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"server did not start: {self.read_log()[-3000:]}")

    def restarted(self) -> Server:
        """A new server on the same data dir and settings (after this one was killed)."""
        env = {k: v for k, v in self.env.items() if k != "ATLAS_DATA_DIR"}
        return Server(self.data_dir, token=self.token, **env).start()

    def read_log(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        """Graceful stop (SIGINT, as Ctrl-C), then make sure the whole group is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """kill -9 the server and everything it started (its Dask workers)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        if self.client is not None:
            self.client.close()

    def wait_job(self, job_id: str, timeout: float = 60.0, until=("finished", "failed",
                                                                    "cancelled")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/api/jobs/{job_id}").json()
            if job["status"] in until:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def mlp_onnx(path: Path, seed: int = 0, hidden: tuple[int, ...] = (16, 12),
             input_shape: tuple[int, ...] = (1, 8, 8), classes: int = 10) -> Path:
    """A seeded Flatten-Gemm-Relu-...-Gemm ONNX classifier written with onnx.helper."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Flatten", ["x"], ["h0"], axis=1)]
    inits = []
    sizes = [int(np.prod(input_shape)), *hidden, classes]
    name = "h0"
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in)).astype(np.float32)
        b = rng.normal(0, 0.1, n_out).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{k}"), numpy_helper.from_array(b, f"b{k}")]
        nodes.append(helper.make_node("Gemm", [name, f"w{k}", f"b{k}"], [f"g{k}"], transB=1,
                                      name=f"gemm{k}"))
        name = f"g{k}"
        if k < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [name], [f"r{k}"], name=f"relu{k}"))
            name = f"r{k}"
    nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def with_unsupported_op(src: Path, dst: Path, op: str = "Sigmoid") -> Path:
    """``src`` with its first Relu replaced by ``op`` (valid ONNX the engine cannot handle)."""
    model = onnx.load(src)
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = op
    onnx.checker.check_model(model)
    onnx.save(model, dst)
    return dst
