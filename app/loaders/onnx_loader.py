"""ONNX -> :class:`app.network.Network`.

A small symbolic interpreter walks the graph in order. Every tensor is either a constant
(numpy; initializers, ``Constant`` nodes and shape arithmetic such as the
Shape/Gather/Unsqueeze/Concat chain some exporters put before ``Reshape``) or the output of
an IR node. Operators on constants are evaluated right away, so only the piecewise-linear
part of the graph becomes layers. Anything else is rejected with the op and node named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from app.errors import UnsupportedModelError
from app.layers import (
    Add,
    AvgPool2d,
    Conv2d,
    ElementwiseAffine,
    Flatten,
    Layer,
    Linear,
    MaxPool2d,
    ReLU,
    Reshape,
)
from app.loaders.limits import DEFAULT_LIMITS, LoadLimits
from app.network import INPUT, Network


@dataclass
class _Dyn:
    """A tensor computed by IR node ``node`` (``INPUT`` for the network input)."""

    node: int
    shape: tuple[int, ...]  # without batch


class _Builder:
    def __init__(self, input_shape: tuple[int, ...], limits: LoadLimits) -> None:
        self.layers: list[Layer] = []
        self.inputs: list[tuple[int, ...]] = []
        self.input_shape = input_shape
        self.limits = limits

    def add(self, layer: Layer, *srcs: _Dyn) -> _Dyn:
        self.layers.append(layer)
        self.inputs.append(tuple(s.node for s in srcs))
        with torch.no_grad():
            probes = [torch.zeros((1, *s.shape)) for s in srcs]
            shape = tuple(layer(*probes).shape[1:])
        self.limits.check_activation(shape, f"layer {len(self.layers)} ({type(layer).__name__})")
        return _Dyn(len(self.layers) - 1, shape)


def load_onnx(source: str | bytes | onnx.ModelProto, name: str = "onnx model",
              limits: LoadLimits = DEFAULT_LIMITS) -> Network:
    """Load an ONNX file (path or bytes) into the engine's representation.

    The model must have one data input (first dimension = batch) and one output. Its declared
    sizes are checked against ``limits`` before any tensor is built.
    """
    model = source if isinstance(source, onnx.ModelProto) else _read(source)
    _check_declared_sizes(model, limits)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, Exception) as exc:  # noqa: BLE001 - message is the point
        raise UnsupportedModelError(f"invalid ONNX model: {exc}") from exc
    graph = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    data_inputs = [i for i in graph.input if i.name not in consts]
    if len(data_inputs) != 1 or len(graph.output) != 1:
        raise UnsupportedModelError(
            f"expected one input and one output, got {len(data_inputs)} and {len(graph.output)}"
        )
    dims = [d.dim_value if d.HasField("dim_value") else 0
            for d in data_inputs[0].type.tensor_type.shape.dim]
    if len(dims) < 2 or any(d <= 0 for d in dims[1:]):
        raise UnsupportedModelError(f"input '{data_inputs[0].name}' has unsupported shape {dims}")
    input_shape = tuple(dims[1:])
    b = _Builder(input_shape, limits)
    env: dict[str, np.ndarray | _Dyn] = dict(consts)
    env[data_inputs[0].name] = _Dyn(INPUT, input_shape)
    for node in graph.node:
        handler = _HANDLERS.get(node.op_type)
        where = f"op '{node.op_type}' (node '{node.name or node.output[0]}')"
        if handler is None:
            raise UnsupportedModelError(f"unsupported {where}")
        args = [env[n] if n else None for n in node.input]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        try:
            outs = handler(b, args, attrs)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"unsupported {where}: {exc}") from exc
        except (ValueError, RuntimeError, IndexError, KeyError, TypeError) as exc:
            raise UnsupportedModelError(f"cannot convert {where}: {exc}") from exc
        for out_name, value in zip(node.output, outs, strict=False):
            env[out_name] = value if isinstance(value, _Dyn) else np.asarray(value)
    result = env[graph.output[0].name]
    if not isinstance(result, _Dyn) or result.node == INPUT:
        raise UnsupportedModelError("the model output does not depend on its input")
    if result.node != len(b.layers) - 1:
        raise UnsupportedModelError("the output is not the last computed tensor")
    layers, inputs = fold_affine(b.layers, b.inputs)
    return Network(layers, input_shape, inputs, name=name)


def _check_declared_sizes(model: onnx.ModelProto, limits: LoadLimits) -> None:
    """Input, parameter and activation counts from the declarations alone (no allocation)."""
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    for value in graph.input:
        if value.name not in init_names:
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            limits.check_input(tuple(d for d in dims[1:] if d > 0))
    tensors = list(graph.initializer) + [
        a.t for node in graph.node for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    limits.check_parameters(sum(int(np.prod(t.dims, dtype=object)) for t in tensors))
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - the builder checks each layer as it goes
        return
    for value in [*inferred.value_info, *inferred.output]:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        limits.check_activation(tuple(d for d in dims[1:] if d > 0), f"tensor '{value.name}'")


def _read(source: str | bytes) -> onnx.ModelProto:
    try:
        if isinstance(source, bytes):
            return onnx.load_model_from_string(source)
        return onnx.load(source)
    except Exception as exc:  # noqa: BLE001 - protobuf raises many kinds
        raise UnsupportedModelError(f"not a readable ONNX file: {exc}") from exc


# -- op handlers: each takes (builder, args, attrs) and returns the outputs -----------------

Handler = Callable[[_Builder, list, dict], list]
_HANDLERS: dict[str, Handler] = {}


def _op(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for n in names:
            _HANDLERS[n] = fn
        return fn

    return register


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(a, dtype=np.float32))


def _dyn(a: object, what: str) -> _Dyn:
    if not isinstance(a, _Dyn):
        raise UnsupportedModelError(f"{what} must be the data tensor")
    return a


def _const(a: object, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise UnsupportedModelError(f"{what} must be a constant")
    return a


@_op("Identity", "Dropout", "Cast")
def _identity(b: _Builder, args: list, attrs: dict) -> list:
    if attrs.get("to") is not None and isinstance(args[0], np.ndarray):
        return [args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))]
    return [args[0]]


@_op("Constant")
def _constant(b: _Builder, args: list, attrs: dict) -> list:
    if "value" not in attrs:
        raise UnsupportedModelError("only tensor-valued Constant is supported")
    return [numpy_helper.to_array(attrs["value"])]


@_op("Shape")
def _shape(b: _Builder, args: list, attrs: dict) -> list:
    a = args[0]
    return [np.array((1, *a.shape) if isinstance(a, _Dyn) else a.shape, dtype=np.int64)]


@_op("Gather")
def _gather(b: _Builder, args: list, attrs: dict) -> list:
    return [np.take(_const(args[0], "Gather data"), _const(args[1], "indices"),
                    axis=attrs.get("axis", 0))]


@_op("Unsqueeze")
def _unsqueeze(b: _Builder, args: list, attrs: dict) -> list:
    axes = attrs.get("axes", args[1] if len(args) > 1 else None)
    out = _const(args[0], "Unsqueeze input")
    for ax in sorted(int(a) for a in np.atleast_1d(axes)):
        out = np.expand_dims(out, ax)
    return [out]


@_op("Squeeze")
def _squeeze(b: _Builder, args: list, attrs: dict) -> list:
    axes = attrs.get("axes", args[1] if len(args) > 1 else None)
    a = _const(args[0], "Squeeze input")
    return [np.squeeze(a, axis=None if axes is None else tuple(int(x) for x in axes))]


@_op("Concat")
def _concat(b: _Builder, args: list, attrs: dict) -> list:
    return [np.concatenate([_const(a, "Concat input") for a in args], axis=attrs["axis"])]


@_op("Reshape")
def _reshape(b: _Builder, args: list, attrs: dict) -> list:
    target = [int(s) for s in _const(args[1], "Reshape shape")]
    if isinstance(args[0], np.ndarray):
        return [args[0].reshape(target)]
    x = _dyn(args[0], "Reshape input")
    rest = target[1:]
    rest = [x.shape[i] if s == 0 and i < len(x.shape) else s for i, s in enumerate(rest)]
    n = int(np.prod(x.shape))
    if -1 in rest:
        known = int(np.prod([s for s in rest if s != -1]))
        rest = [n // known if s == -1 else s for s in rest]
    if int(np.prod(rest)) != n:
        raise UnsupportedModelError(f"Reshape to {target} changes the batch dimension")
    if tuple(rest) == x.shape:
        return [x]
    layer = Flatten() if len(rest) == 1 else Reshape(tuple(rest))
    return [b.add(layer, x)]


@_op("Flatten")
def _flatten(b: _Builder, args: list, attrs: dict) -> list:
    if attrs.get("axis", 1) != 1:
        raise UnsupportedModelError(f"Flatten axis {attrs['axis']} (only 1)")
    if isinstance(args[0], np.ndarray):
        return [args[0].reshape(args[0].shape[0], -1)]
    x = _dyn(args[0], "Flatten input")
    return [x] if len(x.shape) == 1 else [b.add(Flatten(), x)]


@_op("Relu")
def _relu(b: _Builder, args: list, attrs: dict) -> list:
    return [b.add(ReLU(), _dyn(args[0], "Relu input"))]


@_op("Gemm")
def _gemm(b: _Builder, args: list, attrs: dict) -> list:
    x = _dyn(args[0], "Gemm input A")
    if attrs.get("transA", 0):
        raise UnsupportedModelError("Gemm with transA=1")
    w = _const(args[1], "Gemm weight") * attrs.get("alpha", 1.0)
    w = w if attrs.get("transB", 0) else w.T
    bias = args[2] if len(args) > 2 and args[2] is not None else np.zeros(w.shape[0])
    bias = np.broadcast_to(_const(bias, "Gemm bias") * attrs.get("beta", 1.0), (w.shape[0],))
    if len(x.shape) != 1:
        x = b.add(Flatten(), x)
    return [b.add(Linear(_t(w), _t(bias)), x)]


@_op("MatMul")
def _matmul(b: _Builder, args: list, attrs: dict) -> list:
    x = _dyn(args[0], "MatMul input A")
    w = _const(args[1], "MatMul weight B")
    if w.ndim != 2:
        raise UnsupportedModelError(f"MatMul with a {w.ndim}-D weight")
    if len(x.shape) != 1:
        if int(np.prod(x.shape[:-1])) != 1:
            raise UnsupportedModelError(f"MatMul on a batch of rows {x.shape}")
        x = b.add(Flatten(), x)
    return [b.add(Linear(_t(w.T), torch.zeros(w.shape[1])), x)]


def _elementwise(b: _Builder, args: list, op: str) -> list:
    a, c = args
    if isinstance(a, np.ndarray) and isinstance(c, np.ndarray):
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        return [fn(a, c)]
    if isinstance(a, _Dyn) and isinstance(c, _Dyn):
        if op != "Add":
            raise UnsupportedModelError(f"{op} of two data tensors is not piecewise-linear")
        return [b.add(Add(), a, c)]
    x, k, x_first = (a, c, True) if isinstance(a, _Dyn) else (c, a, False)
    k = np.asarray(k, dtype=np.float64)
    # constants carry ONNX's batch dimension when they have the data's full rank
    if k.ndim == len(x.shape) + 1:
        k = k[0]
    if op == "Add":
        scale, shift = np.ones_like(k), k
    elif op == "Sub":
        scale, shift = (np.ones_like(k), -k) if x_first else (-np.ones_like(k), k)
    elif op == "Mul":
        scale, shift = k, np.zeros_like(k)
    else:
        if not x_first:
            raise UnsupportedModelError("division by the data tensor")
        scale, shift = 1.0 / k, np.zeros_like(k)
    return [b.add(ElementwiseAffine(_t(scale), _t(shift)), x)]


for _name in ("Add", "Sub", "Mul", "Div"):
    _HANDLERS[_name] = (lambda name: lambda b, args, attrs: _elementwise(b, args, name))(_name)


def _pads(attrs: dict, what: str) -> tuple[int, int]:
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise UnsupportedModelError(f"{what} auto_pad={attrs['auto_pad']!r}")
    p = list(attrs.get("pads", [0, 0, 0, 0]))
    if p[0] != p[2] or p[1] != p[3]:
        raise UnsupportedModelError(f"{what} with asymmetric pads {p}")
    return int(p[0]), int(p[1])


@_op("Conv")
def _conv(b: _Builder, args: list, attrs: dict) -> list:
    x = _dyn(args[0], "Conv input")
    w = _const(args[1], "Conv weight")
    if w.ndim != 4:
        raise UnsupportedModelError(f"{w.ndim - 2}-D convolution (only 2-D)")
    bias = _const(args[2], "Conv bias") if len(args) > 2 and args[2] is not None else None
    layer = Conv2d(
        _t(w), None if bias is None else _t(bias),
        stride=tuple(attrs.get("strides", (1, 1))), padding=_pads(attrs, "Conv"),
        dilation=tuple(attrs.get("dilations", (1, 1))), groups=int(attrs.get("group", 1)),
    )
    return [b.add(layer, x)]


@_op("MaxPool")
def _maxpool(b: _Builder, args: list, attrs: dict) -> list:
    if attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", (1, 1))):
        raise UnsupportedModelError("MaxPool with ceil_mode or dilation")
    k = tuple(attrs["kernel_shape"])
    layer = MaxPool2d(k, tuple(attrs.get("strides", k)), _pads(attrs, "MaxPool"))
    return [b.add(layer, _dyn(args[0], "MaxPool input"))]


@_op("AveragePool")
def _avgpool(b: _Builder, args: list, attrs: dict) -> list:
    if attrs.get("ceil_mode", 0):
        raise UnsupportedModelError("AveragePool with ceil_mode")
    k = tuple(attrs["kernel_shape"])
    layer = AvgPool2d(k, tuple(attrs.get("strides", k)), _pads(attrs, "AveragePool"),
                      bool(attrs.get("count_include_pad", 0)))
    return [b.add(layer, _dyn(args[0], "AveragePool input"))]


@_op("GlobalAveragePool")
def _global_avgpool(b: _Builder, args: list, attrs: dict) -> list:
    x = _dyn(args[0], "GlobalAveragePool input")
    return [b.add(AvgPool2d(x.shape[1:], x.shape[1:]), x)]


@_op("BatchNormalization")
def _batchnorm(b: _Builder, args: list, attrs: dict) -> list:
    x = _dyn(args[0], "BatchNormalization input")
    gamma, beta, mean, var = (_const(a, "BatchNormalization parameter") for a in args[1:5])
    scale = gamma / np.sqrt(var + attrs.get("epsilon", 1e-5))
    shift = beta - mean * scale
    extra = (1,) * (len(x.shape) - 1)
    return [b.add(ElementwiseAffine(_t(scale.reshape(-1, *extra)),
                                    _t(shift.reshape(-1, *extra))), x)]


# -- folding of elementwise affine maps into their affine neighbours ----------------------


def fold_affine(
    layers: list[Layer], inputs: list[tuple[int, ...]]
) -> tuple[list[Layer], list[tuple[int, ...]]]:
    """Merge each ``ElementwiseAffine`` into the neighbouring Linear/Conv where exact.

    BatchNorm after Conv/Linear and normalisation before Linear (or before an unpadded Conv)
    vanish into the weights; the rest stays as an ``ElementwiseAffine`` layer (still affine).
    """
    layers, inputs = list(layers), list(inputs)
    changed = True
    while changed:
        changed = False
        consumers = _consumers(inputs)
        for i, layer in enumerate(layers):
            if not isinstance(layer, ElementwiseAffine):
                continue
            src = inputs[i][0]
            users = consumers.get(i, [])
            prev = layers[src] if src != INPUT else None
            if (isinstance(prev, Linear | Conv2d) and len(consumers.get(src, [])) == 1
                    and _per_channel(layer, prev)):
                layers[src] = _fold_after(prev, layer)
                layers, inputs = _drop(layers, inputs, i)
                changed = True
                break
            if len(users) == 1 and _fold_before_ok(layer, layers[users[0]]):
                layers[users[0]] = _fold_before(layer, layers[users[0]])
                layers, inputs = _drop(layers, inputs, i)
                changed = True
                break
    return layers, inputs


def _consumers(inputs: list[tuple[int, ...]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, ins in enumerate(inputs):
        for j in ins:
            out.setdefault(j, []).append(i)
    return out


def _drop(layers: list[Layer], inputs: list[tuple[int, ...]], i: int):
    """Remove node ``i`` (one input), rewiring its consumers to its source."""
    src = inputs[i][0]
    new_layers = layers[:i] + layers[i + 1:]
    remap = {j: (j if j < i else j - 1) for j in range(len(layers))}
    remap[i] = src if src < i else src
    remap[INPUT] = INPUT
    new_inputs = [tuple(remap[j] for j in ins) for k, ins in enumerate(inputs) if k != i]
    return new_layers, new_inputs


def _per_channel(ea: ElementwiseAffine, prev: Linear | Conv2d) -> bool:
    """True when the scale/shift vary only along the output channel of ``prev``."""
    out = prev.weight.shape[0]
    for t in (ea.scale, ea.shift):
        if t.numel() not in (1, out):
            return False
        if isinstance(prev, Conv2d) and t.numel() == out and t.dim() != 3 and out != 1:
            return False
    return True


def _fold_after(prev: Linear | Conv2d, ea: ElementwiseAffine) -> Linear | Conv2d:
    out = prev.weight.shape[0]
    scale = ea.scale.detach().reshape(-1).expand(out)
    shift = ea.shift.detach().reshape(-1).expand(out)
    w = prev.weight.detach() * scale.reshape(-1, *([1] * (prev.weight.dim() - 1)))
    bias = prev.bias.detach() * scale + shift
    if isinstance(prev, Linear):
        return Linear(w, bias)
    return Conv2d(w, bias, prev.stride, prev.padding, prev.dilation, prev.groups)


def _fold_before_ok(ea: ElementwiseAffine, nxt: Layer) -> bool:
    if isinstance(nxt, Linear):
        return True
    if isinstance(nxt, Conv2d):
        per_channel = ea.scale.numel() == 1 or (ea.scale.dim() == 3 and ea.scale.shape[1:] == (1, 1))
        shift_ok = ea.shift.numel() == 1 or (ea.shift.dim() == 3 and ea.shift.shape[1:] == (1, 1))
        return nxt.padding == (0, 0) and nxt.groups == 1 and per_channel and shift_ok
    return False


def _fold_before(ea: ElementwiseAffine, nxt: Linear | Conv2d) -> Linear | Conv2d:
    if isinstance(nxt, Linear):
        n = nxt.weight.shape[1]
        scale = ea.scale.detach().expand(n) if ea.scale.numel() == 1 else ea.scale.detach().reshape(n)
        shift = ea.shift.detach().expand(n) if ea.shift.numel() == 1 else ea.shift.detach().reshape(n)
        w = nxt.weight.detach()
        return Linear(w * scale, nxt.bias.detach() + w @ shift)
    cin = nxt.weight.shape[1]
    scale = ea.scale.detach().reshape(-1).expand(cin)
    shift = ea.shift.detach().reshape(-1).expand(cin)
    w = nxt.weight.detach()
    new_w = w * scale.reshape(1, -1, 1, 1)
    new_b = nxt.bias.detach() + (w * shift.reshape(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    return Conv2d(new_w, new_b, nxt.stride, nxt.padding, nxt.dilation, nxt.groups)
