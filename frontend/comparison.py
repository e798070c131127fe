"""A comparison of models over inputs, run as ordinary single-analysis jobs over the API.

Every cell (one model, one input, one analysis) is the job the analysis' own page would run
with the same parameters, so a cell always equals the single-analysis result (and is served
from the job cache when that result exists). Each analysis fans out over models x inputs as
one batch (``POST /api/batches``: one parent, one child job per pair, run in parallel by the
service's Dask workers); polling the batches gives one overall progress and the children's
results as they finish. Nothing here imports Streamlit: the page, tests and benchmark share it.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from frontend.client import ApiClient

POLL_SECONDS = 0.5
HTTP_THREADS = 8
BISECTED = ("interval", "deepz", "crown")  # largest-eps bars always shown, beside the chosen one


@dataclass(frozen=True)
class CompareParams:
    """The knobs of a comparison; each cell's analysis takes the ones it needs."""

    eps: float = 0.05  # proof features: L-inf radius proven
    method: str = "crown"  # bound method of the proofs and of the certified-accuracy curve
    time_limit_s: float = 10.0  # per input and method: branch and bound, the eps bisection
    eps_max: float = 0.5  # largest certified eps: bisection range ...
    tol: float = 1e-3  # ... and tolerance
    length: float = 0.3  # linear regions: L-inf length of the FGSM and random segments
    random_directions: int = 4
    top_k: int = 10  # saliency: first-layer neurons the SMT mask keeps
    threshold: float = 0.5

    def query(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_query(cls, query: dict[str, str]) -> CompareParams:
        """Parameters from URL query values, ignoring missing or malformed ones."""
        values = {}
        for f in fields(cls):
            if f.name in query:
                try:
                    values[f.name] = type(getattr(cls(), f.name))(query[f.name])
                except ValueError:
                    continue
        return cls(**values)


# analysis name -> the parameters its job gets: those its own page sends
CELLS: dict[str, Callable[[CompareParams], dict]] = {
    "predict": lambda p: {},
    "proof_features": lambda p: {"eps": p.eps, "method": p.method,
                                 "time_limit_s": p.time_limit_s},
    "proof_eps": lambda p: {"eps_max": p.eps_max, "tol": p.tol,
                            "methods": list(dict.fromkeys([*BISECTED, p.method])),
                            "time_limit_s": p.time_limit_s},
    "linear_regions_line": lambda p: {"mode": "direction", "direction": "fgsm",
                                      "length": p.length,
                                      "random_directions": p.random_directions},
    "saliency": lambda p: {"top_k": p.top_k, "threshold": p.threshold},
}

# analysis name -> the parameters of a per-model cell: one job per model, no input
MODEL_CELLS: dict[str, Callable[[CompareParams], dict]] = {
    "patterns_coverage": lambda p: {"eps": p.eps},  # proven coverage on eps-balls
}

Cell = tuple[str, str | None, str]  # (model_id, input_id, analysis); no input: a model cell


def cell_params(analysis: str, params: CompareParams) -> dict:
    """The parameters the cells of ``analysis`` get (what its own page sends)."""
    return (MODEL_CELLS if analysis in MODEL_CELLS else CELLS)[analysis](params)


@dataclass(frozen=True)
class Plan:
    """Which models, inputs and analyses; each analysis becomes one batch."""

    model_ids: tuple[str, ...]
    input_ids: tuple[str, ...]
    params: CompareParams
    analyses: tuple[str, ...]

    @property
    def total(self) -> int:
        return sum(len(self.model_ids) * len(self.inputs_of(a)) for a in self.analyses)

    def inputs_of(self, analysis: str) -> tuple[str | None, ...]:
        """The inputs ``analysis`` runs on: every input, or none for a per-model cell."""
        return (None,) if analysis in MODEL_CELLS else self.input_ids

    def cells(self) -> list[Cell]:
        return [(m, i, a) for a in self.analyses for m in self.model_ids
                for i in self.inputs_of(a)]


def plan(model_ids: Iterable[str], input_ids: Iterable[str], params: CompareParams,
         available: Iterable[str] | None = None) -> Plan:
    """The comparison of every model on every input, by every cell analysis the service has
    (and the per-model ones, once per model)."""
    offered = set([*CELLS, *MODEL_CELLS] if available is None else available)
    return Plan(tuple(dict.fromkeys(model_ids)), tuple(dict.fromkeys(input_ids)), params,
                tuple(a for a in [*CELLS, *MODEL_CELLS] if a in offered))


@dataclass
class Cells:
    """Results so far: ``results[(model_id, input_id)][analysis]``, job ids, failures."""

    total: int
    results: dict[tuple[str, str], dict[str, dict]] = field(default_factory=dict)
    job_ids: dict[Cell, str] = field(default_factory=dict)
    errors: dict[Cell, str] = field(default_factory=dict)
    batch_ids: list[str] = field(default_factory=list)
    progress: float = 0.0

    @property
    def done(self) -> int:
        return sum(len(r) for r in self.results.values()) + len(self.errors)

    def get(self, model_id: str, input_id: str, analysis: str) -> dict | None:
        return self.results.get((model_id, input_id), {}).get(analysis)

    def put(self, cell: Cell, result: dict) -> None:
        self.results.setdefault(cell[:2], {})[cell[2]] = result


class BatchRun:
    """Submit one batch per analysis, then poll them until every child job has ended."""

    def __init__(self, api: ApiClient, comparison: Plan) -> None:
        self.api = api
        self.plan = comparison
        self.cells = Cells(total=comparison.total)
        self._batches: dict[str, dict] = {}  # batch id -> last BatchInfo (with children)

    def submit(self) -> None:
        p = self.plan
        for analysis in p.analyses:
            info = self.api.submit_batch(analysis, list(p.model_ids),
                                         list(p.inputs_of(analysis)),
                                         cell_params(analysis, p.params))
            self._batches[info["id"]] = info
            self.cells.batch_ids.append(info["id"])
        self._collect()

    def resume(self, batch_ids: list[str]) -> None:
        """Follow batches submitted earlier (by a previous run of the page)."""
        self.cells.batch_ids = list(batch_ids)
        self.update([self.api.batch(b) for b in batch_ids])

    @property
    def batches(self) -> list[dict]:
        """The last record of every batch (``id``, ``status``, ``progress``, children)."""
        return list(self._batches.values())

    def update(self, batches: list[dict]) -> None:
        """Take fresh batch records and fetch the results of newly finished children."""
        self._batches.update((info["id"], info) for info in batches)
        self._collect()

    def poll(self) -> bool:
        """Refresh the active batches and fetch new results; True while any job is active."""
        active = [b for b, info in self._batches.items() if info["status"] != "finished"]
        with ThreadPoolExecutor(HTTP_THREADS) as pool:
            self.update(list(pool.map(self.api.batch, active)))
        return any(info["status"] != "finished" for info in self._batches.values())

    def cancel(self) -> None:
        for batch_id, info in self._batches.items():
            if info["status"] != "finished":
                self.api.cancel_batch(batch_id)

    def _collect(self) -> None:
        """Fetch the results of newly finished children (a finished batch's all at once)."""
        fetch: list[tuple[Cell, str]] = []
        for batch_id, info in self._batches.items():
            children = [(self._cell(info, job), job) for job in info["children"]]
            new = [(cell, job) for cell, job in children if job["status"] == "finished"
                   and self.cells.get(*cell) is None]
            for cell, job in children:
                self.cells.job_ids[cell] = job["id"]
                if job["status"] in ("failed", "cancelled"):
                    self.cells.errors[cell] = job.get("error") or job["status"]
            if info["status"] == "finished" and new:
                for item in self.api.batch_result(batch_id)["items"]:
                    if item["status"] == "finished":
                        self.cells.put(self._cell(info, item), item["result"])
            else:
                fetch += [(cell, job["id"]) for cell, job in new]
        with ThreadPoolExecutor(HTTP_THREADS) as pool:
            results = pool.map(self.api.result, [job_id for _, job_id in fetch])
            for (cell, _), result in zip(fetch, results, strict=True):
                self.cells.put(cell, result)
        done = sum(info["progress"] * info["total"] for info in self._batches.values())
        self.cells.progress = done / max(1, self.cells.total)

    @staticmethod
    def _cell(info: dict, job: dict) -> Cell:
        return job["model_id"], job["input_id"], info["analysis"]


def run(api: ApiClient, comparison: Plan, on_update: Callable[[Cells], None] | None = None,
        poll_s: float = POLL_SECONDS) -> Cells:
    """Run the comparison to the end without a UI (tests, scripts), calling ``on_update``
    with the cells after each poll. The Compare page follows a :class:`BatchRun` through
    ``components.follow`` instead, like every other page."""
    batch = BatchRun(api, comparison)
    batch.submit()
    while True:
        if on_update is not None:
            on_update(batch.cells)
        if not batch.poll():
            break
        time.sleep(poll_s)
    if on_update is not None:
        on_update(batch.cells)
    return batch.cells


def share_input(api: ApiClient, source_model: str, input_id: str, model_ids: list[str]) -> None:
    """Make an uploaded input of ``source_model`` available to the other models.

    Uploaded inputs are stored per model under their content hash, so uploading the same
    values to another model gives the same id. Gallery inputs are shared by the dataset.
    """
    if not input_id.startswith("upload:"):
        return
    info = api.input(source_model, input_id)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(info["values"], dtype=np.float32).reshape(info["shape"]))
    for model_id in model_ids:
        if model_id != source_model and input_id not in {i["id"] for i in api.inputs(model_id)}:
            api.upload_input(model_id, f"{input_id.split(':')[1][:12]}.npy", buffer.getvalue())


# -- aggregation over a batch ----------------------------------------------------------------


@dataclass
class ModelSummary:
    """One model's aggregate over the batch's finished cells."""

    model_id: str
    inputs: int  # inputs with a prediction
    accuracy: float | None  # over inputs with a known label
    eps_grid: list[float]
    certified_accuracy: list[float]  # correct and certified (bisection), per eps in the grid
    kept_counts: list[int]  # proof features kept, per input the proof certifies
    not_certified: int  # proof-feature cells whose ball is not certified
    fgsm_density: list[float]  # linear pieces per unit length along FGSM, per input
    random_density: list[float]  # ... and along random directions (mean of the directions)
    sparsity: list[float]  # SMT mask size / feature groups, per input
    # the model's proven coverage of held-out gallery inputs (``patterns_coverage``), if run
    proven_coverage: dict | None = None
    rule_list_fidelity: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def summarize(cells: Cells, model_ids: list[str], input_ids: list[str],
              params: CompareParams, grid_points: int = 51) -> list[ModelSummary]:
    """Per model: accuracy, certified accuracy vs eps, proof-feature counts, region density
    along FGSM and random directions, saliency sparsity; the proven coverage of held-out
    gallery inputs and the rule-list fidelity from the model's ``patterns_coverage`` cell.

    Certified accuracy at eps counts inputs predicted correctly whose largest certified eps
    (``params.method``, by bisection) is at least eps; an input without a known label counts
    as correct, so for uploads the curve is the certified rate.
    """
    grid = np.linspace(0.0, params.eps_max, grid_points)
    out = []
    for model_id in model_ids:
        def column(analysis: str, model_id: str = model_id) -> list[tuple[str, dict]]:
            found = ((i, cells.get(model_id, i, analysis)) for i in input_ids)
            return [(i, r) for i, r in found if r is not None]

        predictions = dict(column("predict"))
        coverage = cells.get(model_id, None, "patterns_coverage")
        correct = [p["correct"] for p in predictions.values()]
        largest = [r["largest_eps"][params.method] if predictions[i]["correct"] is not False
                   else -1.0 for i, r in column("proof_eps") if i in predictions]
        proofs = [r for _, r in column("proof_features")]
        lines = [r["linearity"] for _, r in column("linear_regions_line") if r.get("linearity")]
        labelled = [c for c in correct if c is not None]
        out.append(ModelSummary(
            model_id=model_id, inputs=len(correct),
            accuracy=statistics.mean(labelled) if labelled else None,
            eps_grid=grid.tolist(),
            certified_accuracy=[float(np.mean(np.asarray(largest) >= e)) if largest else 0.0
                                for e in grid],
            kept_counts=[int(r["num_kept"]) for r in proofs if r["certified"]],
            not_certified=sum(not r["certified"] for r in proofs),
            fgsm_density=[r["fgsm_density"] for r in lines],
            random_density=[r["random_density"] for r in lines],
            sparsity=[r["mask_size"] / r["num_groups"] for _, r in column("saliency")
                      if r["mask_size"] is not None and r["num_groups"]],
            proven_coverage=coverage["proven_coverage"] if coverage else None,
            rule_list_fidelity=coverage["fidelity"] if coverage else None,
        ))
    return out
