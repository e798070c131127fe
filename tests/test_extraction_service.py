"""Weight recovery refuses, before a job is queued, what it cannot do, and says why.

The check runs on the model summary the service stores at upload; here it is called through
the job route's own ``check_target`` (an ``InvalidInputError`` there is answered 422).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app import load_network
from app.errors import InvalidInputError
from backend.analyses import REGISTRY
from backend.analyses import extraction as plugin
from backend.api.routes.jobs import check_target
from tests.conftest import SAMPLE_MODELS
from tests.seeded_mlp import mlp


def _submit(summary: dict, params: dict) -> None:
    """What ``POST /api/jobs`` does before queueing: the route's target check."""
    services = SimpleNamespace(storage=SimpleNamespace(
        model=lambda model_id, owner: SimpleNamespace(summary=summary)))
    check_target(services, REGISTRY["extraction"], "m", None, "", params)


def test_conv_and_pooling_models_are_refused_with_the_reason() -> None:
    summary = load_network(SAMPLE_MODELS / "digits_conv_standard.onnx").summary()
    with pytest.raises(InvalidInputError, match="supports fully connected ReLU networks.*conv2d"):
        _submit(summary, {})


def test_a_budget_too_small_for_the_network_is_refused_with_the_queries_it_needs() -> None:
    summary = load_network(mlp((784, 256, 256, 10), seed=0), input_shape=(784,)).summary()
    need = int(1.1 * 2 * 784 * 512)  # 2 queries per input per hidden neuron, +10%
    with pytest.raises(InvalidInputError, match=f"needs at least {need:,} queries"):
        _submit(summary, {"budget": 200_000})
    _submit(summary, {"budget": 1_000_000})  # enough: accepted


def test_fully_connected_models_are_accepted_and_run_checks_too(tmp_path) -> None:
    _submit(load_network(SAMPLE_MODELS / "digits_fc_standard.onnx").summary(), {})
    _submit(load_network(mlp((784, 32, 1), seed=0), input_shape=(784,)).summary(), {})
    from backend.analyses.base import JobContext

    net = load_network(mlp((100, 50, 10), seed=0), input_shape=(100,))
    ctx = JobContext(net=net, x=None, label=None, card={}, artifacts=tmp_path,
                     progress=lambda f, m: None)
    with pytest.raises(InvalidInputError, match="needs at least 11,000 queries"):
        plugin.run(ctx, plugin.Params(budget=10_000))
