"""Every layer kind, in every per-kind table and from both loaders.

Adding a layer class to ``app.layers`` fails these tests until every ``KindTable`` (bounds,
linear regions, MILP, polytopes, ...) has an entry for it or refuses it by name, and until a
torch model with that kind loads through the torch loader and through the ONNX loader to the
same outputs as torch itself (the oracle).
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from torch import nn

import app
from app import load_network
from app.layers import (
    Add,
    AffineLayer,
    AvgPool2d,
    Conv2d,
    ElementwiseAffine,
    Flatten,
    KindTable,
    Layer,
    Linear,
    MaxPool2d,
    ReLU,
    Reshape,
)
from app.loaders.onnx_loader import load_onnx
from app.loaders.torch_loader import module_to_onnx

for _mod in pkgutil.walk_packages(app.__path__, "app."):  # every table registers on import
    importlib.import_module(_mod.name)


def _kinds(base: type[Layer] = Layer) -> list[type[Layer]]:
    """Every layer class of the engine (not test doubles defined in other tests)."""
    out = []
    for cls in base.__subclasses__():
        if cls is not AffineLayer and cls.__module__.startswith("app."):
            out.append(cls)
        out += _kinds(cls)
    return sorted(set(out), key=lambda c: c.__name__)


KINDS = _kinds()


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x)) + x)


class _Reshaped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.conv = nn.Linear(6, 6), nn.Conv2d(1, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.a(x)).reshape(-1, 1, 2, 3)).flatten(1)


def _batchnorm() -> nn.Module:
    bn = nn.BatchNorm1d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(1, 2)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), bn, nn.ReLU(), nn.Linear(6, 3))


def _conv_pools() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 3))


# one torch model per layer kind that both loaders must turn into a network with that kind
EXAMPLES = {
    Linear: (_residual := _Residual, (6,)),
    Add: (_residual, (6,)),
    ReLU: (_residual, (6,)),
    Reshape: (_Reshaped, (6,)),
    Flatten: (_Reshaped, (6,)),
    ElementwiseAffine: (_batchnorm, (6,)),
    Conv2d: (_conv_pools, (1, 4, 4)),
    MaxPool2d: (_conv_pools, (1, 4, 4)),
    AvgPool2d: (_conv_pools, (1, 4, 4)),
}


def test_the_kinds_are_found() -> None:
    assert {Linear, Conv2d, ReLU, MaxPool2d, Add} <= set(KINDS)
    assert len(KindTable.tables) >= 5


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("table", KindTable.tables, ids=lambda t: t.missing)
def test_every_table_handles_or_refuses_every_kind(table: KindTable, kind: type[Layer]) -> None:
    assert table.entry(kind) is not None or kind in table.refuses, (
        f"{table.missing!r}: add an entry for {kind.__name__} or refuse it by name")


@pytest.mark.parametrize("loader", ["torch", "onnx"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_both_loaders_build_every_kind(kind: type[Layer], loader: str) -> None:
    assert kind in EXAMPLES, f"add a torch model with a {kind.__name__} layer to EXAMPLES"
    make, shape = EXAMPLES[kind]
    torch.manual_seed(0)
    model = make().eval()
    net = (load_network(model, input_shape=shape) if loader == "torch"
           else load_onnx(module_to_onnx(model, shape)))
    assert any(type(layer) is kind for layer in net.layers)
    x = torch.rand(5, *shape)
    with torch.no_grad():
        want = model(x)
        got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
