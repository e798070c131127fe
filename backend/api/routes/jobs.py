"""Submit, watch, cancel jobs and fetch their results; the work happens in Dask workers.

Every route sees only the caller's own jobs (another owner's job ids are 404). A request
whose result is cached is answered from one indexed lookup of its cache key, before the model
and input are looked at: the key names the model by content hash and is the caller's own, so
the cached result is that model's whatever happened to the files since.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError

from backend.analyses import REGISTRY, Analysis
from backend.api.deps import Owner, ServicesDep
from backend.api.errors import validation_message
from backend.api.schemas import JobInfo, JobRequest
from backend.db import JobRecord
from backend.jobs.store import cache_key

router = APIRouter(prefix="/jobs", tags=["jobs"])
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def job_info(job: JobRecord, cached: bool = False) -> JobInfo:
    return JobInfo.model_validate(job, from_attributes=True).model_copy(update={"cached": cached})


def _job(job_id: str, services: ServicesDep, owner: Owner) -> JobRecord:
    job = services.store.get(job_id, owner)
    if job is None:
        raise HTTPException(404, f"unknown job '{job_id}'")
    return job


def checked_analysis(name: str) -> Analysis:
    analysis = REGISTRY.get(name)
    if analysis is None:
        raise HTTPException(404, f"unknown analysis '{name}'; "
                                 f"available: {', '.join(sorted(REGISTRY))}")
    return analysis


def checked_params(analysis: Analysis, params: dict) -> dict:
    """The request's params validated by the analysis' model, as canonical JSON data."""
    try:
        return analysis.params.model_validate(params).model_dump(mode="json")
    except ValidationError as exc:
        raise HTTPException(422, f"invalid params for '{analysis.name}': "
                                 f"{validation_message(exc.errors())}") from exc


def check_target(services: ServicesDep, analysis: Analysis, model_id: str,
                 input_id: str | None, owner: str, params: dict | None = None) -> None:
    """404/422 unless ``owner`` sees the model and the input exists for it (or is not
    needed), and the analysis' own ``check`` accepts the model with ``params``."""
    model = services.storage.model(model_id, owner)
    if model is None:
        raise HTTPException(404, f"unknown model '{model_id}'")
    if analysis.check is not None and params is not None:
        analysis.check(model.summary or {}, analysis.params.model_validate(params))
    if input_id is not None:
        try:
            services.storage.load_input(model, input_id, owner)
        except KeyError:
            raise HTTPException(404, f"unknown input '{input_id}' for model {model_id}") from None
    elif analysis.needs_input:
        raise HTTPException(422, f"analysis '{analysis.name}' needs an input_id")


@router.post("", response_model=JobInfo, status_code=201)
def submit_job(req: JobRequest, services: ServicesDep, owner: Owner,
               response: Response) -> JobInfo:
    analysis = checked_analysis(req.analysis)
    params = checked_params(analysis, req.params)
    job = services.store.reusable(cache_key(analysis.name, req.model_id, req.input_id, params,
                                            owner))
    reused = job is not None
    if job is None:
        check_target(services, analysis, req.model_id, req.input_id, owner, params)
        job, reused = services.runner.run_or_reuse(analysis.name, req.model_id, req.input_id,
                                                   params, req.limits.pair(), owner)
    if reused:
        response.status_code = 200
    return job_info(job, cached=reused and job.status == "finished")


@router.get("", response_model=list[JobInfo])
def list_jobs(services: ServicesDep, owner: Owner, model_id: str | None = None,
              limit: int = Query(200, ge=1, le=1000)) -> list[JobInfo]:
    return [job_info(j) for j in services.store.list(limit, model_id, owner)]


@router.get("/{job_id}", response_model=JobInfo)
def get_job(job_id: str, services: ServicesDep, owner: Owner) -> JobInfo:
    return job_info(_job(job_id, services, owner))


@router.post("/{job_id}/cancel", response_model=JobInfo)
def cancel_job(job_id: str, services: ServicesDep, owner: Owner) -> JobInfo:
    _job(job_id, services, owner)
    job = services.store.request_cancel(job_id)
    services.runner.cancel(job_id)
    return job_info(job)


@router.get("/{job_id}/result", responses={200: {"content": {"application/json": {}}}})
def get_result(job_id: str, services: ServicesDep, owner: Owner) -> Response:
    job = _job(job_id, services, owner)
    if job.status != "finished":
        reason = f": {job.error}" if job.error else ""
        raise HTTPException(409, f"job {job_id} is {job.status}{reason}")
    return Response(content=job.result, media_type="application/json")


@router.get("/{job_id}/artifacts", response_model=list[str])
def list_artifacts(job_id: str, services: ServicesDep, owner: Owner) -> list[str]:
    _job(job_id, services, owner)
    folder = services.settings.data_dir / "artifacts" / job_id
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


@router.get("/{job_id}/artifacts/{name}")
def get_artifact(job_id: str, name: str, services: ServicesDep,
                 owner: Owner) -> FileResponse:
    _job(job_id, services, owner)
    path = services.settings.data_dir / "artifacts" / job_id / name
    if not SAFE_NAME.match(name) or not path.is_file():
        raise HTTPException(404, f"no artifact '{name}' for job {job_id}")
    return FileResponse(path)
