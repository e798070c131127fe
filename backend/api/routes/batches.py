"""Batches: one analysis fanned out over models x inputs, one parent with aggregated state.

Like jobs, batches are the caller's own: another owner's batch ids are 404."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse

from backend.api.deps import Owner, ServicesDep
from backend.api.routes.jobs import check_target, checked_analysis, checked_params, job_info
from backend.api.schemas import MAX_BATCH, BatchInfo, BatchRequest
from backend.db import BatchRecord, JobRecord
from backend.jobs import fanout

router = APIRouter(prefix="/batches", tags=["batches"])


def _batch(batch_id: str, services: ServicesDep,
           owner: Owner) -> tuple[BatchRecord, list[JobRecord]]:
    found = services.store.batch(batch_id, owner)
    if found is None:
        raise HTTPException(404, f"unknown batch '{batch_id}'")
    return found


def _info_of(batch: BatchRecord, children: list[JobRecord], with_children: bool) -> BatchInfo:
    info = BatchInfo(**fanout.summary(batch, children))
    if with_children:
        info.children = [job_info(job) for job in children]
    return info


@router.post("", response_model=BatchInfo, status_code=201)
def submit_batch(req: BatchRequest, services: ServicesDep, owner: Owner) -> BatchInfo:
    """Every (model, input) pair of ``model_ids`` x ``input_ids`` becomes one child job."""
    analysis = checked_analysis(req.analysis)
    total = len(req.model_ids) * len(req.input_ids)
    if total > MAX_BATCH:
        raise HTTPException(422, f"a batch has at most {MAX_BATCH} jobs, this one {total}")
    params = checked_params(analysis, req.params)
    pairs = [(m, i) for m in dict.fromkeys(req.model_ids) for i in dict.fromkeys(req.input_ids)]
    for model_id, input_id in pairs:
        check_target(services, analysis, model_id, input_id, owner, params)
    batch = fanout.fanout(services.runner, analysis.name, params, pairs, req.limits.pair(),
                          owner)
    return _info_of(*services.store.batch(batch.id), with_children=True)


@router.get("", response_model=list[BatchInfo])
def list_batches(services: ServicesDep, owner: Owner,
                 limit: int = Query(50, ge=1, le=1000)) -> list[BatchInfo]:
    return [_info_of(*services.store.batch(b.id), with_children=False)
            for b in services.store.batches(limit, owner)]


@router.get("/{batch_id}", response_model=BatchInfo)
def get_batch(batch_id: str, services: ServicesDep, owner: Owner) -> BatchInfo:
    return _info_of(*_batch(batch_id, services, owner), with_children=True)


@router.post("/{batch_id}/cancel", response_model=BatchInfo)
def cancel_batch(batch_id: str, services: ServicesDep, owner: Owner) -> BatchInfo:
    fanout.cancel(services.runner, _batch(batch_id, services, owner)[1])
    return _info_of(*_batch(batch_id, services, owner), with_children=True)


@router.get("/{batch_id}/result", responses={200: {"content": {"application/json": {}}}})
def get_batch_result(batch_id: str, services: ServicesDep, owner: Owner) -> JSONResponse:
    """Every child's result in request order; 409 while any child is still active."""
    batch, children = _batch(batch_id, services, owner)
    info = fanout.summary(batch, children)
    if info["status"] != "finished":
        raise HTTPException(409, f"batch {batch_id} is {info['status']}: {info['message']}")
    return JSONResponse(fanout.aggregate(batch, children))
