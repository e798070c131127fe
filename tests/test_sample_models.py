"""The committed sample models and gallery, checked against independent oracles.

Accuracy is re-measured with onnxruntime on the gallery, the gallery against scikit-learn's
digits, the certified accuracy with the interval bounds of the *loaded ONNX* network (no
last-layer elision, so a looser bound than the cards' one), and certification soundness with
attacks and dense sampling inside the certified boxes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import load_digits

from app import load_network
from app.attacks import pgd
from sample_models import list_sample_models, load_gallery
from sample_models.train import NAMES, certified, main
from tests.conftest import SAMPLE_MODELS

CARD_FIELDS = {
    "name", "dataset", "input_shape", "input_range", "classes", "architecture", "training",
    "eps", "clean_accuracy", "pgd_accuracy", "certified_accuracy", "seed", "train_seconds",
}


def _card(name: str) -> dict:
    return json.loads((SAMPLE_MODELS / f"{name}.json").read_text())


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def gallery() -> tuple[np.ndarray, np.ndarray]:
    return load_gallery("digits")


def _naive_ibp_certified(net, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Certified iff the true logit's lower bound beats every other logit's upper bound."""
    with torch.no_grad():
        lo, hi = net.interval_bounds((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))[-1]
    others = hi.clone()
    others[torch.arange(len(y)), y] = -torch.inf
    return lo[torch.arange(len(y)), y] > others.max(dim=1).values


def test_all_six_models_are_committed_with_cards() -> None:
    listed = list_sample_models()
    assert sorted(card["name"] for _, card in listed) == sorted(NAMES)
    assert len(NAMES) == 6
    for path, card in listed:
        assert path.is_file() and path.stem == card["name"]
        assert CARD_FIELDS <= set(card)
        _, arch, method = card["name"].split("_")
        assert card["dataset"] == "digits" and card["training"] == method
        assert card["input_shape"] == [1, 8, 8] and card["input_range"] == [0.0, 1.0]
        assert card["classes"] == list(range(10)) and card["eps"] == pytest.approx(0.1)
        assert arch in {"fc", "conv"} and ("Conv" in card["architecture"]) == (arch == "conv")
        # a sound certificate implies robustness to any attack, which implies a correct label
        assert card["certified_accuracy"] <= card["pgd_accuracy"] <= card["clean_accuracy"]


def test_gallery_is_a_labelled_slice_of_sklearn_digits(gallery) -> None:
    x, y = gallery
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.shape == (len(y), 1, 8, 8) and 100 <= len(y) <= 500
    assert x.min() >= 0 and x.max() <= 1 and set(np.unique(y)) == set(range(10))
    digits = load_digits()
    index = {img.astype(np.int64).tobytes(): label for img, label in
             zip(digits.images, digits.target, strict=True)}
    for img, label in zip(x, y, strict=True):
        key = np.rint(img[0] * 16).astype(np.int64).tobytes()
        assert index.get(key) == label
    with pytest.raises(FileNotFoundError, match="no gallery"):
        load_gallery("imagenet")


@pytest.mark.parametrize("name", NAMES)
def test_model_loads_and_card_accuracies_hold_on_gallery(name: str, gallery) -> None:
    x, y = gallery
    path = SAMPLE_MODELS / f"{name}.onnx"
    card = _card(name)
    net = load_network(path)
    assert net.input_shape == (1, 8, 8) and net.num_outputs == 10
    ref = _ort_logits(path, x)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        ours = net(xt).numpy()
    assert np.abs(ours - ref).max() < 1e-4
    # the gallery is the held-out split the card was measured on
    assert abs(float((ref.argmax(1) == y).mean()) - card["clean_accuracy"]) <= 0.01
    assert card["clean_accuracy"] >= 0.9
    adv = pgd(net, xt, yt, card["eps"], steps=20, generator=torch.Generator().manual_seed(1))
    robust = float((_ort_logits(path, adv.numpy()).argmax(1) == y).mean())
    assert abs(robust - card["pgd_accuracy"]) <= 0.05
    # the cards bound with the last layer folded into the margin: never looser than this
    naive = float(_naive_ibp_certified(net, xt, yt, card["eps"]).float().mean())
    assert naive <= card["certified_accuracy"] + 1e-9


@pytest.mark.parametrize("arch", ["fc", "conv"])
def test_robust_training_shows_in_the_numbers(arch: str, gallery) -> None:
    x, y = (torch.from_numpy(a) for a in gallery)
    standard, adv, ibp = (_card(f"digits_{arch}_{m}") for m in ("standard", "pgd", "ibp"))
    assert adv["pgd_accuracy"] > standard["pgd_accuracy"] + 0.2
    cert = {}
    for card in (standard, ibp):
        net = load_network(SAMPLE_MODELS / f"{card['name']}.onnx")
        cert[card["training"]] = float(_naive_ibp_certified(net, x, y, card["eps"]).float().mean())
    assert cert["ibp"] > cert["standard"] + 0.2
    assert ibp["certified_accuracy"] > standard["certified_accuracy"] + 0.3


@pytest.mark.parametrize("name", ["digits_fc_ibp", "digits_conv_ibp"])
def test_certified_inputs_survive_attacks_and_sampling(name: str, gallery) -> None:
    """The cards' certificate (margin bounds), recomputed on the ONNX file, must be sound."""
    x, y = (torch.from_numpy(a) for a in gallery)
    card = _card(name)
    eps = card["eps"]
    net = load_network(SAMPLE_MODELS / f"{name}.onnx")
    ok = certified(net, x, y, eps)
    assert abs(float(ok.float().mean()) - card["certified_accuracy"]) <= 0.01
    xc, yc = x[ok], y[ok]
    assert len(yc) > 0.5 * len(y)
    adv = pgd(net, xc, yc, eps, steps=40, restarts=3, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    corners = xc[:, None] + eps * torch.sign(torch.rand((len(yc), 64, 1, 8, 8), generator=gen) - 0.5)
    points = torch.cat([adv[:, None], corners.clamp(0, 1)], dim=1)
    logits = _ort_logits(SAMPLE_MODELS / f"{name}.onnx", points.reshape(-1, 1, 8, 8).numpy())
    assert (logits.argmax(1).reshape(len(yc), -1) == yc[:, None].numpy()).all()


def test_quick_retrain_is_deterministic_and_accurate(tmp_path: Path, gallery) -> None:
    x, y = gallery
    outs = []
    for run in ("a", "b"):
        main(["--only", "digits_fc_standard", "--out", str(tmp_path / run), "--quick"])
        outs.append(tmp_path / run / "digits_fc_standard.onnx")
    card = json.loads(outs[0].with_suffix(".json").read_text())
    assert card["training"] == "standard" and card["epochs"] < _card("digits_fc_standard")["epochs"]
    assert np.array_equal(np.load(tmp_path / "a" / "gallery" / "digits.npz")["x"], x)
    first, second = (_ort_logits(p, x) for p in outs)
    assert np.array_equal(first, second)
    accuracy = float((first.argmax(1) == y).mean())
    assert 0.85 <= accuracy <= 1.0
    assert abs(accuracy - card["clean_accuracy"]) <= 0.01
