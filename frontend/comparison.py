"""A comparison of models over inputs, run as ordinary single-analysis jobs over the API.

Every cell (one model, one input, one analysis) is the job the analysis' own page would run
with the same parameters, so a cell always equals the single-analysis result (and is served
from the job cache when that result exists). Batches fan out as many jobs at once; the
service's Dask workers run them in parallel and one poll of the job listing per round gives
the overall progress. Nothing here imports Streamlit: the page, the tests and the benchmark
all use it.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from frontend.client import ACTIVE, ApiClient

POLL_SECONDS = 0.3
HTTP_THREADS = 8
LISTING_LIMIT = 1000


@dataclass(frozen=True)
class CompareParams:
    """The knobs of a comparison; each cell's analysis takes the ones it needs."""

    eps: float = 0.05  # proof features: L-inf radius proven
    method: str = "crown"  # bound method of the proofs and of the certified-accuracy curve
    eps_max: float = 0.5  # largest certified eps: bisection range ...
    tol: float = 1e-3  # ... and tolerance

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


# analysis name -> the parameters its job gets: the same as its own page sends
CELLS: dict[str, Callable[[CompareParams], dict]] = {
    "predict": lambda p: {},
    "proof_features": lambda p: {"eps": p.eps, "method": p.method},
    "proof_eps": lambda p: {"eps_max": p.eps_max, "tol": p.tol},
}


@dataclass(frozen=True)
class Task:
    model_id: str
    input_id: str
    analysis: str
    params: tuple[tuple[str, object], ...]  # sorted items, so a Task is hashable

    @property
    def body(self) -> dict:
        return {"analysis": self.analysis, "model_id": self.model_id,
                "input_id": self.input_id, "params": dict(self.params)}


def plan(model_ids: Iterable[str], input_ids: Iterable[str], params: CompareParams,
         available: Iterable[str] | None = None) -> list[Task]:
    """One task per model, input and cell analysis the service offers."""
    offered = set(CELLS if available is None else available)
    input_ids = list(input_ids)
    return [Task(m, i, name, tuple(sorted(make(params).items())))
            for m in model_ids for i in input_ids
            for name, make in CELLS.items() if name in offered]


@dataclass
class Cells:
    """Results so far: ``results[(model_id, input_id)][analysis]``, job ids, failures."""

    total: int
    results: dict[tuple[str, str], dict[str, dict]] = field(default_factory=dict)
    job_ids: dict[Task, str] = field(default_factory=dict)
    errors: dict[Task, str] = field(default_factory=dict)
    progress: float = 0.0

    @property
    def done(self) -> int:
        return sum(len(r) for r in self.results.values()) + len(self.errors)

    def get(self, model_id: str, input_id: str, analysis: str) -> dict | None:
        return self.results.get((model_id, input_id), {}).get(analysis)


class BatchRun:
    """Submit every task as a job, then poll until each is finished, failed or cancelled."""

    def __init__(self, api: ApiClient, tasks: list[Task]) -> None:
        self.api = api
        self.tasks = tasks
        self.cells = Cells(total=len(tasks))
        self._jobs: dict[str, dict] = {}  # job id -> last JobInfo
        self._task_of: dict[str, Task] = {}

    def submit(self) -> None:
        with ThreadPoolExecutor(HTTP_THREADS) as pool:
            jobs = list(pool.map(lambda t: self.api.submit(**t.body), self.tasks))
        for task, job in zip(self.tasks, jobs, strict=True):
            self.cells.job_ids[task] = job["id"]
            self._jobs[job["id"]] = job
            self._task_of[job["id"]] = task
        self._collect()

    def poll(self) -> bool:
        """Refresh the jobs' states and fetch new results; True while any job is active."""
        active = {j for j, job in self._jobs.items() if job["status"] in ACTIVE}
        if active:
            listed = {j["id"]: j for j in self.api.jobs(limit=LISTING_LIMIT) if j["id"] in active}
            missing = list(active - set(listed))
            with ThreadPoolExecutor(HTTP_THREADS) as pool:
                listed.update(zip(missing, pool.map(self.api.job, missing), strict=True))
            self._jobs.update(listed)
        self._collect()
        return any(job["status"] in ACTIVE for job in self._jobs.values())

    def cancel(self) -> None:
        for job_id, job in self._jobs.items():
            if job["status"] in ACTIVE:
                self.api.cancel(job_id)

    def _collect(self) -> None:
        """Fetch the results of newly finished jobs; record failures; update progress."""
        new = [j for j, job in self._jobs.items() if job["status"] == "finished"
               and self.cells.get(*self._key(j)) is None]
        with ThreadPoolExecutor(HTTP_THREADS) as pool:
            for job_id, result in zip(new, pool.map(self.api.result, new), strict=True):
                task = self._task_of[job_id]
                self.cells.results.setdefault((task.model_id, task.input_id), {})[
                    task.analysis] = result
        for job_id, job in self._jobs.items():
            if job["status"] in ("failed", "cancelled"):
                self.cells.errors[self._task_of[job_id]] = job.get("error") or job["status"]
        fractions = [1.0 if job["status"] not in ACTIVE else float(job.get("progress") or 0)
                     for job in self._jobs.values()]
        self.cells.progress = sum(fractions) / max(1, len(self.tasks))

    def _key(self, job_id: str) -> tuple[str, str, str]:
        task = self._task_of[job_id]
        return task.model_id, task.input_id, task.analysis


def run(api: ApiClient, tasks: list[Task], on_update: Callable[[Cells], None] | None = None,
        poll_s: float = POLL_SECONDS) -> Cells:
    """Run ``tasks`` to the end, calling ``on_update`` with the partial cells after each poll."""
    batch = BatchRun(api, tasks)
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

    def to_json(self) -> dict:
        return asdict(self)


def summarize(cells: Cells, model_ids: list[str], input_ids: list[str],
              params: CompareParams, grid_points: int = 51) -> list[ModelSummary]:
    """Per model: accuracy, certified accuracy vs eps, proof-feature counts.

    Certified accuracy at eps counts inputs predicted correctly whose largest certified eps
    (``params.method``, by bisection) is at least eps; an input without a known label counts
    as correct, so for uploads the curve is the certified rate.
    """
    grid = np.linspace(0.0, params.eps_max, grid_points)
    out = []
    for model_id in model_ids:
        correct, largest, kept, refused = [], [], [], 0
        for input_id in input_ids:
            predicted = cells.get(model_id, input_id, "predict")
            if predicted is not None:
                correct.append(predicted["correct"])
            bisection = cells.get(model_id, input_id, "proof_eps")
            if predicted is not None and bisection is not None:
                ok = predicted["correct"] is not False
                largest.append(bisection["largest_eps"][params.method] if ok else -1.0)
            proof = cells.get(model_id, input_id, "proof_features")
            if proof is not None:
                if proof["certified"]:
                    kept.append(int(proof["num_kept"]))
                else:
                    refused += 1
        labelled = [c for c in correct if c is not None]
        curve = [float(np.mean(np.asarray(largest) >= e)) if largest else 0.0 for e in grid]
        out.append(ModelSummary(
            model_id=model_id, inputs=len(correct),
            accuracy=statistics.mean(labelled) if labelled else None,
            eps_grid=grid.tolist(), certified_accuracy=curve, kept_counts=kept,
            not_certified=refused,
        ))
    return out
