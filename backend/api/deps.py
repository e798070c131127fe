"""Request dependencies: the services created at start-up, and lookups that 404 cleanly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from backend.config import Settings
from backend.db import ModelRecord
from backend.jobs.runner import JobRunner
from backend.jobs.store import JobStore
from backend.storage import Storage


@dataclass
class Services:
    settings: Settings
    storage: Storage
    store: JobStore
    runner: JobRunner


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_model(model_id: str, services: ServicesDep) -> ModelRecord:
    record = services.storage.model(model_id)
    if record is None:
        raise HTTPException(404, f"unknown model '{model_id}'")
    return record


ModelDep = Annotated[ModelRecord, Depends(get_model)]


def require_token(request: Request) -> None:
    """When ``ATLAS_API_TOKEN`` is set, every endpoint but health needs it as a Bearer token."""
    token = request.app.state.services.settings.api_token
    if token and request.headers.get("authorization", "") != f"Bearer {token}":
        raise HTTPException(401, "missing or wrong API token (Authorization: Bearer ...)")
