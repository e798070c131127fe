"""Inputs of a model: its dataset's gallery plus uploaded images and arrays."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, HTTPException, UploadFile

from app import InvalidInputError
from backend.api.deps import ModelDep, Owner, ServicesDep
from backend.api.schemas import InputData, InputInfo
from backend.api.validation import clean_name
from backend.inputs import decode_input

router = APIRouter(prefix="/models/{model_id}/inputs", tags=["inputs"])


@router.get("", response_model=list[InputInfo])
def list_inputs(model: ModelDep, services: ServicesDep, owner: Owner) -> list[dict]:
    """The gallery of the model's dataset and the caller's uploads for the model."""
    return services.storage.inputs(model, owner)


@router.post("", response_model=InputInfo, status_code=201)
def upload_input(
    model: ModelDep, services: ServicesDep, owner: Owner,
    file: Annotated[UploadFile, File(description="PNG/JPEG image, .npy array or .csv values")],
) -> InputInfo:
    name = clean_name(file.filename, "input")
    input_range = tuple((model.card or {}).get("input_range") or (0.0, 1.0))
    try:
        x = decode_input(name, file.file.read(), tuple(model.input_shape), input_range)
    except InvalidInputError as exc:
        raise HTTPException(422, str(exc)) from exc
    record = services.storage.add_input(model.id, x, name, owner)
    return InputInfo(id=record.id, label=record.label, source="upload")


@router.get("/{input_id}", response_model=InputData)
def get_input(input_id: str, model: ModelDep, services: ServicesDep,
              owner: Owner) -> InputData:
    try:
        x, target, label = services.storage.load_input(model, input_id, owner)
    except KeyError:
        raise HTTPException(404, f"unknown input '{input_id}' for model {model.id}") from None
    return InputData(id=input_id, label=label, target=target, shape=list(x.shape),
                     values=x.tolist())
