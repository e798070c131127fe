"""The IR against independent oracles: onnxruntime for ONNX files, torch for modules."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from app import UnsupportedModelError, load_network
from app.layers import Add
from tests.conftest import SAMPLE_MODELS, SHARED


def _shared_onnx() -> list[str]:
    if not SHARED.exists():
        return []
    files = sorted(SHARED.glob("vnncomp2021/acasxu/ACASXU_run2a_*_batch_2000.onnx"))[::4]
    files += sorted(SHARED.glob("vnncomp2021/mnistfc/*.onnx"))
    files += sorted(SHARED.glob("profit_nets/*.onnx"))
    return [str(f) for f in files]


def _sample_onnx() -> list[str]:
    return [str(f) for f in sorted(SAMPLE_MODELS.glob("*.onnx"))]


def _compare_with_onnxruntime(path: str, n: int = 100) -> float:
    net = load_network(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    xs = rng.random((n, *net.input_shape), dtype=np.float32)
    ref = np.concatenate([sess.run(None, {name: xs[i : i + 1]})[0].reshape(1, -1) for i in range(n)])
    with torch.no_grad():
        ours = net(torch.from_numpy(xs)).numpy().reshape(n, -1)
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("path", _shared_onnx() + _sample_onnx(), ids=lambda p: p.split("/")[-1])
def test_ir_matches_onnxruntime(path: str) -> None:
    assert _compare_with_onnxruntime(path) < 1e-5


def test_shared_networks_present_or_skipped() -> None:
    if not SHARED.exists():
        pytest.skip("shared data not available")
    assert len(_shared_onnx()) >= 10


def test_sequential_module_shares_parameters_and_matches_torch() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), bn, nn.ReLU(), nn.MaxPool2d(2), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    ).eval()
    net = load_network(model, input_shape=(1, 8, 8))
    x = torch.randn(100, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-5)
    # the final Linear is shared, so gradients reach the module's parameters
    net(x).sum().backward()
    assert model[-1].weight.grad is not None


def test_residual_module_goes_through_onnx_export() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)) + x)

    torch.manual_seed(1)
    model = Residual().eval()
    net = load_network(model, input_shape=(6,))
    assert any(isinstance(layer, Add) for layer in net.layers)
    x = torch.randn(100, 6)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-5)


def test_interval_bounds_contain_sampled_outputs() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    net = load_network(model, input_shape=(5,))
    x = torch.randn(1, 5)
    lo, hi = net.interval_bounds(x - 0.1, x + 0.1)[-1]
    pts = x + (torch.rand(10_000, 5) * 0.2 - 0.1)
    with torch.no_grad():
        out = net(pts)
    assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()


def test_activation_patterns_match_preactivation_sign() -> None:
    torch.manual_seed(3)
    net = load_network(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), input_shape=(4,))
    x = torch.randn(10, 4)
    pats = net.activation_patterns(x)
    assert list(pats) == [1]
    assert torch.equal(pats[1], (x @ net.layers[0].weight.T + net.layers[0].bias) > 0)


def test_affine_matrix_and_transpose_agree_with_forward() -> None:
    torch.manual_seed(4)
    net = load_network(
        nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)),
        input_shape=(2, 6, 6),
    ).with_dtype(torch.float64)
    conv = net.layers[0]
    a, b = conv.matrix((2, 6, 6))
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    assert torch.allclose((x.reshape(5, -1) @ a.T + b), conv(x).reshape(5, -1), atol=1e-10)
    y = torch.randn(5, *net.shapes[0], dtype=torch.float64)
    assert torch.allclose(conv.transpose(y, (2, 6, 6)).reshape(5, -1), y.reshape(5, -1) @ a, atol=1e-10)


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,groups,size", [
    (3, 8, 3, 1, 1, 1, 1, 9), (16, 32, 4, 2, 1, 1, 1, 15), (4, 6, 3, 2, 0, 2, 2, 11),
    (2, 4, 5, 3, 2, 1, 2, 8), (2, 4, 2, 3, 0, 1, 1, 7)])
def test_conv_columns_are_torch_convolutions_of_one_hot_inputs(
        cin: int, cout: int, k: int, stride: int, pad: int, dil: int, groups: int,
        size: int) -> None:
    """Column entries gathered from the kernel (stride, padding, dilation, groups), and the
    layer's own one-hot columns, against ``torch.nn.functional.conv2d`` of one-hot inputs."""
    torch.manual_seed(5)
    w = torch.randn(cout, cin // groups, k, k, dtype=torch.float64)
    conv = load_network(nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dil, groups)),
                        input_shape=(cin, size, size)).with_dtype(torch.float64).layers[0]
    conv.weight.data.copy_(w)
    n = cin * size * size
    eye = torch.eye(n, dtype=torch.float64).reshape(n, cin, size, size)
    truth = torch.nn.functional.conv2d(eye, w, None, stride, pad, dil, groups).reshape(n, -1)
    units = torch.randperm(n)[:64]
    with torch.no_grad():
        cols = conv.columns(units, (cin, size, size)).reshape(len(units), -1)
        index, value = conv.column_entries(units, (cin, size, size))
    assert torch.equal(cols, truth[units])
    dense = torch.zeros_like(cols).scatter_add_(1, index, value)
    assert torch.equal(dense, truth[units])
    assert index.shape[1] < truth.shape[1] or size * size <= k * k  # sparse: a few entries


def _model_with(op: str) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], name="mystery")], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def test_unsupported_op_is_named_with_its_node() -> None:
    with pytest.raises(UnsupportedModelError, match=r"'Sigmoid'.*'mystery'"):
        load_network_bytes(_model_with("Sigmoid"))


def test_garbage_is_rejected_clearly() -> None:
    with pytest.raises(UnsupportedModelError, match="ONNX"):
        load_network_bytes(b"\x00not an onnx file" * 10)


def load_network_bytes(data: bytes):
    from app.loaders import load_onnx

    return load_onnx(data)


def test_checker_runs_first() -> None:
    model = onnx.ModelProto()
    with pytest.raises(UnsupportedModelError):
        load_network_bytes(model.SerializeToString())


def _small_conv() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def test_torch_export_archive_loads(tmp_path) -> None:
    model = _small_conv()
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)), str(path))
    net = load_network(path)
    x = torch.randn(100, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-5)


def test_torchscript_loads_only_when_the_caller_trusts_it(tmp_path) -> None:
    model = _small_conv()
    path = tmp_path / "model.pt"
    torch.jit.trace(model, torch.zeros(1, 1, 8, 8)).save(str(path))
    with pytest.raises(UnsupportedModelError, match="relu-atlas convert"):
        load_network(path, input_shape=(1, 8, 8))
    net = load_network(path, input_shape=(1, 8, 8), allow_torchscript=True)
    x = torch.randn(100, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-5)


def test_pickled_checkpoint_is_refused(tmp_path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, str(path))
    with pytest.raises(UnsupportedModelError, match="pickle"):
        load_network(path, input_shape=(3,))


def test_kind_table_finds_the_nearest_registered_class_and_names_missing_kinds() -> None:
    from app.layers import AffineLayer, KindTable, Layer, Linear

    class Odd(Layer):
        kind = "odd"

    table: KindTable[str] = KindTable("no test rule for", {AffineLayer: "affine"})
    assert table(Linear(torch.zeros(2, 3))) == "affine"
    table.register(Linear)("linear")
    assert table(Linear(torch.zeros(2, 3))) == "linear"
    with pytest.raises(UnsupportedModelError, match="no test rule for layer kind 'odd'"):
        table(Odd())
