"""Compare over the real service: three sample models, 20 gallery inputs, every cell checked.

The batch runs as jobs on a real uvicorn server with Dask workers. Each cell must equal the
single analysis run here in-process (the same plug-in on the same ONNX file and input);
onnxruntime is the independent oracle for predictions, and the aggregated certified accuracy
is checked against the direct proofs at the proof eps. The HTML report must embed every
figure and plotly.js, with no external script.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from app import load_network
from backend.analyses import REGISTRY, JobContext, jsonable
from frontend import comparison
from frontend.client import ApiClient
from frontend.figures import compare as figures
from frontend.report import ReportContent, build_report
from tests.conftest import SAMPLE_MODELS
from tests.service import Server

ARCH = "fc"
METHODS = ("standard", "pgd", "ibp")
N_INPUTS = 20
PARAMS = comparison.CompareParams(eps=0.05, tol=0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    if not all((SAMPLE_MODELS / f"digits_{ARCH}_{m}.onnx").exists() for m in METHODS):
        pytest.skip("sample models not built")
    srv = Server(tmp_path_factory.mktemp("compare") / "data", ATLAS_DASK_WORKERS="2").start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def api(server: Server) -> ApiClient:
    return ApiClient(server.url)


@pytest.fixture(scope="module")
def models(api: ApiClient) -> list[dict]:
    by_name = {m["name"]: m for m in api.models()}
    return [by_name[f"digits_{ARCH}_{m}"] for m in METHODS]


@pytest.fixture(scope="module")
def batch(api: ApiClient, models: list[dict]) -> tuple[list[str], comparison.Cells, list]:
    input_ids = [f"gallery:digits:{i}" for i in range(N_INPUTS)]
    offered = {a["name"] for a in api.analyses()}
    todo = comparison.plan([m["id"] for m in models], input_ids, PARAMS, offered)
    assert {"predict", "proof_features", "proof_eps"} <= set(todo.analyses)
    updates: list[tuple[int, float]] = []
    cells = comparison.run(api, todo, lambda c: updates.append((c.done, c.progress)))
    return todo, cells, updates


def _same(served, local, path: str = "") -> None:
    """Equal JSON, floats to float32 round-off (the worker and this process share the code);
    measured run times (``timings``) differ by nature and are skipped."""
    if isinstance(local, dict):
        assert set(served) == set(local), path
        for k in set(local) - {"timings"}:
            _same(served[k], local[k], f"{path}.{k}")
    elif isinstance(local, list):
        assert len(served) == len(local), path
        for k, (a, b) in enumerate(zip(served, local, strict=True)):
            _same(a, b, f"{path}[{k}]")
    elif isinstance(local, float) and not isinstance(served, bool):
        assert served is not None and math.isclose(served, local, rel_tol=1e-5, abs_tol=1e-6), \
            f"{path}: {served} != {local}"
    else:
        assert served == local, f"{path}: {served!r} != {local!r}"


def test_batch_cells_equal_single_analyses(batch, models, tmp_path: Path) -> None:
    todo, cells, updates = batch
    input_ids = todo.input_ids
    per_input = [a for a in todo.analyses if a in comparison.CELLS]
    per_model = [a for a in todo.analyses if a in comparison.MODEL_CELLS]
    assert per_model == ["patterns_coverage"]
    assert not cells.errors
    assert cells.done == cells.total == len(models) * (N_INPUTS * len(per_input) + len(per_model))
    assert len(cells.batch_ids) == len(todo.analyses)  # one fan-out batch per analysis
    assert updates[-1] == (cells.total, 1.0)
    assert any(0 < done < cells.total for done, _ in updates), "no partial results seen"

    gallery = np.load(SAMPLE_MODELS / "gallery" / "digits.npz")
    for model in models:
        path = SAMPLE_MODELS / model["name"]
        net = load_network(path.with_suffix(".onnx"))
        card = json.loads(path.with_suffix(".json").read_text())
        session = ort.InferenceSession(str(path.with_suffix(".onnx")),
                                       providers=["CPUExecutionProvider"])
        ctx = JobContext(net=net, x=None, label=None, card=card, artifacts=tmp_path,
                         progress=lambda f, m: None, model_id=model["id"],
                         _gallery=lambda n: (torch.as_tensor(gallery["x"][:n]),
                                             torch.as_tensor(gallery["y"][:n])))
        for analysis in per_model:  # one cell per model, no input; run times differ
            spec = REGISTRY[analysis]
            local = jsonable(spec.run(ctx, spec.params.model_validate(
                comparison.cell_params(analysis, PARAMS))))
            served = cells.get(model["id"], None, analysis)
            local["proven_coverage"]["seconds"] = served["proven_coverage"]["seconds"]
            _same(served, local, f"{model['name']}/{analysis}")
        for k, input_id in enumerate(input_ids):
            x, label = gallery["x"][k], int(gallery["y"][k])
            ctx = JobContext(net=net, x=torch.as_tensor(x, dtype=net.dtype), label=label,
                             card=card, artifacts=tmp_path, progress=lambda f, m: None,
                             model_id=model["id"], input_id=input_id)
            for analysis in per_input:
                spec = REGISTRY[analysis]
                params = spec.params.model_validate(comparison.CELLS[analysis](PARAMS))
                local = jsonable(spec.run(ctx, params))
                _same(cells.get(model["id"], input_id, analysis), local,
                      f"{model['name']}/{input_id}/{analysis}")
            logits = session.run(None, {session.get_inputs()[0].name: x[None]})[0][0]
            served = cells.get(model["id"], input_id, "predict")
            assert served["predicted"] == int(np.argmax(logits))
            np.testing.assert_allclose(served["logits"], logits, rtol=1e-4, atol=1e-4)


def test_aggregates_agree_with_direct_proofs(batch, models) -> None:
    todo, cells, _ = batch
    input_ids, model_ids = list(todo.input_ids), list(todo.model_ids)
    summaries = comparison.summarize(cells, model_ids, input_ids, PARAMS)
    gallery = np.load(SAMPLE_MODELS / "gallery" / "digits.npz")
    for model, summary in zip(models, summaries, strict=True):
        session = ort.InferenceSession(str(SAMPLE_MODELS / f"{model['name']}.onnx"),
                                       providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: gallery["x"][:N_INPUTS]})[0]
        accuracy = float(np.mean(logits.argmax(1) == gallery["y"][:N_INPUTS]))
        assert summary.inputs == N_INPUTS and summary.accuracy == pytest.approx(accuracy)
        coverage = cells.get(model["id"], None, "patterns_coverage")
        assert summary.proven_coverage == coverage["proven_coverage"]
        assert summary.rule_list_fidelity == coverage["fidelity"]
        assert summary.certified_accuracy[0] == pytest.approx(accuracy)  # eps 0: correct only
        assert all(a >= b for a, b in zip(summary.certified_accuracy,
                                          summary.certified_accuracy[1:], strict=False))
        # at the proof eps: bisection and the direct proof agree except within tol of the edge
        k = int(np.argmin(np.abs(np.asarray(summary.eps_grid) - PARAMS.eps)))
        eps = summary.eps_grid[k]
        proven, unsure = 0, 0
        for i, input_id in enumerate(input_ids):
            proof = cells.get(model["id"], input_id, "proof_features")
            largest = cells.get(model["id"], input_id, "proof_eps")["largest_eps"][PARAMS.method]
            correct = int(np.argmax(logits[i])) == int(gallery["y"][i])
            proven += bool(correct and proof["certified"])
            unsure += abs(largest - eps) <= PARAMS.tol
            if proof["certified"]:
                assert proof["sufficient"] and proof["num_kept"] >= 1
        assert abs(summary.certified_accuracy[k] * N_INPUTS - proven) <= unsure
        assert sorted(summary.kept_counts) == sorted(
            cells.get(model["id"], i, "proof_features")["num_kept"] for i in input_ids
            if cells.get(model["id"], i, "proof_features")["certified"])


class _Scripts(HTMLParser):
    """Collects script tags (src attributes) and figure sections of the report."""

    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.sections: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "script" and attrs.get("src"):
            self.srcs.append(attrs["src"])
        if tag == "section" and "data-figure" in attrs:
            self.sections.append(attrs["data-figure"])


def test_report_embeds_every_figure(batch, models) -> None:
    todo, cells, _ = batch
    input_ids, model_ids = list(todo.input_ids), list(todo.model_ids)
    labels = [figures.model_label(m) for m in models]
    summaries = [s.to_json() for s in comparison.summarize(cells, model_ids, input_ids, PARAMS)]
    drawn = figures.batch_figures(labels, summaries, PARAMS.method, PARAMS.eps)
    drawn += figures.one_input_figures(
        labels, [cells.results[(m, input_ids[0])] for m in model_ids])
    png = io.BytesIO()
    Image.new("L", (8, 8), 200).save(png, format="PNG")
    summary = [{"model": label, "certified accuracy (crown, eps 0.05)": 0.25 + k / 8}
               for k, label in enumerate(labels)]
    html = build_report(ReportContent(title="test", models=models, params=PARAMS.query(),
                                      inputs=input_ids, figures=drawn, summary=summary,
                                      input_images=[(input_ids[0], png.getvalue())],
                                      link="http://127.0.0.1/compare?run=1"))
    for row in summary:  # the per-model metric cards, as a table
        assert f"<td>{row['model']}</td>" in html
        assert f"<td>{row['certified accuracy (crown, eps 0.05)']}</td>" in html
    embedded = re.search(r"src='data:image/png;base64,([^']+)'", html).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(embedded))).size == (8, 8)
    parser = _Scripts()
    parser.feed(html)
    assert parser.srcs == []  # self-contained: plotly.js is inline
    assert parser.sections == [name for name, _ in drawn]
    assert html.count("Plotly.newPlot(") == len(drawn)
    assert re.search(r"plotly\.js v\d", html)
    for model in models:
        assert model["card"]["architecture"] in html
    manifest = re.search(r"<script type='application/json' id='atlas-report'>\n(.*)\n</script>",
                         html).group(1)
    assert json.loads(manifest)["inputs"] == input_ids


def test_params_round_trip_through_the_url() -> None:
    params = comparison.CompareParams(eps=0.07, method="deepz", eps_max=0.25, tol=0.003)
    assert comparison.CompareParams.from_query(params.query()) == params
    assert comparison.CompareParams.from_query({"eps": "oops"}) == comparison.CompareParams()
