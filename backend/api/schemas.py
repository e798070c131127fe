"""Pydantic shapes of the HTTP API (see docs/ARCHITECTURE.md); they make the OpenAPI schema."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from backend.api.validation import Id

JobStatus = Literal["queued", "running", "finished", "failed", "cancelled"]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    analyses: int
    models: int


class ModelInfo(BaseModel):
    id: str = Field(description="sha256 of the model file")
    name: str
    format: str
    input_shape: list[int]
    num_outputs: int
    card: dict[str, Any]
    summary: dict[str, Any]
    source: str = Field(description="'sample' or 'upload'")
    created_at: datetime


class InputInfo(BaseModel):
    id: str = Field(description="gallery:<dataset>:<index> or upload:<sha256>")
    label: str
    source: Literal["gallery", "upload"]
    target: int | None = Field(None, description="true class, when known")


class DatasetInfo(BaseModel):
    id: str = Field(description="dataset:<sha256>")
    name: str
    n: int = Field(description="number of inputs")
    shape: list[int] = Field(description="[n, *input_shape]")
    has_labels: bool


class InputData(BaseModel):
    id: str
    label: str
    target: int | None = None
    shape: list[int]
    values: Any = Field(description="nested lists in the model's input shape")


class AnalysisInfo(BaseModel):
    name: str
    title: str
    description: str
    needs_input: bool
    params_schema: dict[str, Any]


class JobLimits(BaseModel):
    """Per-job limits; the server's settings are the defaults and the maxima."""

    time_s: float | None = Field(None, gt=0, le=86_400, description="wall-clock seconds")
    memory_mb: float | None = Field(None, ge=16, le=1_048_576, description="address space MB")

    def pair(self) -> tuple[float | None, float | None]:
        return self.time_s, self.memory_mb


class JobRequest(BaseModel):
    analysis: Id
    model_id: Id = Field(max_length=64)
    input_id: Id | None = Field(None, max_length=80)
    params: dict[str, Any] = Field(default_factory=dict)
    limits: JobLimits = Field(default_factory=JobLimits)


MAX_BATCH = 10_000


class BatchRequest(BaseModel):
    """One analysis over every (model, input) pair of ``model_ids`` x ``input_ids``."""

    analysis: Id
    model_ids: list[Annotated[Id, Field(max_length=64)]] = Field(min_length=1, max_length=100)
    input_ids: list[Annotated[Id, Field(max_length=80)] | None] = Field(
        default_factory=lambda: [None], min_length=1, max_length=MAX_BATCH)
    params: dict[str, Any] = Field(default_factory=dict)
    limits: JobLimits = Field(default_factory=JobLimits)


class JobInfo(BaseModel):
    id: str
    analysis: str
    model_id: str
    input_id: str | None
    params: dict[str, Any]
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    message: str
    error: str | None
    cached: bool = False
    created_at: datetime
    updated_at: datetime


class BatchInfo(BaseModel):
    id: str
    analysis: str
    params: dict[str, Any]
    total: int
    status: Literal["queued", "running", "finished"]
    progress: float = Field(ge=0, le=1)
    counts: dict[str, int] = Field(description="children per status")
    message: str
    created_at: datetime
    children: list[JobInfo] | None = Field(None, description="child jobs, in request order")
