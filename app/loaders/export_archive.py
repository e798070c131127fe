"""Vet a ``torch.export`` archive (``.pt2``) so that loading it runs no code from the file.

``torch.export.load`` unpickles several parts of an archive (pickled weights and constants,
custom objects, sample inputs when the safe loader refuses them), parses symbolic shapes
with sympy (which evaluates strings) and resolves graph targets by name. Each of those is a
way for a file to run code. An archive is accepted only when none of them can happen:

* members: the plain-tensor layout ``torch.export.save`` writes (no AOTInductor binaries, no
  legacy pickled format, nothing unknown);
* weights and constants: raw tensor bytes, never ``use_pickle``, no custom/opaque objects;
* sample inputs: loadable by ``torch.load(weights_only=True)``, so torch never falls back
  to a full unpickle;
* the graph: static shapes only, no sub-graphs, every call target in :data:`ALLOWED_TARGETS`
  (pure tensor arithmetic; nothing that reads or writes files).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator

import torch

from app.errors import UnsupportedModelError

_MEMBER = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json|data/weights/[\w.-]+|data/constants/[\w.-]+"
    r"|data/sample_inputs/[\w.-]+\.pt|extra/[\w.-]+)")

_ATEN = {
    "conv2d", "convolution", "_convolution", "linear", "addmm", "mm", "matmul", "t",
    "relu", "relu_", "flatten", "view", "_unsafe_view", "reshape", "permute", "transpose",
    "squeeze", "unsqueeze", "contiguous", "clone", "alias", "detach", "dropout",
    "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d", "mean",
    "batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
    "add", "add_", "sub", "mul", "div", "neg", "expand", "slice", "select", "cat",
    "_to_copy", "to", "lift_fresh_copy", "sym_size",
}
ALLOWED_TARGETS = {"_operator.getitem"}
_TARGET = re.compile(r"torch\.ops\.aten\.(\w+)\.(\w+)")
_FORBIDDEN_KEYS = {"as_expr", "as_graph", "as_custom_obj", "as_operator", "as_sym_int",
                   "as_sym_ints", "as_sym_bool", "as_sym_bools", "as_sym_float",
                   "as_sym_floats", "as_complex"}


def is_export_archive(names: list[str]) -> bool:
    return any(n.split("/", 1)[-1] == "archive_format" for n in names)


def vet_export_archive(zf: zipfile.ZipFile) -> None:
    """Raise :class:`UnsupportedModelError` naming what makes the archive unsafe to load."""
    names = zf.namelist()
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1:
        raise UnsupportedModelError("a .pt2 archive has one top-level folder")
    for name in names:
        rel = name.split("/", 1)[1] if "/" in name else ""
        if rel and not name.endswith("/") and not _MEMBER.fullmatch(rel):
            raise UnsupportedModelError(
                f"the .pt2 archive holds '{rel}', which a plain torch.export.save archive "
                "does not (AOTInductor binaries and the legacy pickled format are refused)")
    for name in names:
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            _vet_payload_config(name, _json(zf, name))
        elif "/models/" in name and name.endswith(".json"):
            _vet_program(_json(zf, name))
        elif "/data/sample_inputs/" in name:
            try:
                torch.load(io.BytesIO(zf.read(name)), weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure means "would unpickle"
                raise UnsupportedModelError(
                    "the archive's sample inputs are not plain tensors (a pickled object "
                    f"would have to be run to read them): {type(exc).__name__}") from None


def _json(zf: zipfile.ZipFile, name: str) -> object:
    try:
        return json.loads(zf.read(name))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnsupportedModelError(f"'{name}' in the archive is not JSON: {exc}") from None


def _vet_payload_config(name: str, config: object) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UnsupportedModelError(f"'{name}' in the archive is not a payload config")
    for fqn, meta in entries.items():
        path = meta.get("path_name", "") if isinstance(meta, dict) else ""
        if not isinstance(meta, dict) or meta.get("use_pickle"):
            raise UnsupportedModelError(
                f"the archive stores '{fqn}' as a pickle; only raw tensors are accepted")
        if not str(path).startswith(("weight_", "tensor_")):
            raise UnsupportedModelError(
                f"the archive's constant '{fqn}' is an object ({path}), not a tensor")


def _vet_program(program: object) -> None:
    for key, value in _items(program):
        if key in _FORBIDDEN_KEYS:
            raise UnsupportedModelError(
                f"the exported program uses '{key}' (symbolic shapes, sub-graphs or custom "
                "objects); export with static shapes and plain layers")
        if key == "range_constraints" and value:
            raise UnsupportedModelError("the exported program has dynamic shapes; export it "
                                        "with static shapes")
        if key == "target" and isinstance(value, str) and not _allowed(value):
            raise UnsupportedModelError(f"unsupported op '{value}' in the exported program")


def _allowed(target: str) -> bool:
    if target in ALLOWED_TARGETS:
        return True
    match = _TARGET.fullmatch(target)
    return bool(match) and match.group(1) in _ATEN


def _items(tree: object) -> Iterator[tuple[str, object]]:
    """Every (key, value) pair of a JSON tree, depth first."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                yield key, value
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
