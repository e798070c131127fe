"""Datasets of a model: many inputs uploaded as one file, for analyses that mine a set
(pattern rules). Validated and stored by :mod:`backend.datasets`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, HTTPException, UploadFile

from app import InvalidInputError
from backend.api.deps import ModelDep, Owner, ServicesDep
from backend.api.schemas import DatasetInfo
from backend.api.validation import clean_name
from backend.datasets import DatasetStore, DatasetTooLarge, decode_dataset

router = APIRouter(prefix="/models/{model_id}/datasets", tags=["datasets"])


@router.post("", response_model=DatasetInfo, status_code=201)
def upload_dataset(
    model: ModelDep, services: ServicesDep, owner: Owner,
    file: Annotated[UploadFile, File(description=".npz (x, optional y), .npy of inputs, or "
                                                 ".csv (one input per row, optional label "
                                                 "column)")],
) -> dict:
    name = clean_name(file.filename, "dataset")
    input_range = tuple((model.card or {}).get("input_range") or (0.0, 1.0))
    try:
        x, y = decode_dataset(name, file.file.read(), tuple(model.input_shape), input_range)
    except DatasetTooLarge as exc:
        raise HTTPException(413, str(exc)) from exc
    except InvalidInputError as exc:
        raise HTTPException(422, str(exc)) from exc
    return DatasetStore(services.settings.data_dir).add(model.id, owner, name, x, y)


@router.get("/{dataset_id}", response_model=DatasetInfo)
def get_dataset(dataset_id: str, model: ModelDep, services: ServicesDep, owner: Owner) -> dict:
    try:
        return DatasetStore(services.settings.data_dir).meta(model.id, dataset_id, owner)
    except KeyError:
        raise HTTPException(404, f"unknown dataset '{dataset_id}' for model {model.id}") from None
