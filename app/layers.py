"""The layer kinds of the engine's one network representation.

Every layer is a small ``nn.Module``. Analyses never branch on concrete classes for the math:
they ask a layer for what they need through the methods below.

* :class:`AffineLayer` (``Linear``, ``Conv2d``, ``ElementwiseAffine``, ``AvgPool2d``,
  ``Flatten``, ``Reshape``): ``y = A x + b``. ``linear`` applies ``A``, ``transpose`` applies
  ``A^T`` (for backward bound propagation), ``abs_linear`` applies ``|A|`` (interval radius),
  ``bias_map`` is ``b`` shaped like one output, ``matrix`` is the dense ``(A, b)``.
* :class:`ReLU` and :class:`MaxPool2d`: the piecewise-linear layers.
* :class:`Add`: residual sum of two earlier nodes.

All layers are batched: the first dimension of every tensor is the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import ClassVar, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.errors import UnsupportedModelError


class Layer(nn.Module):
    """Base class: a named kind, a forward pass and sound interval propagation."""

    kind: ClassVar[str] = "layer"
    arity: ClassVar[int] = 1

    def interval(self, *bounds: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Elementwise lower/upper bounds of the output given bounds of each input."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind

    @property
    def device(self) -> torch.device:
        """Where the layer's parameters live (the CPU for a kind without any)."""
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")


class AffineLayer(Layer):
    """``y = A x + b`` with a fixed linear map ``A``; subclasses give ``linear`` and ``bias_map``."""

    kind = "affine"

    def linear(self, x: Tensor) -> Tensor:
        """``A x`` (no bias), batched."""
        raise NotImplementedError

    def abs_linear(self, x: Tensor) -> Tensor:
        """``|A| x``, batched; used for interval radii."""
        raise NotImplementedError

    def bias_map(self, out_shape: tuple[int, ...]) -> Tensor:
        """``b`` broadcast to one output of shape ``out_shape`` (no batch dimension)."""
        raise NotImplementedError

    def transpose(self, y: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        """``A^T y`` for a batch ``y`` of output-shaped tensors; returns input-shaped tensors."""
        x0 = torch.zeros((1, *in_shape), dtype=y.dtype, device=y.device)
        flat = y.reshape(y.shape[0], -1)
        _, vjp = torch.func.vjp(self.linear, x0)

        def one(row: Tensor) -> Tensor:
            return vjp(row.reshape(1, *y.shape[1:]))[0][0]

        return torch.vmap(one)(flat)

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x)
        return out + self.bias_map(tuple(out.shape[1:])).to(out)

    def interval(self, *bounds: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        lo, hi = bounds[0]
        mid = self.forward((lo + hi) / 2)
        rad = self.abs_linear((hi - lo) / 2)
        return mid - rad, mid + rad

    def columns(self, units: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        """Columns ``A[:, k]`` for the flat input indices ``units`` ``[E]``, as rows shaped like
        one output ``[E, *out_shape]``. Here by applying ``A`` to one-hot inputs; kinds with a
        sparse ``A`` gather them from their weights instead."""
        units = units.to(self.device)
        eye = torch.zeros((len(units), math.prod(in_shape)), dtype=self._dtype(),
                          device=self.device)
        eye[torch.arange(len(units), device=self.device), units] = 1.0
        return self.linear(eye.reshape(len(units), *in_shape))

    def column_entries(self, units: Tensor, in_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The same columns as (flat output index ``[E, m]``, value ``[E, m]``) pairs; a
        sparse kind lists only the ``m`` entries a column can have (padding: value 0)."""
        cols = self.columns(units, in_shape).reshape(len(units), -1)
        return torch.arange(cols.shape[1], device=cols.device).expand(cols.shape), cols

    def shared_windows(self, in_shape: tuple[int, ...]) -> tuple[int, int]:
        """``(width, stride)``: ``column_entries`` lists a column's entries as ``width`` runs
        whose output units differ by ``stride``, and the units ``u + c * stride`` (``c <
        width``) read the same inputs (a conv's channels at one position). ``(1, 1)``: none."""
        return 1, 1

    def matrix(self, in_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Dense ``(A, b)`` acting on flattened inputs: ``A`` is ``[out_numel, in_numel]``."""
        n = math.prod(in_shape)
        dtype = self._dtype()
        eye = torch.eye(n, dtype=dtype, device=self.device).reshape(n, *in_shape)
        cols = self.linear(eye).reshape(n, -1)
        out_shape = tuple(self.linear(eye[:1]).shape[1:])
        return cols.T.contiguous(), self.bias_map(out_shape).reshape(-1).to(dtype)

    def _dtype(self) -> torch.dtype:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.dtype
        return torch.get_default_dtype()


class Linear(AffineLayer):
    """Fully connected map on flat inputs: ``y = W x + b`` with ``W`` of shape ``[out, in]``."""

    kind = "linear"

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.weight = _param(weight)
        self.bias = _param(bias if bias is not None
                           else torch.zeros(weight.shape[0], device=weight.device))

    def linear(self, x: Tensor) -> Tensor:
        return x @ self.weight.T

    def abs_linear(self, x: Tensor) -> Tensor:
        return x @ self.weight.abs().T

    def transpose(self, y: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return y @ self.weight

    def bias_map(self, out_shape: tuple[int, ...]) -> Tensor:
        return self.bias

    def columns(self, units: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return self.weight.T[units.to(self.device)]

    def matrix(self, in_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        return self.weight, self.bias

    def describe(self) -> str:
        return f"linear {self.weight.shape[1]}->{self.weight.shape[0]}"


class Conv2d(AffineLayer):
    """2-D convolution with the usual stride/padding/dilation/groups (zero padding)."""

    kind = "conv2d"

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.weight = _param(weight)
        self.bias = _param(bias if bias is not None
                           else torch.zeros(weight.shape[0], device=weight.device))
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.dilation, self.groups = tuple(dilation), groups

    def _conv(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def linear(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight)

    def abs_linear(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight.abs())

    def bias_map(self, out_shape: tuple[int, ...]) -> Tensor:
        return self.bias.reshape(-1, 1, 1).expand(out_shape)

    def column_entries(self, units: Tensor, in_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Input pixel ``(c, i, j)`` reaches output ``(o, y, x)`` through kernel tap
        ``(i + pad - y * stride) / dilation`` (likewise for ``j``) when that is a whole tap
        index inside the kernel and ``o`` is in ``c``'s group: a few output rows and columns
        per pixel, gathered from the weights (no convolution)."""
        o_ch, c_per_group, kh, kw = self.weight.shape
        units = units.to(self.device)
        per_group = o_ch // self.groups
        c, rest = units // (in_shape[1] * in_shape[2]), units % (in_shape[1] * in_shape[2])
        h_out, w_out = _out_size(in_shape[1], self, 0), _out_size(in_shape[2], self, 1)
        y, ty, oky = _taps(rest // in_shape[2], h_out, kh, self, 0)
        x, tx, okx = _taps(rest % in_shape[2], w_out, kw, self, 1)
        o = (c // c_per_group)[:, None] * per_group + torch.arange(per_group, device=c.device)
        value = self.weight[o[:, :, None, None], (c % c_per_group)[:, None, None, None],
                            ty[:, None, :, None], tx[:, None, None, :]]
        ok = (oky[:, :, None] & okx[:, None, :])[:, None]
        index = (o[:, :, None, None] * h_out + y[:, None, :, None]) * w_out + x[:, None, None, :]
        n = len(units)
        return (torch.where(ok, index, 0).reshape(n, -1),
                torch.where(ok, value, 0).reshape(n, -1))

    def shared_windows(self, in_shape: tuple[int, ...]) -> tuple[int, int]:
        return (self.weight.shape[0] // self.groups,
                _out_size(in_shape[1], self, 0) * _out_size(in_shape[2], self, 1))

    def transpose(self, y: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        lead = y.shape[:-3]
        full = transposed_conv(y.reshape(-1, *y.shape[-3:]), self.weight, self.stride,
                               self.dilation, self.groups)
        (h, w), (ph, pw) = in_shape[-2:], self.padding
        x = full[..., ph:ph + h, pw:pw + w]  # the padding's rows and columns dropped
        if tuple(x.shape[-2:]) != (h, w):  # trailing inputs that no output reads
            x = F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))
        return x.reshape(*lead, *in_shape)

    def describe(self) -> str:
        o, i, kh, kw = self.weight.shape
        return f"conv {i}->{o} k{kh}x{kw} s{self.stride[0]} p{self.padding[0]}"


def transposed_conv(y: Tensor, weight: Tensor, stride: tuple[int, ...],
                    dilation: tuple[int, ...], groups: int) -> Tensor:
    """``A^T y`` for the convolution with ``weight`` and no padding, on ``y`` ``[N, O, h, w]``:
    all ``(h - 1) * stride + dilation * (k - 1) + 1`` rows and columns of its input.

    Where the stride divides the kernel, as a stride-1 transposed convolution with the kernel
    split into ``stride x stride`` phases, then a pixel shuffle: the same sums, several times
    faster on a CPU than a strided transposed convolution (2.2x on ConvSmall's first layer).
    """
    s = stride[0]
    o, c, kh, kw = weight.shape
    if s > 1 and stride[1] == s and tuple(dilation) == (1, 1) and kh % s == 0 and kw % s == 0:
        phases = weight.reshape(o, c, kh // s, s, kw // s, s).permute(0, 1, 3, 5, 2, 4)
        phases = phases.reshape(o, c * s * s, kh // s, kw // s)
        return F.pixel_shuffle(F.conv_transpose2d(y, phases, None, 1, 0, 0, groups), s)
    return F.conv_transpose2d(y, weight, None, tuple(stride), 0, 0, groups, tuple(dilation))


def _out_size(size: int, conv: Conv2d, axis: int) -> int:
    k = conv.weight.shape[2 + axis]
    return (size + 2 * conv.padding[axis] - conv.dilation[axis] * (k - 1) - 1
            ) // conv.stride[axis] + 1


def _taps(pos: Tensor, n_out: int, k: int, conv: Conv2d,
          axis: int) -> tuple[Tensor, Tensor, Tensor]:
    """The output positions ``[E, m]`` that input position ``pos`` ``[E]`` can reach along one
    axis, the kernel tap linking them, and whether that link exists."""
    s, p, d = conv.stride[axis], conv.padding[axis], conv.dilation[axis]
    out = (pos + p)[:, None] // s - torch.arange((d * (k - 1)) // s + 1, device=pos.device)
    off = (pos + p)[:, None] - out * s
    ok = (out >= 0) & (out < n_out) & (off % d == 0) & (off < d * k)
    return out.clamp(0, n_out - 1), (off // d).clamp(0, k - 1), ok


class ElementwiseAffine(AffineLayer):
    """``y = x * scale + shift`` with broadcasting: input normalisation or a lone BatchNorm."""

    kind = "elementwise_affine"

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.scale = _param(scale)
        self.shift = _param(shift)

    def linear(self, x: Tensor) -> Tensor:
        return x * self.scale

    def abs_linear(self, x: Tensor) -> Tensor:
        return x * self.scale.abs()

    def transpose(self, y: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return y * self.scale

    def bias_map(self, out_shape: tuple[int, ...]) -> Tensor:
        return self.shift.expand(out_shape)

    def describe(self) -> str:
        return "normalize"


class AvgPool2d(AffineLayer):
    """Average pooling (zero padding counted, as ONNX ``count_include_pad=1``)."""

    kind = "avgpool2d"

    def __init__(
        self,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int] = (0, 0),
        count_include_pad: bool = True,
    ) -> None:
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.count_include_pad = tuple(padding), count_include_pad

    def linear(self, x: Tensor) -> Tensor:
        lead = x.shape[:-3]
        y = F.avg_pool2d(
            x.reshape(-1, *x.shape[-3:]), self.kernel_size, self.stride, self.padding,
            count_include_pad=self.count_include_pad,
        )
        return y.reshape(*lead, *y.shape[-3:])

    abs_linear = linear

    def bias_map(self, out_shape: tuple[int, ...]) -> Tensor:
        return torch.zeros(out_shape, device=self.device)

    def describe(self) -> str:
        return f"avgpool k{self.kernel_size[0]} s{self.stride[0]}"


class Flatten(AffineLayer):
    """Flatten everything but the batch dimension (a permutation-free linear map)."""

    kind = "flatten"

    def linear(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    abs_linear = linear

    def transpose(self, y: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return y.reshape(*y.shape[:-1], *in_shape)

    def bias_map(self, out_shape: tuple[int, ...]) -> Tensor:
        return torch.zeros(out_shape, device=self.device)


class Reshape(AffineLayer):
    """Reshape each sample to a fixed ``shape`` (no batch dimension)."""

    kind = "reshape"

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def linear(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    abs_linear = linear

    def transpose(self, y: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return y.reshape(*y.shape[: y.dim() - len(self.shape)], *in_shape)

    def bias_map(self, out_shape: tuple[int, ...]) -> Tensor:
        return torch.zeros(out_shape, device=self.device)

    def describe(self) -> str:
        return f"reshape {self.shape}"


class ReLU(Layer):
    """``max(x, 0)`` elementwise."""

    kind = "relu"

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def interval(self, *bounds: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        lo, hi = bounds[0]
        return lo.clamp(min=0), hi.clamp(min=0)


class MaxPool2d(Layer):
    """Max pooling; ``windows`` exposes each output's candidate inputs for exact analyses."""

    kind = "maxpool2d"

    def __init__(
        self,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = (
            tuple(kernel_size), tuple(stride), tuple(padding),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def windows(self, x: Tensor) -> Tensor:
        """``[B, C, out_h, out_w, k]``: the ``k`` inputs each output takes the max over.

        Padding positions hold ``-inf`` so they never win.
        """
        b, c, h, w = x.shape
        ph, pw = self.padding
        xp = F.pad(x, (pw, pw, ph, ph), value=-math.inf) if ph or pw else x
        kh, kw = self.kernel_size
        sh, sw = self.stride
        win = xp.unfold(2, kh, sh).unfold(3, kw, sw)
        return win.reshape(*win.shape[:4], kh * kw)

    def interval(self, *bounds: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        lo, hi = bounds[0]
        return self.forward(lo), self.forward(hi)

    def describe(self) -> str:
        return f"maxpool k{self.kernel_size[0]} s{self.stride[0]}"


class Add(Layer):
    """Residual sum of two earlier nodes' outputs (same shape)."""

    kind = "add"
    arity = 2

    def forward(self, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        return a + b

    def interval(self, *bounds: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        (la, ha), (lb, hb) = bounds
        return la + lb, ha + hb


T = TypeVar("T")


class KindTable(Generic[T]):
    """What one analysis needs of each layer kind (auto_LiRPA's per-operator methods, kept
    beside the analysis): found by the layer's class or its nearest registered base class, so
    one ``AffineLayer`` entry serves every affine kind unless a subclass has its own.

    A table that cannot handle a kind says so by name (``refuses``); every table is listed in
    ``KindTable.tables``, so a test can demand that each one covers or refuses every kind.
    """

    tables: ClassVar[list[KindTable]] = []

    def __init__(self, missing: str, entries: Mapping[type[Layer], T] | None = None,
                 refuses: tuple[type[Layer], ...] = ()) -> None:
        self.missing = missing  # the error's words before the kind, e.g. "no MILP encoding for"
        self._entries: dict[type, T] = dict(entries or {})
        self.refuses = frozenset(refuses)
        KindTable.tables.append(self)

    def register(self, kind: type[Layer]) -> Callable[[T], T]:
        """Decorator: ``value`` is the entry for ``kind``."""

        def add(value: T) -> T:
            self._entries[kind] = value
            return value

        return add

    def entry(self, kind: type[Layer]) -> T | None:
        """The entry for layers of class ``kind`` (None: refused, or missing)."""
        if kind in self.refuses:
            return None
        for cls in kind.__mro__:
            if cls in self._entries:
                return self._entries[cls]
        return None

    def __call__(self, layer: Layer) -> T:
        value = self.entry(type(layer))
        if value is None:
            raise UnsupportedModelError(f"{self.missing} layer kind '{layer.kind}'")
        return value


def _param(t: Tensor | None) -> nn.Parameter | None:
    """Keep tensors as parameters so ``Network.to`` moves them; gradients stay off by default."""
    if t is None:
        return None
    if isinstance(t, nn.Parameter):
        return t
    t = t if isinstance(t, Tensor) else torch.as_tensor(t, device="cpu")
    return nn.Parameter(t.detach().clone(), requires_grad=False)
