"""Proof jobs with the complete methods through the real server: branch-and-bound proof
features say what they show, and the eps bisection with alpha-CROWN and branch and bound
under a time limit returns radii that gradient attacks (onnxruntime, written in
test_service_analyses) cannot break."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import SAMPLE_MODELS
from tests.service import Server, module_server
from tests.test_service_analyses import FC, X0, OnnxOracle, _margins, attack_points

server = module_server("proof_methods")


@pytest.fixture(scope="module")
def model(server: Server) -> str:
    return {m["name"]: m["id"] for m in server.client.get("/api/models").json()}[FC]


def _run(server: Server, model: str, analysis: str, params: dict) -> dict:
    r = server.client.post("/api/jobs", json={"analysis": analysis, "model_id": model,
                                              "input_id": X0, "params": params})
    assert r.status_code == 201, r.text
    job = server.wait_job(r.json()["id"], timeout=240)
    assert job["status"] == "finished", job
    return server.client.get(f"/api/jobs/{job['id']}/result").json()


def _x(server: Server, model: str) -> np.ndarray:
    r = server.client.get(f"/api/models/{model}/inputs/{X0}")
    return np.asarray(r.json()["values"], np.float64).reshape(-1)


def test_bisection_with_complete_methods_survives_attacks(server: Server, model: str) -> None:
    result = _run(server, model, "proof_eps", {"eps_max": 0.3, "tol": 0.01,
                                               "methods": ["crown", "alpha-crown", "bab"],
                                               "time_limit_s": 20})
    found = result["largest_eps"]
    assert set(found) == {"crown", "alpha-crown", "bab"}
    assert found["bab"] >= found["crown"] > 0  # bab starts from CROWN's proof at each eps
    oracle, x = OnnxOracle(SAMPLE_MODELS / f"{FC}.onnx"), _x(server, model)
    for method, eps in found.items():
        points = attack_points(oracle, x, result["predicted"], eps, seed=2)
        assert _margins(oracle.logits(points), result["predicted"]).min() > 0, method


def test_bab_proof_features_are_alpha_crowns_or_none(server: Server, model: str) -> None:
    oracle, x = OnnxOracle(SAMPLE_MODELS / f"{FC}.onnx"), _x(server, model)
    for eps in (0.03, 0.2):
        result = _run(server, model, "proof_features", {"eps": eps, "method": "bab",
                                                        "time_limit_s": 20})
        assert result["method"] == "bab" and result["note"]
        if result["certified"]:
            points = attack_points(oracle, x, result["predicted"], eps, seed=3)
            assert _margins(oracle.logits(points), result["predicted"]).min() > 0
        if result["num_kept"]:
            assert result["certified"] and result["sufficient"]
            assert "alpha-CROWN proves" in result["note"]
        elif result["certified"]:
            assert "none explain" in result["note"]
        else:
            assert "unknown" in result["note"]
