"""Turn a model file or module into the engine's one network representation."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from app.errors import UnsupportedModelError
from app.loaders.limits import DEFAULT_LIMITS, LoadLimits
from app.loaders.onnx_loader import load_onnx
from app.loaders.torch_loader import from_module, load_archive
from app.network import Network

ONNX_SUFFIXES = {".onnx"}
TORCH_SUFFIXES = {".pt2", ".pt", ".pth", ".ts"}


def load_network(
    source: str | Path | nn.Module | Network, input_shape: tuple[int, ...] | None = None, *,
    allow_torchscript: bool = False, limits: LoadLimits = DEFAULT_LIMITS,
) -> Network:
    """Load ``source`` (an ONNX/.pt2/TorchScript path, an ``nn.Module`` or a Network).

    ``input_shape`` (without batch) is needed for modules and TorchScript files only.
    TorchScript runs code from the file, so it loads only with ``allow_torchscript=True``;
    files are checked against ``limits`` before anything is allocated.
    """
    if isinstance(source, Network):
        return source
    if isinstance(source, nn.Module):
        if input_shape is None:
            raise UnsupportedModelError("load_network(module) needs input_shape=")
        return from_module(source, tuple(input_shape), name=type(source).__name__)
    path = Path(source)
    if not path.is_file():
        raise UnsupportedModelError(f"no model file at {path}")
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return load_onnx(str(path), name=path.stem, limits=limits)
    if suffix in TORCH_SUFFIXES:
        return load_archive(path, input_shape, allow_torchscript=allow_torchscript,
                            limits=limits)
    raise UnsupportedModelError(
        f"unknown model format '{suffix}': upload .onnx, .pt2 (torch.export) or TorchScript"
    )


__all__ = ["DEFAULT_LIMITS", "LoadLimits", "load_network", "load_onnx"]
