from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter

from backend.analyses import REGISTRY
from backend.api.deps import ServicesDep
from backend.api.schemas import Health

router = APIRouter(tags=["health"])


def _version() -> str:
    try:
        return version("relu-atlas")
    except PackageNotFoundError:
        return "dev"


@router.get("/health", response_model=Health)
def health(services: ServicesDep) -> Health:
    return Health(version=_version(), analyses=len(REGISTRY),
                  models=len(services.storage.models()))
