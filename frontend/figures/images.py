"""One way to turn an input-shaped array into a 2-D picture for a heatmap."""

from __future__ import annotations

import math

import numpy as np


def as_image(values, shape: list[int] | tuple[int, ...] | None = None, *,
             how: str = "mean") -> np.ndarray:
    """A 2-D view of one input-shaped array (``shape`` reshapes a flat one first).

    Channels are averaged (``how="mean"``: pixel values stay in the input's range) or summed
    (``how="sum"``: a pixel's attribution is its channels' total); a flat vector whose length
    is a square is read as a square, any other as one row.
    """
    arr = np.asarray(values, dtype=float)
    if shape is not None:
        arr = arr.reshape(shape)
    if arr.ndim >= 3 and min(arr.shape[-2:]) > 1:
        stack = arr.reshape(-1, *arr.shape[-2:])
        return stack.mean(0) if how == "mean" else stack.sum(0)
    if arr.ndim == 2 and min(arr.shape) > 1:
        return arr
    side = math.isqrt(arr.size)
    return arr.reshape(side, side) if side * side == arr.size else arr.reshape(1, -1)
