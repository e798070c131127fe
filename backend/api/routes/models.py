"""Model upload, listing and deletion; uploads are validated by the engine's loaders."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Form, HTTPException, UploadFile

from app import UnsupportedModelError
from app.loaders.torch_loader import TORCHSCRIPT_REFUSED
from backend.api.deps import ModelDep, Owner, ServicesDep
from backend.api.schemas import ModelInfo
from backend.api.validation import MAX_NAME, clean_json_text, clean_name
from backend.sandbox import TooLarge
from backend.storage import MODEL_SUFFIXES

TORCHSCRIPT_SUFFIXES = {".pt", ".pth", ".ts"}

router = APIRouter(prefix="/models", tags=["models"])


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise HTTPException(422, f"input_shape must look like '1,8,8', got '{text}'") from None
    if not shape or any(s <= 0 or s > 100_000 for s in shape):
        raise HTTPException(422, f"input_shape {shape} is not a valid shape")
    return shape


def _parse_card(text: str | None) -> dict | None:
    """An optional model card (JSON object): dataset, input_range, classes, ..."""
    if not text:
        return None
    clean_json_text(text, "card")
    try:
        card = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HTTPException(422, f"card is not valid JSON: {exc}") from None
    if not isinstance(card, dict):
        raise HTTPException(422, "card must be a JSON object")
    rng = card.get("input_range")
    if rng is not None and not (isinstance(rng, list) and len(rng) == 2
                                and all(isinstance(v, int | float) for v in rng)
                                and rng[0] < rng[1]):
        raise HTTPException(422, f"card input_range must be [low, high], got {rng}")
    if not isinstance(card.get("dataset", ""), str):
        raise HTTPException(422, "card dataset must be a string")
    classes = card.get("classes")
    if classes is not None and not (isinstance(classes, list) and len(classes) <= 10_000
                                    and all(isinstance(c, str | int) for c in classes)):
        raise HTTPException(422, "card classes must be a list of names")
    name = card.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME):
        raise HTTPException(422, f"card name must be a string of at most {MAX_NAME} characters")
    return card


@router.post("", response_model=ModelInfo, status_code=201)
def upload_model(
    services: ServicesDep, owner: Owner,
    file: Annotated[UploadFile, File(description=".onnx or .pt2 (torch.export)")],
    input_shape: Annotated[str | None, Form(description="e.g. '1,8,8' (a .pt2 without "
                                                        "sample inputs)")] = None,
    card: Annotated[str | None, Form(description="model card JSON (dataset, input_range, "
                                                 "classes, ...)")] = None,
) -> ModelInfo:
    name = clean_name(file.filename, "model")
    suffix = Path(name).suffix.lower()
    if suffix in TORCHSCRIPT_SUFFIXES:
        raise HTTPException(422, TORCHSCRIPT_REFUSED)
    if suffix not in MODEL_SUFFIXES:
        raise HTTPException(
            415, f"unknown model format '{suffix or name}': upload .onnx or .pt2 "
            "(torch.export)")
    parsed_card, shape = _parse_card(card), _parse_shape(input_shape)
    tmp = services.settings.data_dir / "tmp" / f"{uuid.uuid4().hex}{suffix}"
    try:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(file.file, out, 1 << 20)
        record = services.storage.add_model(tmp, name, card=parsed_card, input_shape=shape,
                                            owner=owner)
    except TooLarge as exc:
        raise HTTPException(413, f"cannot load '{name}': {exc}") from exc
    except UnsupportedModelError as exc:
        raise HTTPException(422, f"cannot load '{name}': {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return ModelInfo.model_validate(record, from_attributes=True)


@router.get("", response_model=list[ModelInfo])
def list_models(services: ServicesDep, owner: Owner) -> list[ModelInfo]:
    """The sample models and the caller's uploads."""
    return [ModelInfo.model_validate(r, from_attributes=True)
            for r in services.storage.models(owner)]


@router.get("/{model_id}", response_model=ModelInfo)
def get_model(model: ModelDep) -> ModelInfo:
    return ModelInfo.model_validate(model, from_attributes=True)


@router.put("/{model_id}/card", response_model=ModelInfo)
def set_card(model: ModelDep, services: ServicesDep, owner: Owner,
             card: Annotated[dict[str, Any], Body(description="dataset, input_range, classes, "
                                                              "name, notes, ...")]) -> ModelInfo:
    """Replace the caller's card for an uploaded model (others' cards stay theirs); the
    analyses use it from the next job on (this owner's cached results are dropped)."""
    if model.source == "sample":
        raise HTTPException(403, "sample models' cards are shared; they cannot be changed")
    checked = _parse_card(json.dumps(card)) or {}
    record = services.storage.set_card(model.id, owner, checked)
    services.store.forget_cached(model.id, owner)
    return ModelInfo.model_validate(record, from_attributes=True)


@router.delete("/{model_id}", status_code=204)
def delete_model(model: ModelDep, services: ServicesDep, owner: Owner) -> None:
    """Withdraw the caller's upload (other owners of the same file keep theirs)."""
    if model.source == "sample":
        raise HTTPException(403, "sample models are shared by every user; they cannot be "
                                 "deleted")
    services.storage.delete_model(model.id, owner)
