"""Turn an uploaded input file (PNG/JPEG image, .npy, .csv) into an array the model takes.

Images are converted to the model's channel count, resized to its HxW and scaled from
[0, 255] to the card's ``input_range``; arrays must already have the model's input shape (a
CSV row may start with its label, as ERAN's test files do).

Decoding is bounded before it allocates: an image's pixel count is read from its header, an
array's shape from the .npy header and a CSV's value count from its separators, so what is
decoded is at most a few times the model's input size (or ``MAX_IMAGE_PIXELS``).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from app import InvalidInputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MAX_IMAGE_PIXELS = 4096 * 4096


def decode_input(filename: str, data: bytes, input_shape: tuple[int, ...],
                 input_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """The upload as a float32 array of ``input_shape``; InvalidInputError says what is wrong."""
    suffix = Path(filename).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        x = _image(data, input_shape, input_range)
    elif suffix == ".npy":
        _check_npy_size(data, tuple(input_shape))
        x = read_npy(data)
    elif suffix == ".csv":
        _check_csv_size(data, math.prod(input_shape))
        x = _csv(data)
    else:
        raise InvalidInputError(
            f"unknown input format '{suffix or filename}': upload .png, .jpg, .npy or .csv")
    return _fit(x, input_shape, allow_flat=suffix == ".csv")


def _image(data: bytes, input_shape: tuple[int, ...],
           input_range: tuple[float, float]) -> np.ndarray:
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise InvalidInputError(
            f"an image needs a model with input shape (1 or 3, H, W); this one takes "
            f"{tuple(input_shape)}: upload .npy or .csv instead")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InvalidInputError(f"the image is {img.width}x{img.height}; at most "
                                        f"{MAX_IMAGE_PIXELS:,} pixels are decoded")
            return image_to_input(img, input_shape, input_range)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InvalidInputError(f"not a readable image: {exc}") from exc


def image_to_input(img: Image.Image, input_shape: tuple[int, ...],
                   input_range: tuple[float, float]) -> np.ndarray:
    """``img`` in the model's channels and HxW, scaled from [0, 255] to ``input_range``."""
    channels, height, width = input_shape
    img = img.convert("L" if channels == 1 else "RGB")
    img = img.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    lo, hi = input_range
    return lo + (hi - lo) * pixels


def read_npy(data: bytes) -> np.ndarray:
    """A numeric array from .npy bytes; pickles and lying headers are refused."""
    _check_npy_header(data)
    try:
        x = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInputError(f"not a readable .npy array (pickles are refused): {exc}") from exc
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.number):
        raise InvalidInputError(f"the .npy array must be numeric, got {getattr(x, 'dtype', x)}")
    return x


def _check_npy_size(data: bytes, input_shape: tuple[int, ...]) -> None:
    """Refuse an array whose header declares another element count than one input's."""
    shape, dtype, _ = _npy_header(data)
    if dtype.hasobject:
        raise InvalidInputError("the .npy array holds Python objects (pickles are refused)")
    if math.prod(shape) != math.prod(input_shape):
        raise InvalidInputError(f"input shape {tuple(shape)} does not match the model's input "
                                f"shape {input_shape}")


def _check_csv_size(data: bytes, expected: int) -> None:
    """Count values by their separators before parsing (a label column adds one)."""
    values = len(data.replace(b"\n", b",").strip(b",\r \t").split(b","))
    if values > expected + 1:
        raise InvalidInputError(f"the CSV holds {values} values; the model takes {expected}")


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, where the data starts)`` from a .npy header."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidInputError(f"not a readable .npy array: {exc}") from exc
    return shape, dtype, f.tell()


def _check_npy_header(data: bytes) -> None:
    """Refuse a header that declares more data than the file holds (np.load would try to
    allocate the declared size first: a 20-byte header can ask for terabytes)."""
    shape, dtype, start = _npy_header(data)
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if not dtype.hasobject and declared > len(data) - start:
        raise InvalidInputError(f"the .npy header declares shape {shape} ({declared} bytes) "
                                f"but the file holds only {len(data) - start} bytes")


def _csv(data: bytes) -> np.ndarray:
    try:
        return np.loadtxt(io.StringIO(data.decode("utf-8")), delimiter=",", dtype=np.float64,
                          ndmin=1)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"not a numeric CSV file: {exc}") from exc


def _fit(x: np.ndarray, input_shape: tuple[int, ...], allow_flat: bool) -> np.ndarray:
    shape = tuple(input_shape)
    if x.shape == (1, *shape):
        x = x[0]
    if allow_flat and x.ndim == 1 and x.size == math.prod(shape) + 1 > 2 \
            and float(x[0]).is_integer():
        x = x[1:]  # a label first, as in ERAN's CSV rows
    if x.shape != shape:
        if not (allow_flat and x.size == int(np.prod(shape))):
            raise InvalidInputError(
                f"input shape {tuple(x.shape)} does not match the model's input shape {shape}")
        x = x.reshape(shape)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise InvalidInputError("the input contains NaN or infinite values")
    return x
