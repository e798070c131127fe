"""Hostile input over real HTTP: a corpus of malformed uploads and requests (each a 4xx with
a clear message, the server healthy after), the API token, and property-based fuzzing of
every endpoint from the OpenAPI schema (schemathesis) that must find no 500."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.service import ROOT, Server, mlp_onnx, with_unsupported_op

TOKEN = "fuzz-token-a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("fuzz") / "data", ATLAS_API_TOKEN=TOKEN,
                 ATLAS_REGISTER_SAMPLES="false", ATLAS_MAX_UPLOAD_MB="2").start()
    srv.client.headers.update(AUTH)
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def model(server: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    path = mlp_onnx(tmp_path_factory.mktemp("fuzz-models") / "ok.onnx", seed=50)
    r = server.client.post("/api/models", files={"file": (path.name, path.read_bytes())})
    assert r.status_code == 201, r.text
    return r.json()["id"], path


def _corpus(base: Path, tmp: Path) -> dict[str, tuple[str, bytes]]:
    """Hostile model uploads: name -> (filename, bytes)."""
    data = base.read_bytes()
    huge = onnx.load(base)
    for dim in huge.graph.input[0].type.tensor_type.shape.dim[1:]:
        dim.dim_value = 100_000  # a 4e15-element input tensor
    bloated = onnx.load(base)
    bloated.graph.initializer[0].dims[:] = [1 << 20, 1 << 20]  # declared 4 TB, 4 kB stored
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (300 << 20))  # 300 MB in ~300 kB
    return {
        "truncated ONNX": ("trunc.onnx", data[: len(data) // 2]),
        "random-byte ONNX": ("random.onnx", np.random.default_rng(0).bytes(20_000)),
        "unsupported op": ("sig.onnx",
                           with_unsupported_op(base, tmp / "sig.onnx").read_bytes()),
        "huge declared input": ("huge.onnx", huge.SerializeToString()),
        "huge declared initializer": ("bloated.onnx", bloated.SerializeToString()),
        "zip bomb as .pt": ("bomb.pt", bomb.getvalue()),
        "zip bomb as .pt2": ("bomb.pt2", bomb.getvalue()),
        "pickle disguised as .pt": ("weights.pt", pickle.dumps({"w": np.zeros(3)})),
        "empty file": ("empty.onnx", b""),
        "unknown format": ("model.exe", b"MZ\x90\x00"),
        "over the size limit": ("big.onnx", np.random.default_rng(1).bytes(3 << 20)),
    }


def _clear_4xx(r) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 10
    return detail


def test_hostile_model_uploads_get_4xx_and_server_stays_healthy(server: Server, model,
                                                               tmp_path: Path) -> None:
    for case, (name, data) in _corpus(model[1], tmp_path).items():
        detail = _clear_4xx(server.client.post("/api/models", files={"file": (name, data)}))
        assert server.client.get("/api/health").status_code == 200, case
        print(f"{case}: {detail[:100]}")
    listed = {m["id"] for m in server.client.get("/api/models").json()}
    assert listed == {model[0]}  # nothing hostile was stored


def test_hostile_inputs_and_params_get_4xx(server: Server, model) -> None:
    model_id = model[0]

    def upload(name: str, data: bytes):
        return server.client.post(f"/api/models/{model_id}/inputs",
                                  files={"file": (name, data)})

    def npy(x: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=True)
        return buf.getvalue()

    nan = np.zeros((1, 8, 8))
    nan[0, 1, 2] = np.nan
    header = npy(np.zeros((1, 8, 8), np.float32))
    huge_header = header.replace(b"(1, 8, 8)", b"(99999999, 99999, 8)")
    assert "shape" in _clear_4xx(upload("x.npy", npy(np.zeros((3, 5))))).lower()
    assert "NaN" in _clear_4xx(upload("x.npy", npy(nan)))
    assert "infinite" in _clear_4xx(upload("x.npy", npy(np.full((1, 8, 8), np.inf))))
    assert "pickle" in _clear_4xx(upload("x.npy", npy(np.array([object()]))))
    _clear_4xx(upload("x.npy", huge_header))
    _clear_4xx(upload("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100))
    _clear_4xx(upload("x.csv", "1,2,\u00e9".encode()))

    inp = upload("x.npy", npy(np.zeros((1, 8, 8), np.float32))).json()["id"]
    job = {"analysis": "test_slow", "model_id": model_id, "input_id": inp}
    for params, word in (({"steps": 0}, "steps"), ({"steps": 10**9}, "steps"),
                         ({"step_s": -1}, "step_s"), ({"step_s": "fast"}, "step_s"),
                         ({"allocate_mb": -5}, "allocate_mb")):
        r = server.client.post("/api/jobs", json={**job, "params": params})
        assert word in _clear_4xx(r)
    for limits in ({"time_s": 0}, {"memory_mb": 1}, {"time_s": "long"}):
        assert "limits" in _clear_4xx(server.client.post("/api/jobs",
                                                         json={**job, "limits": limits}))
    r = server.client.post("/api/batches", json={"analysis": "test_slow",
                                                 "model_ids": [model_id] * 101})
    assert "model_ids" in _clear_4xx(r)
    assert server.client.get("/api/health").status_code == 200


def test_token_guards_every_endpoint_but_health(server: Server) -> None:
    paths = server.client.get("/openapi.json").json()["paths"]
    fill = {"{model_id}": "m", "{job_id}": "j", "{batch_id}": "b", "{input_id}": "i",
            "{name}": "n"}
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get("/api/health").status_code == 200
        for path, ops in paths.items():
            if path == "/api/health":
                continue
            for key, value in fill.items():
                path = path.replace(key, value)
            for method in ops:
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    r = anonymous.request(method.upper(), path, headers=headers)
                    assert r.status_code == 401, (method, path, r.status_code)
                    assert "token" in r.json()["detail"]


def test_refuses_to_bind_a_public_address_without_token() -> None:
    env = {**os.environ, "ATLAS_API_TOKEN": "", "ATLAS_HOST": "0.0.0.0"}
    run = subprocess.run([sys.executable, "-m", "backend.cli", "serve"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "ATLAS_API_TOKEN" in run.stderr


def test_fuzz_every_endpoint_finds_no_server_error(server: Server) -> None:
    """Every operation of the live OpenAPI schema, with schemathesis-generated requests."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    errors: list[str] = []
    statuses: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:  # noqa: ANN001 - schemathesis Case
            response = case.call(headers=AUTH, timeout=60)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                errors.append(f"{case.method} {case.formatted_path}: {response.text[:200]}")

        fuzz()
    assert errors == []
    assert len(statuses) >= 3 * len(operations) and min(statuses) < 300  # it did call them
    assert server.client.get("/api/health").status_code == 200
