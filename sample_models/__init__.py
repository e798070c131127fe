"""The sample models the project trains itself (see :mod:`sample_models.train`).

Light on purpose (no torch import): the backend lists the models and gallery inputs at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SAMPLE_DIR = Path(__file__).resolve().parent
GALLERY_DIR = SAMPLE_DIR / "gallery"


def list_sample_models(folder: Path = SAMPLE_DIR) -> list[tuple[Path, dict]]:
    """``(onnx path, card)`` for every model in ``folder`` that has a card, sorted by name."""
    return [
        (path, json.loads(path.with_suffix(".json").read_text()))
        for path in sorted(folder.glob("*.onnx"))
        if path.with_suffix(".json").is_file()
    ]


def load_gallery(dataset: str, folder: Path = GALLERY_DIR) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a dataset's gallery: ``x`` float32 ``[N, *input_shape]``, ``y`` int64."""
    path = folder / f"{dataset}.npz"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.npz"))
        raise FileNotFoundError(f"no gallery for dataset '{dataset}' (have: {known})")
    with np.load(path, allow_pickle=False) as data:
        return data["x"].astype(np.float32), data["y"].astype(np.int64)
