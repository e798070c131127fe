"""Uploaded datasets: many inputs of one model in one file, for analyses that mine a set.

A dataset is a .npz (array ``x`` and optional labels ``y``), a .npy of inputs, or a CSV (one
input per row, optionally a label column). It is validated like a single input
(backend/inputs.py): no pickles, the model's input shape (uint8 image arrays are resized and
scaled as uploaded images are), finite values, bounded size. Stored content-addressed as
``DATA_DIR/datasets/<sha256>.npz`` with a JSON sidecar of metadata (model, owner, n, shape), so
no database table is needed. The hash covers the model and the owner, so ids are per owner.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import uuid
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from app import InvalidInputError
from backend.inputs import image_to_input, read_npy

MAX_INPUTS = 20_000
MAX_VALUES = 25_000_000  # 100 MB of float32 once decoded
MAX_MEMBER_BYTES = 256 * 2**20  # an .npz member's declared uncompressed size
LABEL_COLUMNS = {"label", "labels", "y", "target", "class"}
DATASET_ID = re.compile(r"^dataset:([0-9a-f]{64})$")


class DatasetTooLarge(InvalidInputError):
    """More inputs or values than a dataset may hold."""


def decode_dataset(filename: str, data: bytes, input_shape: tuple[int, ...],
                   input_range: tuple[float, float] = (0.0, 1.0),
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """``(x [N, *input_shape] float32, y [N] int64 or None)`` from an uploaded file."""
    suffix = Path(filename).suffix.lower()
    if suffix == ".npz":
        x, y = _npz(data)
    elif suffix == ".npy":
        x, y = read_npy(data), None
    elif suffix == ".csv":
        x, y = _csv(data, math.prod(input_shape))
    else:
        raise InvalidInputError(
            f"unknown dataset format '{suffix or filename}': upload .npz (x, optional y), "
            ".npy or .csv")
    x = _fit(x, tuple(input_shape), input_range)
    if y is not None:
        y = _labels(y, len(x))
    return x, y


def _npz(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """Members read one by one through zipfile: sizes are checked before anything is
    inflated, and each member goes through the .npy checks (pickles refused)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: info for info in archive.infolist()}
            if "x.npy" not in members:
                raise InvalidInputError(
                    f"the .npz needs an array named 'x' (inputs); it has "
                    f"{sorted(n.removesuffix('.npy') for n in members) or 'none'}")
            arrays = {}
            for name in ("x", "y"):
                info = members.get(f"{name}.npy")
                if info is None:
                    continue
                if info.file_size > MAX_MEMBER_BYTES:
                    raise DatasetTooLarge(
                        f"array '{name}' unpacks to {info.file_size / 2**20:.0f} MB; at most "
                        f"{MAX_MEMBER_BYTES // 2**20} MB")
                arrays[name] = read_npy(archive.read(info))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise InvalidInputError(f"not a readable .npz file: {exc}") from exc
    return arrays["x"], arrays.get("y")


def _csv(data: bytes, width: int) -> tuple[np.ndarray, np.ndarray | None]:
    """One input per row. The label column is the one a header row names label/y/target/class
    or, without a header, a last column beyond the model's ``width`` input values."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"the CSV file is not UTF-8 text: {exc}") from exc
    first = text.lstrip().partition("\n")[0]
    cells = [c.strip().strip('"').lower() for c in first.split(",")]
    header = not all(_is_number(c) for c in cells)
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64, ndmin=2,
                           skiprows=1 if header else 0)
    except ValueError as exc:
        raise InvalidInputError(f"not a numeric CSV file: {exc}") from exc
    columns = table.shape[1]
    if header:
        label = next((i for i, c in enumerate(cells) if c in LABEL_COLUMNS), None)
    else:
        label = columns - 1 if columns == width + 1 else None
    if label is None:
        return table, None
    return np.delete(table, label, axis=1), table[:, label]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _fit(x: np.ndarray, shape: tuple[int, ...],
         input_range: tuple[float, float]) -> np.ndarray:
    if x.shape == shape:
        x = x[None]
    if not 1 <= len(x) <= MAX_INPUTS:
        raise DatasetTooLarge(f"a dataset holds 1 to {MAX_INPUTS} inputs, this one {len(x)}")
    if len(x) * math.prod(shape) > MAX_VALUES:
        raise DatasetTooLarge(f"{len(x)} inputs of shape {shape} exceed {MAX_VALUES} values")
    if tuple(x.shape[1:]) != shape:
        if x.ndim == 2 and x.shape[1] == math.prod(shape):
            x = x.reshape(len(x), *shape)
        elif x.dtype == np.uint8 and _image_model(shape) and x.ndim in (3, 4):
            x = _images(x, shape, input_range)
        else:
            raise InvalidInputError(
                f"inputs of shape {tuple(x.shape[1:])} do not match the model's input shape "
                f"{shape} (rows of {math.prod(shape)} values, or uint8 images, also fit)")
    elif x.dtype == np.uint8 and _image_model(shape):
        x = _images(x, shape, input_range)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(1).argmax())
        raise InvalidInputError(f"the dataset contains NaN or infinite values (input {bad})")
    return x


def _image_model(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def _images(x: np.ndarray, shape: tuple[int, ...],
            input_range: tuple[float, float]) -> np.ndarray:
    """uint8 images ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` as model inputs."""
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3, 4):
        x = x.transpose(0, 2, 3, 1)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 4 and x.shape[-1] not in (3, 4):
        raise InvalidInputError(f"uint8 images of shape {tuple(x.shape[1:])} are neither "
                                "HxW, HxWxC nor CxHxW")
    return np.stack([image_to_input(Image.fromarray(img), shape, input_range) for img in x])


def _labels(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise InvalidInputError(f"{len(y)} labels for {n} inputs")
    if not np.issubdtype(y.dtype, np.number) or not np.isfinite(y).all() \
            or (y < 0).any() or (y != np.round(y)).any():
        raise InvalidInputError("labels must be whole numbers >= 0 (class indices)")
    return y.astype(np.int64)


class DatasetStore:
    """Datasets as files under ``data_dir/datasets``; the API and the workers share it."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "datasets"

    def add(self, model_id: str, owner: str, name: str, x: np.ndarray,
            y: np.ndarray | None) -> dict:
        """Store the decoded dataset (idempotent: the same upload gets the same id)."""
        h = hashlib.sha256(f"{model_id}\0{owner}\0{x.shape}\0".encode())
        h.update(x.tobytes())
        if y is not None:
            h.update(b"\0y" + y.tobytes())
        digest = h.hexdigest()
        meta = {"id": f"dataset:{digest}", "name": name[:200], "n": int(len(x)),
                "shape": list(x.shape), "has_labels": y is not None,
                "model_id": model_id, "owner": owner}
        self.root.mkdir(parents=True, exist_ok=True)
        arrays = {"x": x} if y is None else {"x": x, "y": y}
        self._write(digest, ".npz", lambda f: np.savez(f, **arrays))
        self._write(digest, ".json", lambda f: f.write(json.dumps(meta).encode()))
        return meta

    def _write(self, digest: str, suffix: str, write) -> None:  # noqa: ANN001 - file -> None
        tmp = self.root / f".{digest}.{uuid.uuid4().hex}{suffix}"
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, self.root / f"{digest}{suffix}")

    def meta(self, model_id: str, dataset_id: str, owner: str | None = None) -> dict:
        """The dataset's metadata; KeyError unless it is ``owner``'s (any owner when None)
        dataset for this model."""
        match = DATASET_ID.match(dataset_id)
        if match is None:
            raise KeyError(dataset_id)
        try:
            meta = json.loads((self.root / f"{match[1]}.json").read_text())
        except FileNotFoundError:
            raise KeyError(dataset_id) from None
        if meta["model_id"] != model_id or owner is not None and meta["owner"] != owner:
            raise KeyError(dataset_id)
        return meta

    def load(self, model_id: str, dataset_id: str, owner: str | None = None,
             ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(x, y or None)`` of the dataset; KeyError as :meth:`meta`."""
        self.meta(model_id, dataset_id, owner)
        digest = DATASET_ID.match(dataset_id)[1]
        with np.load(self.root / f"{digest}.npz", allow_pickle=False) as f:
            return f["x"], (f["y"] if "y" in f.files else None)
