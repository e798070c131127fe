"""The plug-in contract every analysis module follows (see docs/ARCHITECTURE.md).

A module in :mod:`backend.analyses` defines a pydantic ``Params`` model and a
``run(ctx, params) -> dict`` function and calls :func:`register`. The job runner validates
the request's parameters with ``Params`` and calls ``run`` in a worker process with a
:class:`JobContext` that holds the loaded network, the chosen input and a progress callback.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from app import Network
from app.progress import ProgressFn


class NoParams(BaseModel):
    """For analyses without parameters."""


@dataclass(frozen=True)
class Analysis:
    """One analysis the service offers: its name, UI text, parameter model and runner."""

    name: str
    title: str
    description: str
    run: Callable[[JobContext, Any], dict]
    params: type[BaseModel] = NoParams
    needs_input: bool = True
    # called with the model's summary (``Network.summary()``) and the validated params before
    # a job is queued; raises ``app.errors.InvalidInputError`` to refuse it (answered 422)
    check: Callable[[dict, Any], None] | None = None

    def info(self) -> dict:
        """The listing shown by ``GET /api/analyses``."""
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "needs_input": self.needs_input,
            "params_schema": self.params.model_json_schema(),
        }


REGISTRY: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    """Make ``analysis`` available to the service under ``analysis.name``."""
    REGISTRY[analysis.name] = analysis
    return analysis


@dataclass
class JobContext:
    """What a running analysis gets: the model, the chosen input and the job's services.

    ``x`` has the model's input shape (no batch dimension); ``label`` is the input's true
    class when known (gallery inputs). ``progress(fraction, message)`` records progress and
    raises :class:`app.Cancelled` once the user cancelled the job.
    """

    net: Network
    x: torch.Tensor | None
    label: int | None
    card: dict
    artifacts: Path
    progress: ProgressFn
    model_id: str = ""
    input_id: str | None = None
    _load_input: Callable[[str], tuple[torch.Tensor, int | None]] | None = field(
        default=None, repr=False
    )
    _gallery: Callable[[int | None], tuple[torch.Tensor, torch.Tensor]] | None = field(
        default=None, repr=False
    )
    _load_dataset: Callable[[str], tuple[torch.Tensor, torch.Tensor | None]] | None = field(
        default=None, repr=False
    )

    @property
    def input_range(self) -> tuple[float, float]:
        """The card's ``input_range`` (every value an input may take), ``(0, 1)`` when the card
        has none: the analyses' one default for pixel inputs."""
        lo, hi = (self.card.get("input_range") or [0.0, 1.0])[:2]
        return float(lo), float(hi)

    @property
    def class_names(self) -> list:
        """The card's ``classes``, or the output indices when it names none."""
        return self.card.get("classes") or list(range(self.net.num_outputs))

    def load_input(self, input_id: str) -> tuple[torch.Tensor, int | None]:
        """Another input of this model by id: ``(x, label)``, ``x`` in the model's shape."""
        if self._load_input is None:
            raise LookupError("no input store in this context")
        return self._load_input(input_id)

    def gallery(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` (all if None) gallery inputs of the model's dataset: ``(x, y)``.

        ``x`` is ``[N, *input_shape]``; empty tensors when the model has no gallery.
        """
        if self._gallery is None:
            return torch.zeros((0, *self.net.input_shape)), torch.zeros(0, dtype=torch.long)
        return self._gallery(n)

    def load_dataset(self, dataset_id: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An uploaded dataset of this model by id: ``(x [N, *input_shape], labels or None)``;
        LookupError when it is unknown (or another owner's)."""
        if self._load_dataset is None:
            raise LookupError("no dataset store in this context")
        return self._load_dataset(dataset_id)


def serialise(result: Any, *, exclude: tuple[str, ...] = (), rename: dict[str, str] | None = None,
              properties: tuple[str, ...] = (), **extra: Any) -> dict:
    """An engine result (a dataclass) as a job's JSON, in one place for every analysis: its
    fields as they are (``jsonable``) less ``exclude`` (bulk the pages never read), keys
    renamed by ``rename`` (names the pages already use), the computed ``properties`` named,
    then the job's own keys (``extra``: context such as class names; they win a clash)."""
    rename = rename or {}
    out = {rename.get(f.name, f.name): getattr(result, f.name)
           for f in dataclasses.fields(result) if f.name not in exclude}
    out.update({rename.get(p, p): getattr(result, p) for p in properties})
    out.update(extra)
    return jsonable(out)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data: numpy/torch to lists and numbers, dataclasses to dicts.

    Non-finite floats become ``None`` so the result is strict JSON.
    """
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, BaseModel):
        return jsonable(obj.model_dump())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Enum):
        return jsonable(obj.value)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot turn {type(obj).__name__} into JSON")
