"""The service over real HTTP: a uvicorn server in a subprocess with Dask worker processes.

Results are checked against onnxruntime running the same ONNX file; uploads against values
computed here from the raw bytes. One server serves the whole module (start-up takes
seconds); the last test crashes it and starts it again on the same data dir.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from tests.conftest import SAMPLE_MODELS
from tests.service import ROOT, Server, mlp_onnx, module_server, with_unsupported_op

MAX_UPLOAD_MB = 1


server = module_server("api", ATLAS_MAX_UPLOAD_MB=str(MAX_UPLOAD_MB))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp_onnx(tmp_path_factory.mktemp("models") / "mlp.onnx", seed=3)


@pytest.fixture(scope="module")
def model(server: Server, model_file: Path) -> dict:
    r = server.client.post("/api/models", files={"file": ("mlp.onnx", model_file.read_bytes())})
    assert r.status_code == 201, r.text
    return r.json()


def _upload_npy(server: Server, model_id: str, x: np.ndarray, name: str = "x.npy"):
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=True)
    return server.client.post(f"/api/models/{model_id}/inputs",
                              files={"file": (name, buf.getvalue())})


def _submit(server: Server, **body):
    return server.client.post("/api/jobs", json=body)


def _onnxruntime_with_relus(path: Path, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and every Relu output, by onnxruntime on the file with extra graph outputs."""
    model = onnx.load(path)
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    model.graph.output.extend(onnx.ValueInfoProto(name=r) for r in relus)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x[None].astype(np.float32)})
    return outs[0].reshape(-1), [o.reshape(-1) for o in outs[1:]]


def test_health_and_openapi(server: Server) -> None:
    health = server.client.get("/api/health").json()
    assert health["status"] == "ok" and health["analyses"] >= 2
    paths = server.client.get("/openapi.json").json()["paths"]
    for p in ("/api/models", "/api/models/{model_id}/inputs", "/api/jobs/{job_id}/cancel",
              "/api/jobs/{job_id}/result", "/api/jobs/{job_id}/artifacts/{name}"):
        assert p in paths
    names = {a["name"] for a in server.client.get("/api/analyses").json()}
    assert {"predict", "test_slow"} <= names


def test_upload_model_is_stored_by_content_hash(server: Server, model: dict,
                                                model_file: Path) -> None:
    assert model["id"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert model["input_shape"] == [1, 8, 8] and model["num_outputs"] == 10
    assert model["format"] == "onnx"
    again = server.client.post("/api/models",
                               files={"file": ("copy.onnx", model_file.read_bytes())})
    assert again.json()["id"] == model["id"]
    listed = {m["id"] for m in server.client.get("/api/models").json()}
    assert model["id"] in listed
    summary = server.client.get(f"/api/models/{model['id']}").json()["summary"]
    assert summary["num_relu_neurons"] == 28


def test_predict_job_matches_onnxruntime_and_is_cached(server: Server, model: dict,
                                                      model_file: Path) -> None:
    x = np.random.default_rng(1).random((1, 8, 8), dtype=np.float32)
    inp = _upload_npy(server, model["id"], x)
    assert inp.status_code == 201, inp.text
    input_id = inp.json()["id"]
    assert input_id.startswith("upload:")
    r = _submit(server, analysis="predict", model_id=model["id"], input_id=input_id)
    assert r.status_code == 201, r.text
    job = server.wait_job(r.json()["id"])
    assert job["status"] == "finished", job
    assert job["progress"] == 1.0
    result = server.client.get(f"/api/jobs/{job['id']}/result").json()

    logits, relus = _onnxruntime_with_relus(model_file, x)
    np.testing.assert_allclose(result["logits"], logits, atol=1e-5)
    exp = np.exp(logits - logits.max())
    np.testing.assert_allclose(result["scores"], exp / exp.sum(), atol=1e-6)
    assert result["predicted"] == int(np.argmax(logits))
    assert [layer["neurons"] for layer in result["layers"]] == [16, 12]
    for layer, relu_out in zip(result["layers"], relus, strict=True):
        assert layer["pattern"] == (relu_out > 0).astype(int).tolist()
        assert layer["active"] == int((relu_out > 0).sum())
        assert layer["fraction_active"] == pytest.approx((relu_out > 0).mean())

    again = _submit(server, analysis="predict", model_id=model["id"], input_id=input_id, params={})
    assert again.status_code == 200
    assert again.json()["id"] == job["id"] and again.json()["cached"] is True
    listed = server.client.get("/api/jobs", params={"model_id": model["id"]}).json()
    assert [j["id"] for j in listed].count(job["id"]) == 1


def test_image_and_csv_inputs_are_resized_and_scaled(server: Server, model: dict) -> None:
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    r = server.client.post(f"/api/models/{model['id']}/inputs",
                           files={"file": ("digit.png", buf.getvalue())})
    assert r.status_code == 201, r.text
    got = server.client.get(f"/api/models/{model['id']}/inputs/{r.json()['id']}").json()
    assert got["shape"] == [1, 8, 8]
    np.testing.assert_allclose(got["values"], pixels[None] / 255.0, atol=1e-6)

    gray = np.full((40, 30, 3), 51, dtype=np.uint8)  # an RGB photo of uniform gray, bigger
    buf = io.BytesIO()
    Image.fromarray(gray, mode="RGB").save(buf, format="JPEG", quality=100)
    r = server.client.post(f"/api/models/{model['id']}/inputs",
                           files={"file": ("photo.jpg", buf.getvalue())})
    assert r.status_code == 201, r.text
    got = server.client.get(f"/api/models/{model['id']}/inputs/{r.json()['id']}").json()
    np.testing.assert_allclose(got["values"], np.full((1, 8, 8), 0.2), atol=2 / 255)

    values = np.round(rng.random(64), 4)
    csv = ",".join(str(v) for v in values).encode()
    r = server.client.post(f"/api/models/{model['id']}/inputs", files={"file": ("x.csv", csv)})
    assert r.status_code == 201, r.text
    got = server.client.get(f"/api/models/{model['id']}/inputs/{r.json()['id']}").json()
    np.testing.assert_allclose(np.ravel(got["values"]), values, atol=1e-6)
    ids = [i["id"] for i in server.client.get(f"/api/models/{model['id']}/inputs").json()]
    assert r.json()["id"] in ids


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")
def test_torchscript_is_refused_and_converted_locally_matches_torch(server: Server,
                                                                   tmp_path: Path) -> None:
    """TorchScript runs code when loaded: the service refuses it and names the local
    command; what that command writes uploads and predicts as torch does."""
    torch.manual_seed(5)
    module = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                           nn.Linear(192, 10)).eval()
    path = tmp_path / "conv.pt"
    torch.jit.trace(module, torch.zeros(1, 1, 8, 8)).save(str(path))
    files = {"file": ("conv.pt", path.read_bytes())}
    assert "relu-atlas convert" in _detail(
        server.client.post("/api/models", files=files, data={"input_shape": "1,8,8"}), 422)
    out = tmp_path / "conv.onnx"
    run = subprocess.run([sys.executable, "-m", "backend.cli", "convert", str(path),
                          "--input-shape", "1,8,8", "-o", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    r = server.client.post("/api/models", files={"file": ("conv.onnx", out.read_bytes())})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["format"] == "onnx" and info["input_shape"] == [1, 8, 8]
    x = torch.rand(1, 1, 8, 8)
    inp = _upload_npy(server, info["id"], x.numpy()).json()["id"]
    job = server.wait_job(_submit(server, analysis="predict", model_id=info["id"],
                                  input_id=inp).json()["id"])
    assert job["status"] == "finished", job
    result = server.client.get(f"/api/jobs/{job['id']}/result").json()
    with torch.no_grad():
        logits = module(x)[0].numpy()
        active = int((module[0](x) > 0).sum())
    np.testing.assert_allclose(result["logits"], logits, atol=1e-5)
    assert result["layers"][0]["active"] == active


def test_card_given_on_upload_sets_input_range_and_gallery(server: Server,
                                                           tmp_path: Path) -> None:
    path = mlp_onnx(tmp_path / "ranged.onnx", seed=7)
    card = {"dataset": "digits", "input_range": [-1, 1], "classes": list("abcdefghij")}
    r = server.client.post("/api/models", files={"file": ("ranged.onnx", path.read_bytes())},
                           data={"card": json.dumps(card)})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["card"] == card
    pixels = np.random.default_rng(4).integers(0, 256, (8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    up = server.client.post(f"/api/models/{info['id']}/inputs",
                            files={"file": ("d.png", buf.getvalue())}).json()
    got = server.client.get(f"/api/models/{info['id']}/inputs/{up['id']}").json()
    expected = -1 + 2 * pixels[None].astype(float) / 255
    np.testing.assert_allclose(got["values"], expected, atol=1e-6)
    if (SAMPLE_MODELS / "gallery" / "digits.npz").exists():
        listed = server.client.get(f"/api/models/{info['id']}/inputs").json()
        assert {i["source"] for i in listed} == {"gallery", "upload"}
    bad = server.client.post("/api/models", files={"file": ("x.onnx", path.read_bytes())},
                             data={"card": '{"input_range": [1, 0]}'})
    assert "input_range" in _detail(bad, 422)


def test_sample_models_and_gallery(server: Server) -> None:
    samples = sorted(SAMPLE_MODELS.glob("digits_*.onnx"))
    if not samples or not (SAMPLE_MODELS / "gallery" / "digits.npz").exists():
        pytest.skip("sample models not trained yet")
    from sample_models import load_gallery

    registered = {m["name"]: m for m in server.client.get("/api/models").json()
                  if m["source"] == "sample"}
    path = samples[0]
    info = registered[path.stem]
    assert info["card"]["dataset"] == "digits"
    inputs = server.client.get(f"/api/models/{info['id']}/inputs").json()
    gx, gy = load_gallery("digits")
    assert sum(i["source"] == "gallery" for i in inputs) == len(gy)
    assert inputs[5]["id"] == "gallery:digits:5" and inputs[5]["target"] == int(gy[5])
    values = server.client.get(f"/api/models/{info['id']}/inputs/gallery:digits:5").json()
    np.testing.assert_allclose(values["values"], gx[5], atol=1e-7)

    r = _submit(server, analysis="predict", model_id=info["id"], input_id="gallery:digits:5")
    job = server.wait_job(r.json()["id"])
    assert job["status"] == "finished", job
    result = server.client.get(f"/api/jobs/{job['id']}/result").json()
    logits, _ = _onnxruntime_with_relus(path, gx[5])
    assert result["predicted"] == int(np.argmax(logits))
    assert result["label"] == int(gy[5])
    assert result["correct"] == (result["predicted"] == int(gy[5]))


def test_cancel_a_long_job(server: Server, model: dict) -> None:
    inp = _upload_npy(server, model["id"], np.zeros((1, 8, 8), np.float32)).json()["id"]
    r = _submit(server, analysis="test_slow", model_id=model["id"], input_id=inp,
                params={"steps": 600, "step_s": 0.1, "tag": "cancel"})
    job_id = r.json()["id"]
    running = server.wait_job(job_id, until=("running",))
    assert running["status"] == "running"
    time.sleep(0.5)
    assert server.client.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    job = server.wait_job(job_id, timeout=15)
    assert job["status"] == "cancelled", job
    assert job["progress"] < 0.5
    r = server.client.get(f"/api/jobs/{job_id}/result")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]


def test_cancel_stops_a_job_stuck_between_progress_reports(server: Server,
                                                          model: dict) -> None:
    """An analysis inside one long call (no progress report for 5 s) is stopped by the
    worker's watchdog before it would look at the cancel flag itself; the worker then runs
    the next job as usual."""
    inp = _upload_npy(server, model["id"], np.full((1, 8, 8), 0.25, np.float32)).json()["id"]
    r = _submit(server, analysis="test_slow", model_id=model["id"], input_id=inp,
                params={"steps": 6, "step_s": 5, "tag": "stuck"})
    job_id = r.json()["id"]
    server.wait_job(job_id, until=("running",))
    time.sleep(0.5)
    start = time.monotonic()
    assert server.client.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    job = server.wait_job(job_id, timeout=30)
    took = time.monotonic() - start
    print(f"cancel took effect after {took:.2f} s")
    assert job["status"] == "cancelled" and job["progress"] < 0.5, job
    assert took < 4.5, f"cancelled only after {took:.1f} s: at the analysis' own next report"
    after = _submit(server, analysis="test_slow", model_id=model["id"], input_id=inp,
                    params={"steps": 1, "step_s": 0, "tag": "after-stuck"}).json()["id"]
    assert server.wait_job(after)["status"] == "finished"


def test_card_set_after_upload_is_used_and_drops_cached_results(server: Server,
                                                                tmp_path: Path) -> None:
    path = mlp_onnx(tmp_path / "carded.onnx", seed=31)
    info = server.client.post("/api/models", files={"file": ("carded.onnx", path.read_bytes())}
                              ).json()
    inp = _upload_npy(server, info["id"], np.full((1, 8, 8), 0.5, np.float32)).json()["id"]
    body = {"analysis": "predict", "model_id": info["id"], "input_id": inp}
    first = _submit(server, **body).json()
    assert server.wait_job(first["id"])["status"] == "finished"
    assert _submit(server, **body).json()["cached"]
    card = {"name": "my net", "dataset": "digits", "input_range": [-1, 1],
            "classes": list("abcdefghij")}
    r = server.client.put(f"/api/models/{info['id']}/card", json=card)
    assert r.status_code == 200, r.text
    assert r.json()["card"] == card and r.json()["name"] == "my net"
    assert server.client.get(f"/api/models/{info['id']}").json()["card"] == card
    pixels = np.random.default_rng(6).integers(0, 256, (8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    up = server.client.post(f"/api/models/{info['id']}/inputs",
                            files={"file": ("d.png", buf.getvalue())}).json()
    got = server.client.get(f"/api/models/{info['id']}/inputs/{up['id']}").json()
    np.testing.assert_allclose(got["values"], -1 + 2 * pixels[None].astype(float) / 255,
                               atol=1e-6)
    again = _submit(server, **body).json()
    assert not again["cached"] and again["id"] != first["id"]  # the card may change results
    for bad in ({"input_range": [1, 0]}, {"classes": "abc"}, {"name": "n" * 300}):
        _detail(server.client.put(f"/api/models/{info['id']}/card", json=bad), 422)
    sample = next(m for m in server.client.get("/api/models").json()
                  if m["source"] == "sample") if SAMPLE_MODELS.exists() else None
    if sample is not None:
        _detail(server.client.put(f"/api/models/{sample['id']}/card", json=card), 403)


def test_failing_analysis_fails_the_job_with_its_reason(server: Server, model: dict) -> None:
    inp = _upload_npy(server, model["id"], np.ones((1, 8, 8), np.float32)).json()["id"]
    r = _submit(server, analysis="test_slow", model_id=model["id"], input_id=inp,
                params={"steps": 1, "step_s": 0, "fail": True})
    job = server.wait_job(r.json()["id"])
    assert job["status"] == "failed" and "asked to fail" in job["error"]
    assert server.client.get("/api/health").status_code == 200


def test_artifacts(server: Server, model: dict) -> None:
    inp = _upload_npy(server, model["id"], np.ones((1, 8, 8), np.float32)).json()["id"]
    r = _submit(server, analysis="test_slow", model_id=model["id"], input_id=inp,
                params={"steps": 3, "step_s": 0})
    job = server.wait_job(r.json()["id"])
    assert job["status"] == "finished", job
    assert server.client.get(f"/api/jobs/{job['id']}/result").json()["steps"] == 3
    assert server.client.get(f"/api/jobs/{job['id']}/artifacts").json() == ["steps.txt"]
    assert server.client.get(f"/api/jobs/{job['id']}/artifacts/steps.txt").text == "3"
    assert server.client.get(f"/api/jobs/{job['id']}/artifacts/..%2Fatlas.db").status_code == 404


# -- bad input: every case is a 4xx with a clear {"detail": "..."} ---------------------------


def _detail(r, status: int) -> str:
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


def test_malformed_and_unsupported_models(server: Server, model_file: Path,
                                          tmp_path: Path) -> None:
    def upload(name: str, data: bytes):
        return server.client.post("/api/models", files={"file": (name, data)})

    data = model_file.read_bytes()
    assert "ONNX" in _detail(upload("trunc.onnx", data[: len(data) // 2]), 422)
    rnd = np.random.default_rng(0).bytes(5000)
    assert "ONNX" in _detail(upload("random.onnx", rnd), 422)
    bad = with_unsupported_op(model_file, tmp_path / "sig.onnx")
    detail = _detail(upload("sig.onnx", bad.read_bytes()), 422)
    assert "Sigmoid" in detail and "relu0" in detail
    assert ".onnx" in _detail(upload("model.txt", b"hello"), 415)
    _detail(upload("evil.pt", pickle.dumps({"weights": [1, 2, 3]})), 422)
    big = np.random.default_rng(1).bytes(MAX_UPLOAD_MB * 1024 * 1024 + 200_000)
    assert "too large" in _detail(upload("big.onnx", big), 413)
    assert server.client.get("/api/health").status_code == 200


def test_bad_inputs(server: Server, model: dict) -> None:
    mid = model["id"]
    assert "(1, 8, 8)" in _detail(_upload_npy(server, mid, np.zeros((1, 7, 7))), 422)
    nan = np.zeros((1, 8, 8))
    nan[0, 3, 3] = np.nan
    assert "NaN" in _detail(_upload_npy(server, mid, nan), 422)
    assert "pickle" in _detail(_upload_npy(server, mid, np.array([{"a": 1}], dtype=object)), 422)
    csv = server.client.post(f"/api/models/{mid}/inputs", files={"file": ("x.csv", b"1,2,3")})
    assert "shape" in _detail(csv, 422)
    png = server.client.post(f"/api/models/{mid}/inputs", files={"file": ("x.png", b"nope")})
    assert "image" in _detail(png, 422)
    _detail(server.client.post(f"/api/models/{'0' * 64}/inputs",
                               files={"file": ("x.csv", b"1")}), 404)
    _detail(server.client.get(f"/api/models/{mid}/inputs/upload:{'0' * 64}"), 404)


def test_bad_job_requests(server: Server, model: dict) -> None:
    mid = model["id"]
    inp = _upload_npy(server, mid, np.zeros((1, 8, 8), np.float32)).json()["id"]
    assert "nope" in _detail(_submit(server, analysis="nope", model_id=mid, input_id=inp), 404)
    assert "model" in _detail(_submit(server, analysis="predict", model_id="x" * 64,
                                      input_id=inp), 404)
    assert "input" in _detail(_submit(server, analysis="predict", model_id=mid,
                                      input_id="gallery:digits:99999"), 404)
    assert "input_id" in _detail(_submit(server, analysis="predict", model_id=mid), 422)
    detail = _detail(_submit(server, analysis="test_slow", model_id=mid, input_id=inp,
                             params={"steps": 0}), 422)
    assert "steps" in detail
    _detail(_submit(server, analysis="test_slow", model_id=mid, input_id=inp,
                    params={"step_s": "slow"}), 422)
    assert "model_id" in _detail(server.client.post("/api/jobs", json={"analysis": "x"}), 422)
    _detail(server.client.post("/api/jobs", content=b"{not json",
                               headers={"content-type": "application/json"}), 422)
    _detail(server.client.get("/api/jobs/nope"), 404)
    _detail(server.client.post("/api/jobs/nope/cancel"), 404)
    _detail(server.client.get("/api/jobs/nope/result"), 404)
    _detail(server.client.get("/api/models/nope"), 404)
    _detail(server.client.delete("/api/models/nope"), 404)


def test_delete_model(server: Server, tmp_path: Path) -> None:
    path = mlp_onnx(tmp_path / "other.onnx", seed=11)
    mid = server.client.post("/api/models", files={"file": ("other.onnx", path.read_bytes())}
                             ).json()["id"]
    assert server.client.delete(f"/api/models/{mid}").status_code == 204
    assert server.client.get(f"/api/models/{mid}").status_code == 404
    assert mid not in {m["id"] for m in server.client.get("/api/models").json()}


def test_jobs_survive_a_crash_and_restart(server: Server, model: dict) -> None:
    """kill -9 the server and its Dask workers with jobs running and queued, start it again
    on the same data dir: every job record survives and finishes, none is stuck."""
    inp = _upload_npy(server, model["id"], np.full((1, 8, 8), 0.5, np.float32)).json()["id"]
    ids = [_submit(server, analysis="test_slow", model_id=model["id"], input_id=inp,
                   params={"steps": 10, "step_s": 0.1, "tag": f"restart-{k}"}).json()["id"]
           for k in range(2)]  # one worker: one runs, one waits
    server.wait_job(ids[0], until=("running",))
    before = {j: server.client.get(f"/api/jobs/{j}").json()["status"] for j in ids}
    assert "queued" in before.values() and "running" in before.values()
    server.kill()

    again = Server(server.data_dir, **{k: v for k, v in server.env.items()
                                       if k != "ATLAS_DATA_DIR"}).start()
    try:
        for job_id in ids:
            job = again.wait_job(job_id, timeout=60)
            assert job["status"] == "finished", job
            assert again.client.get(f"/api/jobs/{job_id}/result").json()["steps"] == 10
        assert set(ids) <= {j["id"] for j in again.client.get("/api/jobs").json()}
        assert again.client.get(f"/api/models/{model['id']}").status_code == 200
    finally:
        again.kill()
