"""torch -> :class:`app.network.Network`.

* An ``nn.Sequential`` of standard layers maps layer by layer and *shares* its parameters, so
  losses computed through the engine (e.g. interval bounds in certified training) are
  differentiable with respect to the module's weights.
* Any other module, a ``torch.export`` archive (``.pt2``) or a TorchScript archive goes
  through torch's ONNX exporter and the ONNX loader: one conversion path for everything else.

Files may come from strangers: a ``.pt2`` is vetted so that loading it unpickles and
evaluates nothing (:mod:`app.loaders.export_archive`), and TorchScript, which runs code from
the file by design, is loaded only when the caller says the file is its own
(``allow_torchscript=True``, e.g. ``relu-atlas convert`` on the user's machine).
"""

from __future__ import annotations

import io
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.errors import UnsupportedModelError
from app.layers import (
    AvgPool2d,
    Conv2d,
    ElementwiseAffine,
    Flatten,
    Layer,
    Linear,
    MaxPool2d,
    ReLU,
)
from app.loaders.export_archive import is_export_archive, vet_export_archive
from app.loaders.limits import DEFAULT_LIMITS, LoadLimits
from app.loaders.onnx_loader import fold_affine, load_onnx
from app.network import Network

MAX_UNCOMPRESSED_BYTES = 1 << 30


def from_module(module: nn.Module, input_shape: tuple[int, ...], name: str = "torch model") -> Network:
    """Convert a module; ``input_shape`` excludes the batch dimension."""
    module = module.eval()
    if isinstance(module, nn.Sequential):
        try:
            return _from_sequential(module, input_shape, name)
        except _NotPlain:
            pass
    return _via_onnx(module, input_shape, name)


TORCHSCRIPT_REFUSED = (
    "TorchScript runs code from the file when it loads, so it is not accepted here; convert "
    "it on your own machine with `relu-atlas convert model.pt --input-shape 1,28,28 -o "
    "model.onnx` and upload the ONNX file")


def load_archive(path: str | Path, input_shape: tuple[int, ...] | None = None, *,
                 allow_torchscript: bool = False,
                 limits: LoadLimits = DEFAULT_LIMITS) -> Network:
    """Load a ``torch.export`` (``.pt2``) archive, or TorchScript when ``allow_torchscript``
    (a user's own file on their own machine: TorchScript can run arbitrary code)."""
    onnx_bytes = archive_to_onnx(path, input_shape, allow_torchscript=allow_torchscript,
                                 limits=limits)
    return load_onnx(onnx_bytes, name=Path(path).stem, limits=limits)


def archive_to_onnx(path: str | Path, input_shape: tuple[int, ...] | None = None, *,
                    allow_torchscript: bool = False,
                    limits: LoadLimits = DEFAULT_LIMITS) -> bytes:
    """The archive as ONNX bytes, the one format the engine loads.

    A ``.pt2`` is vetted first (:mod:`app.loaders.export_archive`): nothing in it is
    unpickled or evaluated. TorchScript is refused unless ``allow_torchscript``.
    """
    path = Path(path)
    check_zip(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if is_export_archive(names):
            vet_export_archive(zf)
        elif not allow_torchscript:
            raise UnsupportedModelError(TORCHSCRIPT_REFUSED)
    if is_export_archive(names):
        try:
            exported = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds
            raise UnsupportedModelError(f"'{path.name}' is not a readable torch.export "
                                        f"archive: {exc}") from exc
        module: nn.Module = _Frozen(exported.module())
        example = exported.example_inputs[0] if exported.example_inputs else None
        shape = tuple(example[0].shape[1:]) if example else input_shape
    else:
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedModelError(
                f"'{path.name}' is neither a torch.export (.pt2) nor a TorchScript archive"
            ) from exc
        shape = input_shape
    if shape is None:
        raise UnsupportedModelError("a TorchScript model needs its input shape")
    limits.check_input(tuple(shape))
    return module_to_onnx(module, tuple(shape))


def check_zip(path: Path, limit: int = MAX_UNCOMPRESSED_BYTES) -> None:
    """Reject non-zip files and archives that would unpack to more than ``limit`` bytes."""
    if not zipfile.is_zipfile(path):
        raise UnsupportedModelError(f"'{path.name}' is not a torch archive (not a zip file)")
    with zipfile.ZipFile(path) as zf:
        total = sum(i.file_size for i in zf.infolist())
        names = [i.filename for i in zf.infolist()]
    if total > limit:
        raise UnsupportedModelError(f"'{path.name}' unpacks to {total} bytes (limit {limit})")
    if any(n.endswith("data.pkl") for n in names) and not any(
        "/code/" in n or n.endswith(".json") or "serialized_exported_program" in n for n in names
    ):
        raise UnsupportedModelError(
            f"'{path.name}' is a pickled torch checkpoint; upload ONNX or .pt2"
        )


class _Frozen(nn.Module):
    """Wraps an exported program's module, which refuses ``train()``/``eval()`` calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def train(self, mode: bool = True) -> _Frozen:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _NotPlain(Exception):
    """The sequential module holds a layer without a direct mapping."""


def _from_sequential(module: nn.Sequential, input_shape: tuple[int, ...], name: str) -> Network:
    layers: list[Layer] = []
    for sub in module:
        layer = _map_layer(sub)
        if layer is not None:
            layers.append(layer)
    inputs = [(i - 1,) for i in range(len(layers))]
    if any(isinstance(ly, ElementwiseAffine) for ly in layers):
        layers, inputs = fold_affine(layers, inputs)
    return Network(layers, input_shape, inputs, name=name)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


ModuleHandler = Callable[[Any], Layer | None]
_MODULES: dict[type[nn.Module], ModuleHandler] = {}


def _module(*kinds: type[nn.Module]) -> Callable[[ModuleHandler], ModuleHandler]:
    """Register the handler mapping a torch module kind to one engine layer (None: drop it),
    as the ONNX loader registers its op handlers; a handler raises ``_NotPlain`` for a
    configuration it cannot map (the model then goes through ONNX)."""

    def register(fn: ModuleHandler) -> ModuleHandler:
        for kind in kinds:
            _MODULES[kind] = fn
        return fn

    return register


def _map_layer(m: nn.Module) -> Layer | None:
    """The engine layer of module ``m``, by its class or nearest registered base class."""
    for cls in type(m).__mro__:
        if cls in _MODULES:
            return _MODULES[cls](m)
    raise _NotPlain(type(m).__name__)


def _plain(ok: bool, m: nn.Module) -> None:
    if not ok:
        raise _NotPlain(type(m).__name__)


@_module(nn.Identity, nn.Dropout)
def _drop(_m: nn.Module) -> None:
    return None


@_module(nn.Linear)
def _linear(m: nn.Linear) -> Layer:
    return Linear(m.weight, m.bias)


@_module(nn.Conv2d)
def _conv(m: nn.Conv2d) -> Layer:
    _plain(m.padding_mode == "zeros" and not isinstance(m.padding, str), m)
    return Conv2d(m.weight, m.bias, _pair(m.stride), _pair(m.padding), _pair(m.dilation),
                  m.groups)


@_module(nn.ReLU)
def _relu(_m: nn.ReLU) -> Layer:
    return ReLU()


@_module(nn.Flatten)
def _flatten(m: nn.Flatten) -> Layer:
    _plain(m.start_dim == 1 and m.end_dim == -1, m)
    return Flatten()


@_module(nn.MaxPool2d)
def _maxpool(m: nn.MaxPool2d) -> Layer:
    _plain(not m.ceil_mode and m.dilation in (1, (1, 1)), m)
    return MaxPool2d(_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding))


@_module(nn.AvgPool2d)
def _avgpool(m: nn.AvgPool2d) -> Layer:
    _plain(not m.ceil_mode, m)
    return AvgPool2d(_pair(m.kernel_size), _pair(m.stride or m.kernel_size),
                     _pair(m.padding), m.count_include_pad)


@_module(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(m: nn.BatchNorm1d | nn.BatchNorm2d) -> Layer:
    _plain(m.running_mean is not None, m)
    scale = (m.weight if m.affine else 1.0) / torch.sqrt(m.running_var + m.eps)
    shift = (m.bias if m.affine else 0.0) - m.running_mean * scale
    extra = (1, 1) if isinstance(m, nn.BatchNorm2d) else ()
    return ElementwiseAffine(scale.detach().reshape(-1, *extra),
                             shift.detach().reshape(-1, *extra))


def _via_onnx(module: nn.Module, input_shape: tuple[int, ...], name: str) -> Network:
    return load_onnx(module_to_onnx(module, input_shape), name=name)


def module_to_onnx(module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """Export ``module`` (run on the caller's trust) to ONNX bytes."""
    buf = io.BytesIO()
    example = torch.zeros((1, *input_shape))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=13,
                              input_names=["input"], output_names=["logits"])
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds
        raise UnsupportedModelError(f"torch model could not be converted: {exc}") from exc
    return buf.getvalue()
