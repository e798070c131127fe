from __future__ import annotations

from fastapi import APIRouter

from backend.analyses import REGISTRY
from backend.api.schemas import AnalysisInfo

router = APIRouter(prefix="/analyses", tags=["analyses"])


@router.get("", response_model=list[AnalysisInfo])
def list_analyses() -> list[dict]:
    return [a.info() for a in sorted(REGISTRY.values(), key=lambda a: a.name)]
