"""Uploads tried as an attacker would, against the real server on SQLite and on PostgreSQL.

Each payload is built here: a marker file that a payload would create must not appear, a
secret file's bytes must not come back in any answer, the API process' peak memory is read
from /proc, and no answer is a 500 or carries SQL or a traceback.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import Tensor, nn

from tests.service import ALICE, BOB, TOKEN, TOKEN_ENV, Server, mlp_onnx

SQL_WORDS = ("SELECT", "INSERT", "psycopg", "sqlite3", "Traceback", "parameters")


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("upload-safety") / "data", token=TOKEN, **TOKEN_ENV,
                 ATLAS_REGISTER_SAMPLES="false", ATLAS_MAX_UPLOAD_MB="2").start()
    yield srv
    srv.kill()


@pytest.fixture(params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest) -> Server:
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_server")
    return request.getfixturevalue("scaled")["server"]


class _Touch:
    """Unpickling this creates ``path``: the payload of a malicious pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _small_conv() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)).eval()


def _export(path: Path) -> Path:
    torch.export.save(torch.export.export(_small_conv(), (torch.zeros(1, 1, 8, 8),)), str(path))
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001 - edit(name, bytes) -> bytes
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info.filename)))
    return dst


def _pickled(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _pt2_with_evil_sample_inputs(tmp: Path, marker: Path) -> bytes:
    evil = _pickled(_Touch(marker))
    return _rewrite(_export(tmp / "ok.pt2"), tmp / "evil_inputs.pt2",
                    lambda n, b: evil if "/sample_inputs/" in n else b).read_bytes()


def _pt2_with_pickled_weight(tmp: Path, marker: Path) -> bytes:
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("/weight_0"):
            return _pickled(_Touch(marker))
        return data

    return _rewrite(_export(tmp / "ok2.pt2"), tmp / "evil_weight.pt2", edit).read_bytes()


class Leaky(nn.Module):
    """TorchScript whose ``__setstate__`` reads a file into the weights when loaded."""

    secret = ""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.zeros(16)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :16] * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[Tensor, bool]) -> None:
        self.w = torch.from_file("SECRET_PATH", size=16, dtype=torch.uint8).float()
        self.training = state[1]


def _leaky_torchscript(tmp: Path, secret: Path) -> bytes:
    path = tmp / "leaky.pt"
    torch.jit.script(Leaky()).save(str(path))
    # The scripted code names the file: point it at this test's secret (same length path).
    return _rewrite(path, tmp / "leaky2.pt",
                    lambda n, b: b.replace(b"SECRET_PATH", str(secret).encode())
                    if n.endswith(".py") else b).read_bytes()


def _huge_input_onnx() -> bytes:
    shape = [1, 1, 16384, 16384]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(graph).SerializeToString()


def _peak_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def _no_leak(r: httpx.Response, *secrets_: bytes) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    for word in SQL_WORDS:
        assert word not in r.text, (word, r.text[:300])
    for secret in secrets_:
        assert secret.hex() not in r.text and str(list(secret)) not in r.text


def test_pickle_payloads_in_pt2_archives_never_run(server: Server, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name, data in (("inputs.pt2", _pt2_with_evil_sample_inputs(tmp_path, marker)),
                       ("weight.pt2", _pt2_with_pickled_weight(tmp_path, marker))):
        assert torch.export.load  # the archive is a real export archive with one part changed
        r = server.client.post("/api/models", files={"file": (name, data)})
        assert r.status_code == 422, r.text
        assert "pickle" in r.json()["detail"], r.text
        assert not marker.exists(), f"{name} ran its payload"
    ok = server.client.post("/api/models", files={"file": ("ok.pt2", (tmp_path / "ok.pt2")
                                                             .read_bytes())})
    assert ok.status_code == 201, ok.text  # the untouched archive loads (stored as ONNX)
    assert ok.json()["format"] == "torch.export" and ok.json()["input_shape"] == [1, 8, 8]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_that_reads_files_is_refused_whatever_its_name(server: Server,
                                                                   tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(secrets.token_bytes(16))
    secret.chmod(0o600)
    data = _leaky_torchscript(tmp_path, secret)
    for name in ("leaky.pt", "leaky.pt2", "leaky.ts"):
        r = server.client.post("/api/models", files={"file": (name, data)},
                               data={"input_shape": "1,4,4"})
        assert r.status_code == 422, r.text
        assert "TorchScript" in r.json()["detail"] or "archive" in r.json()["detail"]
        _no_leak(r, secret.read_bytes())
    listed = server.client.get("/api/models").json()
    assert not any(m["name"].startswith("leaky") for m in listed)


def test_declared_sizes_are_refused_before_allocation(server: Server) -> None:
    before = _peak_kb(server.proc.pid)
    r = server.client.post("/api/models", files={"file": ("huge.onnx", _huge_input_onnx())})
    assert r.status_code in (413, 422) and "elements" in r.json()["detail"], r.text
    bloated = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100_000_000])],
        [TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[64, 100_000_000])]))
    r = server.client.post("/api/models", files={"file": ("bloated.onnx",
                                                          bloated.SerializeToString())})
    assert r.status_code in (413, 422), r.text
    for shape in ("100000,100000,100000", "1,16384,16384"):
        r = server.client.post("/api/models", files={"file": ("ok.pt2", _export_bytes())},
                               data={"input_shape": shape})
        assert r.status_code < 500, r.text
    grown_mb = (_peak_kb(server.proc.pid) - before) / 1024
    assert grown_mb < 200, f"the API's peak memory grew by {grown_mb:.0f} MB"
    assert server.client.get("/api/health").status_code == 200


def _export_bytes() -> bytes:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(_small_conv(), (torch.zeros(1, 1, 8, 8),)), buf)
    return buf.getvalue()


def test_bad_ids_names_and_filenames_get_4xx_without_sql(server: Server,
                                                         tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "m.onnx", seed=81).read_bytes()
    r = server.client.post("/api/models", files={"file": ("m.onnx", model)})
    assert r.status_code in (200, 201), r.text
    model_id = r.json()["id"]
    for path in ("/api/jobs/%00", "/api/models/%00", "/api/batches/%00",
                 f"/api/models/{model_id}/inputs/%00", "/api/jobs/%FF%FE",
                 f"/api/models/{model_id}/datasets/%00x", "/api/jobs?model_id=%00"):
        r = server.client.get(path)
        assert 400 <= r.status_code < 500, (path, r.status_code)
        _no_leak(r)
    for body in ({"analysis": "predict", "model_id": "\x00", "input_id": "gallery:digits:1"},
                 {"analysis": "predict", "model_id": model_id, "input_id": "up\x00load"},
                 {"analysis": "pre\x00dict", "model_id": model_id},
                 {"analysis": "predict", "model_id": "m" * 5000}):
        r = server.client.post("/api/jobs", json=body)
        assert 400 <= r.status_code < 500, (body, r.status_code)
        _no_leak(r)
    models_dir = server.data_dir / "models"
    files_before = set(models_dir.iterdir())
    for files, data in ((("x" * 300 + ".onnx", model), {}),
                        (("named.onnx", model), {"card": json.dumps({"name": "n" * 201})}),
                        (("named.onnx", model), {"card": '{"name": "a\\u0000b"}'})):
        r = server.client.post("/api/models", files={"file": files}, data=data)
        assert r.status_code == 422, (files[0][:20], r.text)
        _no_leak(r)
    for raw_name, refused in ((b"m\x00.onnx", True), (b"m\n.onnx", True),
                              (b"m\xff\xfe.onnx", False)):  # read as latin-1 text: a name
        r = server.client.post("/api/models", content=_raw_multipart(raw_name, model),
                               headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert (r.status_code == 422) if refused else r.status_code in (200, 201), (
            raw_name, r.status_code, r.text[:200])
        _no_leak(r)
    r = server.client.post(f"/api/models/{model_id}/inputs",
                           files={"file": ("i" * 300 + ".npy", b"\x93NUMPY")})
    assert r.status_code == 422
    assert set(models_dir.iterdir()) == files_before, "a refused upload left a file behind"


def _raw_multipart(filename: bytes, data: bytes, field: bytes = b"file") -> bytes:
    """A multipart body with the file name's bytes as given (clients would escape them)."""
    return (b"--B\r\nContent-Disposition: form-data; name=\"" + field + b"\"; filename=\""
            + filename + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data
            + b"\r\n--B--\r\n")


def test_docs_and_schema_need_the_token(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert anonymous.get(path).status_code == 401, path
            r = anonymous.get(path, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401, path
            assert server.client.get(path).status_code == 200, path
    assert "/api/models" in server.client.get("/openapi.json").json()["paths"]


def test_same_bytes_show_each_owner_its_own_card(server: Server, tmp_path: Path) -> None:
    data = mlp_onnx(tmp_path / "shared.onnx", seed=int.from_bytes(os.urandom(2))).read_bytes()
    card = {"name": "alice-private-name", "notes": "alice's notes", "input_range": [-1, 1]}
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": f"Bearer {ALICE}"}) as alice, \
            httpx.Client(base_url=server.url, timeout=60,
                         headers={"Authorization": f"Bearer {BOB}"}) as bob:
        a = alice.post("/api/models", files={"file": ("a.onnx", data)},
                       data={"card": json.dumps(card)})
        assert a.status_code == 201, a.text
        b = bob.post("/api/models", files={"file": ("bobs.onnx", data)})
        assert b.status_code == 201, b.text
        assert b.json()["id"] == a.json()["id"]
        for shown in (b.json(), bob.get(f"/api/models/{a.json()['id']}").json(),
                      next(m for m in bob.get("/api/models").json()
                           if m["id"] == a.json()["id"])):
            assert shown["name"] == "bobs" and shown["card"] == {}
            assert "alice" not in json.dumps(shown)
        assert alice.get(f"/api/models/{a.json()['id']}").json()["card"] == card


def test_sigterm_stops_the_server_quickly_and_jobs_resume(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data", ATLAS_REGISTER_SAMPLES="false").start()
    try:
        model = mlp_onnx(tmp_path / "m.onnx", seed=82)
        model_id = srv.client.post("/api/models", files={"file": ("m.onnx", model.read_bytes())}
                                   ).json()["id"]
        x = io.BytesIO()
        np.save(x, np.zeros((1, 8, 8), np.float32))
        inp = srv.client.post(f"/api/models/{model_id}/inputs",
                              files={"file": ("x.npy", x.getvalue())}).json()["id"]
        job = srv.client.post("/api/jobs", json={
            "analysis": "test_slow", "model_id": model_id, "input_id": inp,
            "params": {"steps": 40, "step_s": 0.1}}).json()
        srv.wait_job(job["id"], until=("running",))
        srv.client.close()
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(timeout=60)
        while subprocess.run(["pgrep", "-g", str(srv.proc.pid)],
                             capture_output=True).returncode == 0:
            assert time.monotonic() - start < 10, "server processes outlive SIGTERM by 10 s"
            time.sleep(0.2)
        took = time.monotonic() - start
        print(f"SIGTERM to last process gone: {took:.1f} s")
        assert took < 10
        again = srv.restarted()
        srv = again
        assert again.wait_job(job["id"], timeout=120)["status"] == "finished"
    finally:
        srv.kill()


def _broadcast_fold_onnx() -> bytes:
    """A 64-input net with an unused constant Add of [20000, 1] + [1, 20000]: parsing it
    would fold 400M floats (1.6 GB) from 160 kB of declared parameters."""
    a = helper.make_tensor("a", TensorProto.FLOAT, [20000, 1], np.ones(20000).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [1, 20000], np.ones(20000).tolist())
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 64])
    nodes = [helper.make_node("Add", ["a", "b"], ["c"]),
             helper.make_node("Reshape", ["x", "shape"], ["xr"]),
             helper.make_node("Relu", ["xr"], ["y"])]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [a, b, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_the_sandbox_budget_stops_what_the_declarations_hide() -> None:
    """With the declared-size checks opened up, the fold above runs into the checking
    process' memory budget: a TooLarge answer, and the next model parses fine."""
    from app.loaders.limits import LoadLimits
    from backend.sandbox import ModelChecker, TooLarge

    checker = ModelChecker(memory_mb=1536, timeout_s=120,
                           limits=LoadLimits(max_activation_elements=10**12), max_bytes=1 << 24)
    try:
        with pytest.raises(TooLarge, match="memory budget"):
            checker.check(_broadcast_fold_onnx(), ".onnx", None)
        ok = checker.check(_export_bytes(), ".pt2", None)
        assert ok.input_shape == [1, 8, 8] and ok.num_outputs == 3 and ok.suffix == ".onnx"
        onnx.checker.check_model(onnx.load_model_from_string(ok.data))
    finally:
        checker.close()


def test_the_api_stays_small_and_healthy_on_a_hidden_fold(sqlite_server: Server) -> None:
    before = _peak_kb(sqlite_server.proc.pid)
    r = sqlite_server.client.post("/api/models",
                                  files={"file": ("fold.onnx", _broadcast_fold_onnx())})
    assert r.status_code in (413, 422), r.text
    assert (_peak_kb(sqlite_server.proc.pid) - before) / 1024 < 200
    assert sqlite_server.client.get("/api/health").status_code == 200


def test_inputs_are_bounded_before_they_are_decoded(sqlite_server: Server,
                                                    tmp_path: Path) -> None:
    """An oversized image, a CSV of millions of values and a large .npy of the wrong shape
    are refused from their headers; an ERAN-style CSV row (label first) is taken."""
    from PIL import Image

    srv = sqlite_server
    model_id = srv.client.post("/api/models", files={"file": (
        "in.onnx", mlp_onnx(tmp_path / "in.onnx", seed=83).read_bytes())}).json()["id"]
    before = _peak_kb(srv.proc.pid)
    big = io.BytesIO()
    Image.new("L", (5000, 5000)).save(big, format="PNG")  # 25M pixels in ~25 kB
    csv = b",".join([b"0"] * 800_000)
    wide = io.BytesIO()
    np.save(wide, np.zeros((500, 500), np.float32))
    for name, data, word in (("big.png", big.getvalue(), "image"),
                             ("many.csv", csv, "values"), ("wide.npy", wide.getvalue(), "shape")):
        r = srv.client.post(f"/api/models/{model_id}/inputs", files={"file": (name, data)})
        assert r.status_code == 422 and word in r.json()["detail"], (name, r.text)
    assert (_peak_kb(srv.proc.pid) - before) / 1024 < 100
    values = np.round(np.random.default_rng(5).random(64), 3)
    row = ",".join(["7", *map(str, values)]).encode()
    r = srv.client.post(f"/api/models/{model_id}/inputs", files={"file": ("eran.csv", row)})
    assert r.status_code == 201, r.text
    got = srv.client.get(f"/api/models/{model_id}/inputs/{r.json()['id']}").json()
    np.testing.assert_allclose(np.ravel(got["values"]), values, atol=1e-6)


def test_files_are_kept_only_when_their_row_commits(tmp_path: Path) -> None:
    """A database that fails at commit (here: every commit raises) leaves no model or input
    file behind; the same storage with a working database keeps both."""
    from sqlalchemy.exc import OperationalError

    from app.loaders.limits import LoadLimits
    from backend.sandbox import ModelChecker
    from backend.storage import Storage

    for sub in ("models", "inputs"):
        (tmp_path / sub).mkdir()
    checker = ModelChecker(2048, 120, LoadLimits(), 1 << 24)
    storage = Storage(tmp_path, f"sqlite:///{tmp_path / 'atlas.db'}", checker)
    model = mlp_onnx(tmp_path / "m.onnx", seed=84)
    working = storage.sessions

    def failing():  # noqa: ANN202 - a sessionmaker stand-in whose commits fail
        session = working()
        session.commit = lambda: (_ for _ in ()).throw(OperationalError("COMMIT", {}, None))
        return session

    try:
        storage.sessions = failing
        with pytest.raises(OperationalError):
            storage.add_model(model, "m.onnx")
        with pytest.raises(OperationalError):
            storage.add_input("m", np.zeros((1, 8, 8), np.float32), "x.npy")
        assert list((tmp_path / "models").iterdir()) == []
        assert list((tmp_path / "inputs").iterdir()) == []
        storage.sessions = working
        record = storage.add_model(model, "m.onnx")
        storage.add_input(record.id, np.zeros((1, 8, 8), np.float32), "x.npy")
        assert len(list((tmp_path / "models").iterdir())) == 1
        assert len(list((tmp_path / "inputs").iterdir())) == 1
    finally:
        checker.close()
