"""Pattern rules mined from a dataset the user uploads, through the real HTTP server.

The dataset (150 shuffled gallery inputs) is uploaded as .npz and as CSV, mined by a
``patterns`` job, and every rule's held-out support, precision and recall are recomputed with
onnxruntime on exactly the uploaded inputs (not with the engine). Bad datasets get 4xx.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SAMPLE_MODELS
from tests.service import Server, module_server
from tests.test_service_analyses import OnnxOracle
from tests.test_service_patterns import FC, _fires

N = 150
X0 = "gallery:digits:0"  # the job's current input (the rules that fire on it)


server = module_server("pattern_datasets")


@pytest.fixture(scope="module")
def model_id(server: Server) -> str:
    return next(m["id"] for m in server.client.get("/api/models").json() if m["name"] == FC)


@pytest.fixture(scope="module")
def uploaded() -> tuple[np.ndarray, np.ndarray]:
    with np.load(SAMPLE_MODELS / "gallery" / "digits.npz") as gallery:
        x, y = gallery["x"].astype(np.float32), gallery["y"]
    order = np.random.default_rng(7).permutation(len(x))[:N]
    return x[order], y[order]


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _csv(x: np.ndarray, y: np.ndarray | None = None, header: bool = False) -> bytes:
    rows = x.reshape(len(x), -1)
    if y is not None:
        rows = np.hstack([rows, y[:, None]])
    names = [f"p{i}" for i in range(x[0].size)] + (["label"] if y is not None else [])
    head = ",".join(names) + "\n" if header else ""
    return (head + "\n".join(",".join(f"{v:.9g}" for v in row) for row in rows)).encode()


def _upload(server: Server, model_id: str, name: str, data: bytes):
    return server.client.post(f"/api/models/{model_id}/datasets", files={"file": (name, data)})


def _mine(server: Server, model_id: str, dataset_id: str) -> dict:
    r = server.client.post("/api/jobs", json={
        "analysis": "patterns", "model_id": model_id, "input_id": X0,
        "params": {"dataset_id": dataset_id, "verify": 0, "thumbnails": 0, "min_support": 3}})
    assert r.status_code == 201, r.text
    job = server.wait_job(r.json()["id"], timeout=120)
    assert job["status"] == "finished", job
    return server.client.get(f"/api/jobs/{job['id']}/result").json()


def _check_against_onnxruntime(result: dict, x: np.ndarray) -> None:
    logits, relus, _ = OnnxOracle(SAMPLE_MODELS / f"{FC}.onnx").run(x)
    held = np.asarray(result["heldout"])
    assert result["num_inputs"] == len(x) and len(held) == result["num_heldout"]
    assert len(set(held.tolist())) == len(held) and 0 <= held.min() and held.max() < len(x)
    assert 0.2 * len(x) < len(held) < 0.4 * len(x)
    decided = logits[held].argmax(1)
    pattern = relus[result["layer"] - 1][held]
    assert result["rules"]
    for rule in result["rules"]:
        fires = _fires(rule, pattern)
        hits = decided == rule["target"]
        assert rule["support"] == int(fires.sum()), rule["text"]
        if fires.any():
            assert rule["precision"] == pytest.approx((fires & hits).sum() / fires.sum())
        if hits.any():
            assert rule["recall"] == pytest.approx((fires & hits).sum() / hits.sum())
    assert any(r["support"] > 0 and r["precision"] == 1.0 for r in result["rules"])


def test_rules_mined_from_uploaded_npz_and_csv_hold_on_those_inputs(server, model_id,
                                                                    uploaded) -> None:
    x, y = uploaded
    r = _upload(server, model_id, "mine.npz", _npz(x=x, y=y))
    assert r.status_code == 201, r.text
    with_labels = r.json()
    assert with_labels["id"].startswith("dataset:") and with_labels["n"] == N
    assert with_labels["shape"] == [N, 1, 8, 8] and with_labels["has_labels"]
    meta = server.client.get(f"/api/models/{model_id}/datasets/{with_labels['id']}")
    assert meta.status_code == 200 and meta.json() == with_labels
    # the same inputs as CSV with a named label column: same content, same id
    r = _upload(server, model_id, "mine.csv", _csv(x, y, header=True))
    assert r.status_code == 201, r.text
    assert r.json()["id"] == with_labels["id"]
    # without labels (mining needs none): another dataset
    r = _upload(server, model_id, "plain.csv", _csv(x))
    assert r.status_code == 201, r.text
    plain = r.json()
    assert plain["n"] == N and not plain["has_labels"] and plain["id"] != with_labels["id"]

    for dataset in (with_labels, plain):
        result = _mine(server, model_id, dataset["id"])
        assert result["source"] == dataset["id"]
        _check_against_onnxruntime(result, x)


def test_uint8_image_arrays_are_resized_and_scaled_like_uploaded_images(server,
                                                                        model_id) -> None:
    images = np.random.default_rng(1).integers(0, 256, (12, 16, 16), dtype=np.uint8)
    r = _upload(server, model_id, "images.npy", _npy(images))
    assert r.status_code == 201, r.text
    assert r.json()["shape"] == [12, 1, 8, 8]
    r = server.client.post("/api/jobs", json={
        "analysis": "patterns", "model_id": model_id, "input_id": X0,
        "params": {"dataset_id": r.json()["id"], "verify": 0, "min_support": 1,
                   "min_precision": 0.5}})
    job = server.wait_job(r.json()["id"], timeout=120)
    assert job["status"] == "finished", job
    result = server.client.get(f"/api/jobs/{job['id']}/result").json()
    bilinear = Image.Resampling.BILINEAR
    expected = np.stack([np.asarray(Image.fromarray(im).resize((8, 8), bilinear), np.float32)
                         / 255 for im in images])[:, None]
    _check_against_onnxruntime(result, expected)


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _zip_with_member(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def test_bad_datasets_get_clear_4xx(server, model_id, uploaded) -> None:
    x, y = uploaded

    def detail(name: str, data: bytes, status: int = 422) -> str:
        r = _upload(server, model_id, name, data)
        assert r.status_code == status, (name, r.status_code, r.text)
        return r.json()["detail"]

    assert "(1, 8, 8)" in detail("small.npz", _npz(x=np.zeros((20, 1, 7, 7), np.float32)))
    nan = x[:20].copy()
    nan[3, 0, 2, 2] = np.nan
    assert "NaN" in detail("nan.npz", _npz(x=nan))
    assert "NaN" in detail("nan.csv", _csv(nan))
    pickled = _npz(x=np.array([{"a": 1}] * 20, dtype=object))
    assert "pickle" in detail("pickle.npz", pickled)
    assert "'x'" in detail("nox.npz", _npz(inputs=x))
    assert "labels" in detail("labels.npz", _npz(x=x, y=y[:10]))
    assert "labels" in detail("labels.csv", _csv(x, y + 0.5, header=True))
    assert "not a readable .npz" in detail("junk.npz", b"PK\x03\x04 not really a zip")
    assert ".npz" in detail("data.txt", b"1,2,3")
    too_many = np.zeros((20_001, 1, 8, 8), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, x=too_many)
    assert "20000" in detail("many.npz", buf.getvalue(), 413)
    # a member that unpacks to more than the limit is refused before it is inflated
    header = b"\x93NUMPY\x01\x00" + b"{'descr': '<f4', 'fortran_order': False, 'shape': (9, ), }"
    bomb = _zip_with_member("x.npy", header + b"\0" * 300 * 2**20)
    assert "unpacks to" in detail("bomb.npz", bomb, 413)
    assert server.client.get(f"/api/models/{model_id}/datasets/dataset:{'0' * 64}"
                             ).status_code == 404
    assert server.client.get(f"/api/models/{model_id}/datasets/dataset:xyz").status_code == 404
    # jobs: a malformed id is a 422, an unknown one fails the job with a clear message
    r = server.client.post("/api/jobs", json={
        "analysis": "patterns", "model_id": model_id, "input_id": X0,
        "params": {"dataset_id": "nope"}})
    assert r.status_code == 422 and "dataset_id" in r.json()["detail"]
    r = server.client.post("/api/jobs", json={
        "analysis": "patterns", "model_id": model_id, "input_id": X0,
        "params": {"dataset_id": f"dataset:{'0' * 64}"}})
    job = server.wait_job(r.json()["id"])
    assert job["status"] == "failed" and "unknown dataset" in job["error"], job
