"""Pattern rules: verify many rules in parallel as one batch (one child job per rule).

``POST /api/batches`` runs one set of params over many (model, input) pairs; rules differ in
their params, so this route builds the batch itself from the same parts (cached child jobs,
a parent whose state is computed from them). Progress, cancel and results then go through
``/api/batches/{id}`` like any batch.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from backend.api.deps import Owner, ServicesDep
from backend.api.routes.jobs import check_target, checked_analysis, checked_params, job_info
from backend.api.schemas import BatchInfo, JobLimits
from backend.api.validation import Id
from backend.jobs import fanout

router = APIRouter(prefix="/patterns", tags=["patterns"])
MAX_RULES = 500


class RuleSpec(BaseModel):
    """One rule's premise and conclusion, as in the ``patterns`` job's result rows."""

    layer: int
    on: list[int] = Field(default_factory=list, max_length=4096)
    off: list[int] = Field(default_factory=list, max_length=4096)
    target: int
    lowest: bool = False
    center: list[float] | None = Field(None, max_length=200_000)


class VerifyRequest(BaseModel):
    model_id: Id = Field(max_length=64)
    rules: list[RuleSpec] = Field(min_length=1, max_length=MAX_RULES)
    domain: Literal["ball", "box"] = "box"
    eps: float = 0.05
    timeout: float = 20.0
    method: Literal["auto", "milp", "split"] = "auto"
    limits: JobLimits = Field(default_factory=JobLimits)


@router.post("/verify", response_model=BatchInfo, status_code=201)
def verify_rules(req: VerifyRequest, services: ServicesDep, owner: Owner) -> BatchInfo:
    """One ``patterns_verify`` child job per rule, in order, under one batch."""
    analysis = checked_analysis("patterns_verify")
    check_target(services, analysis, req.model_id, None, owner)
    shared: dict[str, Any] = {"domain": req.domain, "eps": req.eps, "timeout": req.timeout,
                              "method": req.method}
    params = [checked_params(analysis, rule.model_dump() | shared) for rule in req.rules]
    job_ids = [services.runner.run_or_reuse(analysis.name, req.model_id, None, p,
                                            req.limits.pair(), owner)[0].id for p in params]
    batch = services.store.create_batch(analysis.name, shared, job_ids, owner)
    batch, children = services.store.batch(batch.id)
    info = BatchInfo(**fanout.summary(batch, children))
    info.children = [job_info(job) for job in children]
    return info
