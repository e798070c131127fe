"""Request dependencies: the services created at start-up, the caller's owner name (from
the API token), and lookups that 404 cleanly."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
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
    owners: dict[str, str] = field(default_factory=dict)  # token -> owner name


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def require_token(request: Request) -> str:
    """The caller's owner name. With tokens configured (``ATLAS_API_TOKEN``,
    ``ATLAS_API_TOKENS``) every endpoint but health needs one as a Bearer token; without, every
    caller is the default owner ``""``."""
    owners = request.app.state.services.owners
    if not owners:
        return ""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        for token, owner in owners.items():  # compare_digest: no timing hint at the tokens
            if hmac.compare_digest(given.encode(), token.encode()):
                return owner
    raise HTTPException(401, "missing or wrong API token (Authorization: Bearer ...)")


Owner = Annotated[str, Depends(require_token)]


def get_model(model_id: str, services: ServicesDep, owner: Owner) -> ModelRecord:
    """The model if this owner may see it (its uploads and the sample models), else 404."""
    record = services.storage.model(model_id, owner)
    if record is None:
        raise HTTPException(404, f"unknown model '{model_id}'")
    return record


ModelDep = Annotated[ModelRecord, Depends(get_model)]
