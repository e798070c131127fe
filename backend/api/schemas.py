"""Pydantic shapes of the HTTP API (see docs/ARCHITECTURE.md); they make the OpenAPI schema."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

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


class JobRequest(BaseModel):
    analysis: str = Field(max_length=100)
    model_id: str = Field(max_length=64)
    input_id: str | None = Field(None, max_length=80)
    params: dict[str, Any] = Field(default_factory=dict)


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
