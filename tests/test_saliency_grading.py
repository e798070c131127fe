"""Fair grading of the saliency methods, against the torch module's own forward passes: IG and
SmoothGrad are graded with the mask's baseline, SmoothGrad is an absolute value, groups equal
to the baseline are never spent before the others, and equal scores are reported as ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from app import load_network
from app.analyses.saliency import OPTIMAL, smt_mask
from app.analyses.saliency.grading import Grade, winners
from tests.conftest import SAMPLE_MODELS


def _model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                         nn.Linear(16, 10)).double().eval()


def _digit(index: int) -> torch.Tensor:
    digits = np.load(SAMPLE_MODELS / "gallery" / "digits.npz")
    return torch.from_numpy(digits["x"][index].astype(np.float64))


def _top(scores: np.ndarray, inert: np.ndarray, kept: int) -> np.ndarray:
    """The oracle's top ``kept`` groups: by score, groups equal to the baseline last."""
    order = sorted(range(len(scores)), key=lambda g: (bool(inert[g]), -scores[g], g))
    mask = np.zeros(len(scores), bool)
    mask[order[:kept]] = True
    return mask


@pytest.mark.parametrize("baseline", [0.0, 0.5, -0.3, "blurred"])
def test_ig_and_smoothgrad_are_graded_from_the_masks_baseline(baseline) -> None:
    model = _model(21)
    net = load_network(model, input_shape=(1, 8, 8))
    x = _digit(4)
    res = smt_mask(net, x, top_k=6, threshold=0.6, baseline=baseline)
    assert res.status == OPTIMAL and res.mask_size > 0
    b = torch.from_numpy(res.baseline)
    if not isinstance(baseline, str):
        assert (b == baseline).all()
    probs = lambda z: torch.softmax(model(z[None]), 1)[0, res.target].item()  # noqa: E731
    with torch.no_grad():
        # IG completeness from the same baseline: attributions sum to f(x) - f(baseline)
        gap = (model(x[None]) - model(b[None]))[0, res.target].item()
        assert abs(res.ig.sum() - gap) <= 1e-2 * max(1.0, abs(gap))
        assert (res.smoothgrad >= 0).all()
        inert = (x == b).reshape(-1).numpy()  # single-pixel groups
        for name, scores in (("ig", res.ig), ("smoothgrad", res.smoothgrad)):
            g = res.grades[name]
            keep = torch.from_numpy(_top(scores.reshape(-1), inert, res.mask_size)).reshape(x.shape)
            masked = b + keep * (x - b)
            assert g.insertion_curve[0] == pytest.approx(probs(b))
            assert g.insertion_curve[-1] == pytest.approx(probs(masked))
            assert g.survives == (int(model(masked[None]).argmax()) == res.target)
            dropped = x - keep * (x - b)
            assert g.deletion_curve[-1] == pytest.approx(probs(dropped))


def test_groups_equal_to_the_baseline_are_ranked_last() -> None:
    model = _model(22)
    net = load_network(model, input_shape=(1, 8, 8))
    x = _digit(9)
    res = smt_mask(net, x, top_k=8, threshold=0.9, baseline=0.0)
    background = (x == 0).reshape(-1).numpy()
    assert background.any() and res.mask_size < (~background).sum()
    # SmoothGrad's raw top pixels include background equal to the baseline, whose keeping
    # changes nothing; the grade inserts them only after every other pixel
    raw = np.argsort(-res.smoothgrad.reshape(-1), kind="stable")[: res.mask_size]
    assert background[raw].any()
    probs = lambda z: torch.softmax(model(z[None]), 1)[0, res.target].item()  # noqa: E731
    with torch.no_grad():
        for name, scores in (("ig", res.ig), ("smoothgrad", res.smoothgrad)):
            curve = [probs(x * torch.from_numpy(_top(scores.reshape(-1), background, i))
                           .reshape(x.shape)) for i in range(res.mask_size + 1)]
            assert res.grades[name].insertion_curve == pytest.approx(curve)


def test_winners_report_ties_as_ties() -> None:
    def grade(metric: float, ins: float) -> Grade:
        return Grade(kept=3, sparsity=0.5, survives=True, survive_size=2, insertion_auc=ins,
                     deletion_auc=0.1, saliency_metric=metric, insertion_curve=[],
                     deletion_curve=[])
    best = winners({"smt": grade(-1.0, 0.5), "ig": grade(-1.0 + 1e-13, 0.7),
                    "smoothgrad": grade(0.2, 0.7)})
    assert best["saliency_metric"] == ["smt", "ig"]  # equal within rounding: a tie
    assert best["insertion_auc"] == ["ig", "smoothgrad"]
    assert best["deletion_auc"] == ["smt", "ig", "smoothgrad"]
