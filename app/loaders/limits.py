"""Size limits a model must meet before the loader allocates anything for it.

A model file is small, but what it declares need not be: a 166-byte ONNX can declare a
16384x16384 input, which the loader would otherwise allocate to probe layer shapes. Every
count here is read from the file's declarations (shapes and dims), never from data.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from app.errors import UnsupportedModelError


@dataclass(frozen=True)
class LoadLimits:
    """Largest input, parameter and activation counts a loaded model may declare."""

    max_input_elements: int = 1 << 20  # 3x512x512 and below
    max_parameters: int = 50_000_000
    max_activation_elements: int = 1 << 24  # per tensor, batch of one

    def check_input(self, shape: tuple[int, ...]) -> None:
        n = prod(shape)
        if n > self.max_input_elements:
            raise UnsupportedModelError(
                f"input shape {tuple(shape)} has {n:,} elements (the limit is "
                f"{self.max_input_elements:,})")

    def check_parameters(self, count: int) -> None:
        if count > self.max_parameters:
            raise UnsupportedModelError(
                f"the model declares {count:,} parameters (the limit is "
                f"{self.max_parameters:,})")

    def check_activation(self, shape: tuple[int, ...], where: str) -> None:
        n = prod(shape)
        if n > self.max_activation_elements:
            raise UnsupportedModelError(
                f"{where} has shape {tuple(shape)}, {n:,} elements (the limit is "
                f"{self.max_activation_elements:,})")


DEFAULT_LIMITS = LoadLimits()
