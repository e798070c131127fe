"""Hostile input and access over real HTTP, on one server: a corpus of malformed uploads and
requests (each a 4xx with a clear message, the server healthy after), API tokens and the
isolation of one token's uploads, jobs and batches from another's, and property-based fuzzing
of every endpoint from the OpenAPI schema (schemathesis) that must find no 500."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.service import ALICE, BOB, ROOT, TOKEN, Server, mlp_onnx, with_unsupported_op
from tests.service.cluster import wait_for

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SAMPLES = ROOT / "sample_models"


@pytest.fixture(scope="module")
def server(scaled: dict) -> Server:
    """The session's scaled deployment (tests/conftest.py): tokens, samples, 2 MB uploads."""
    return scaled["server"]


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
    corpus = _corpus(model[1], tmp_path)
    for case, (name, data) in corpus.items():
        detail = _clear_4xx(server.client.post("/api/models", files={"file": (name, data)}))
        assert server.client.get("/api/health").status_code == 200, case
        print(f"{case}: {detail[:100]}")
    listed = {m["id"] for m in server.client.get("/api/models").json()}
    assert model[0] in listed  # nothing hostile was stored:
    assert not listed & {hashlib.sha256(data).hexdigest() for _, data in corpus.values()}


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
    paths |= {"/openapi.json": {"get": {}}, "/docs": {"get": {}}, "/redoc": {"get": {}}}
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
    env = {**os.environ, "ATLAS_API_TOKEN": "", "ATLAS_API_TOKENS": "", "ATLAS_HOST": "0.0.0.0"}
    run = subprocess.run([sys.executable, "-m", "backend.cli", "serve"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "ATLAS_API_TOKEN" in run.stderr


def test_refuses_a_malformed_token_list_without_echoing_tokens() -> None:
    env = {**os.environ, "ATLAS_API_TOKENS": "alice:s3cret-a, bad name:s3cret-b"}
    run = subprocess.run([sys.executable, "-m", "backend.cli", "serve"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "ATLAS_API_TOKENS entry 2" in run.stderr
    assert "s3cret" not in run.stderr


def _as(server: Server, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60,
                        headers={"Authorization": f"Bearer {token}"})


def _wait(client: httpx.Client, job_id: str) -> dict:
    def final() -> dict | None:
        job = client.get(f"/api/jobs/{job_id}").json()
        return job if job["status"] in ("finished", "failed", "cancelled") else None

    return wait_for(final, timeout=60)


def test_tokens_see_only_their_own_uploads_jobs_and_batches(server: Server,
                                                           tmp_path: Path) -> None:
    """alice (named token), bob (bare token) and the default owner (ATLAS_API_TOKEN): each
    lists and gets only its own uploads, jobs and batches (another's ids are 404), and every
    one sees the sample models."""
    path = mlp_onnx(tmp_path / "alice.onnx", seed=71)
    x = io.BytesIO()
    np.save(x, np.full((1, 8, 8), 0.3, np.float32))
    with _as(server, ALICE) as alice, _as(server, BOB) as bob:
        model_id = alice.post("/api/models", files={"file": ("a.onnx", path.read_bytes())}
                              ).json()["id"]
        inp = alice.post(f"/api/models/{model_id}/inputs", files={"file": ("x.npy",
                                                                           x.getvalue())})
        assert inp.status_code == 201, inp.text
        inp = inp.json()["id"]
        body = {"analysis": "test_slow", "model_id": model_id, "input_id": inp,
                "params": {"steps": 1, "step_s": 0, "tag": "alice"}}
        job = alice.post("/api/jobs", json=body).json()
        assert _wait(alice, job["id"])["status"] == "finished"
        batch = alice.post("/api/batches", json={**body, "model_ids": [model_id],
                                                 "input_ids": [inp]}).json()
        samples = {m["id"] for m in alice.get("/api/models").json() if m["source"] == "sample"}
        assert len(samples) == len(list(SAMPLES.glob("*.json")))

        for other in (bob, server.client):
            models = {m["id"] for m in other.get("/api/models").json()}
            assert samples <= models and model_id not in models
            assert job["id"] not in {j["id"] for j in other.get("/api/jobs").json()}
            assert batch["id"] not in {b["id"] for b in other.get("/api/batches").json()}
            for method, url in (
                    ("GET", f"/api/models/{model_id}"), ("DELETE", f"/api/models/{model_id}"),
                    ("GET", f"/api/models/{model_id}/inputs"),
                    ("GET", f"/api/models/{model_id}/inputs/{inp}"),
                    ("GET", f"/api/jobs/{job['id']}"), ("GET", f"/api/jobs/{job['id']}/result"),
                    ("POST", f"/api/jobs/{job['id']}/cancel"),
                    ("GET", f"/api/jobs/{job['id']}/artifacts"),
                    ("GET", f"/api/jobs/{job['id']}/artifacts/steps.txt"),
                    ("GET", f"/api/batches/{batch['id']}"),
                    ("GET", f"/api/batches/{batch['id']}/result"),
                    ("POST", f"/api/batches/{batch['id']}/cancel")):
                r = other.request(method, url)
                assert r.status_code == 404, (method, url, r.status_code)
            assert other.post("/api/jobs", json=body).status_code == 404
        assert job["id"] in {j["id"] for j in alice.get("/api/jobs").json()}
        assert alice.get(f"/api/jobs/{job['id']}/artifacts").json() == ["steps.txt"]

        # bob uploads the same file: the same model id, now his too; alice's input stays hers,
        # and the same array uploaded by bob is another input with its own (uncached) job.
        again = bob.post("/api/models", files={"file": ("b.onnx", path.read_bytes())})
        assert again.status_code == 201 and again.json()["id"] == model_id
        assert inp not in {i["id"] for i in bob.get(f"/api/models/{model_id}/inputs").json()}
        assert bob.get(f"/api/models/{model_id}/inputs/{inp}").status_code == 404
        own = bob.post(f"/api/models/{model_id}/inputs", files={"file": ("x.npy",
                                                                         x.getvalue())})
        assert own.status_code == 201 and own.json()["id"] != inp
        bob_job = bob.post("/api/jobs", json={**body, "input_id": own.json()["id"]})
        assert bob_job.status_code == 201 and bob_job.json()["id"] != job["id"]
        assert not bob_job.json()["cached"]

        # alice withdraws her upload; bob's copy and his input stay.
        assert alice.delete(f"/api/models/{model_id}").status_code == 204
        assert alice.get(f"/api/models/{model_id}").status_code == 404
        assert bob.get(f"/api/models/{model_id}").status_code == 200
        assert bob.get(f"/api/models/{model_id}/inputs/{own.json()['id']}").status_code == 200
        r = bob.delete(f"/api/models/{next(iter(samples))}")
        assert r.status_code == 403 and "sample" in r.json()["detail"]


def test_cache_is_per_owner(server: Server) -> None:
    """The same request on a shared sample model: cached for its owner, computed afresh (a
    different job, the same logits, checked with onnxruntime) for another token."""
    sample = next(m for m in server.client.get("/api/models").json()
                  if m["name"] == "digits_fc_standard")
    body = {"analysis": "predict", "model_id": sample["id"], "input_id": "gallery:digits:3"}
    with _as(server, ALICE) as alice, _as(server, BOB) as bob:
        first = alice.post("/api/jobs", json=body)
        assert first.status_code == 201 and _wait(alice, first.json()["id"])["status"] == (
            "finished")
        cached = alice.post("/api/jobs", json=body)
        assert cached.status_code == 200 and cached.json()["cached"]
        assert cached.json()["id"] == first.json()["id"]
        other = bob.post("/api/jobs", json=body)
        assert other.status_code == 201 and not other.json()["cached"]
        assert other.json()["id"] != first.json()["id"]
        assert _wait(bob, other.json()["id"])["status"] == "finished"
        logits = [c.get(f"/api/jobs/{j.json()['id']}/result").json()["logits"]
                  for c, j in ((alice, first), (bob, other))]
    with np.load(SAMPLES / "gallery" / "digits.npz") as gallery:
        x = gallery["x"][3:4].astype(np.float32)
    sess = ort.InferenceSession(str(SAMPLES / "digits_fc_standard.onnx"),
                                providers=["CPUExecutionProvider"])
    expected = sess.run(None, {sess.get_inputs()[0].name: x})[0][0]
    np.testing.assert_allclose(logits[0], expected, atol=1e-5)
    assert logits[0] == logits[1]


def test_fuzz_every_endpoint_finds_no_server_error(server: Server) -> None:
    """Every operation of the live OpenAPI schema, with schemathesis-generated requests."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)
    errors: list[str] = []
    statuses: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=6, deadline=None, derandomize=True, database=None,
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


BAD_TEXT = {"NUL": "a\x00b", "over-long": "x" * 5000, "non-UTF-8": "%FF%FE",
            "control": "a\x1bb"}


def test_bad_strings_in_every_parameter_and_form_field_get_4xx(server: Server, model) -> None:
    """NUL, over-long, non-UTF-8 and control-character strings in every path parameter,
    query parameter and form field of the live schema: never a 5xx, never SQL in a body."""
    spec = server.client.get("/openapi.json").json()
    problems: list[str] = []
    calls = 0

    def check(method: str, url: str, **kwargs) -> None:  # noqa: ANN003 - httpx arguments
        nonlocal calls
        calls += 1
        r = server.client.request(method, url, **kwargs)
        if r.status_code >= 500 or any(w in r.text for w in ("SELECT", "INSERT", "Traceback")):
            problems.append(f"{method} {url[:80]} {kwargs.get('data')}: {r.status_code} "
                            f"{r.text[:120]}")

    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            params = op.get("parameters", [])
            names = [p["name"] for p in params if p["in"] == "path"]
            good = {n: (model[0] if n == "model_id" else "x") for n in names}
            for name in names:
                for bad in BAD_TEXT.values():
                    url = path
                    for n in names:
                        value = bad if n == name else good[n]
                        url = url.replace("{" + n + "}", value if bad == "%FF%FE" and n == name
                                          else quote(value, safe=""))
                    check(method.upper(), url)
            filled = path
            for n in names:
                filled = filled.replace("{" + n + "}", good[n])
            for query in (p["name"] for p in params if p["in"] == "query"):
                for bad in BAD_TEXT.values():
                    raw = bad if bad == "%FF%FE" else quote(bad, safe="")
                    check(method.upper(), f"{filled}?{query}={raw}")
            body = op.get("requestBody", {}).get("content", {})
            form = body.get("multipart/form-data", {}).get("schema", {})
            if "$ref" in form:
                form = spec["components"]["schemas"][form["$ref"].split("/")[-1]]
            for field in form.get("properties", {}):
                if field == "file":
                    for bad in BAD_TEXT.values():
                        check(method.upper(), filled, files={"file": (bad + ".onnx", b"x")})
                    continue
                for bad in BAD_TEXT.values():
                    check(method.upper(), filled, data={field: bad},
                          files={"file": ("m.onnx", model[1].read_bytes())})
    assert calls > 100
    assert problems == []
    assert server.client.get("/api/health").status_code == 200
