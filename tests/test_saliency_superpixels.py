"""SMT saliency masks over SLIC superpixels, against independent oracles: connected-component
labelling (scipy) for the regions, forward passes of the torch modules for the thresholds, and
brute-force enumeration of every superpixel mask for minimality."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from app import load_network
from app.analyses.saliency import OPTIMAL, SUPERPIXEL, smt_mask
from tests.conftest import SAMPLE_MODELS
from tests.saliency_oracle import holds


def _check_regions(groups: np.ndarray) -> None:
    """Ids 0..n-1, every region one 4-connected piece, all channels of a pixel together."""
    plane = groups.reshape(-1, *groups.shape[-2:])
    assert (plane == plane[:1]).all()
    ids = np.unique(plane[0])
    assert (ids == np.arange(len(ids))).all()
    for g in ids:
        assert ndimage.label(plane[0] == g)[1] == 1


def _mask_follows_groups(res) -> None:
    """Every superpixel is wholly in or wholly out of the mask, as its group bit says."""
    for g in range(res.num_groups):
        inside = res.mask[res.groups == g]
        assert (inside == res.group_mask[g]).all()


def test_superpixels_follow_the_image_edges() -> None:
    rng = np.random.default_rng(0)
    x = np.full((3, 16, 16), 0.1) + rng.normal(0, 0.01, (3, 16, 16))
    x[:, 3:11, 5:13] = 0.9 + rng.normal(0, 0.01, (3, 8, 8))  # a bright square
    inside = np.zeros((16, 16), bool)
    inside[3:11, 5:13] = True
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 7 * 7, 3)).double().eval()
    net = load_network(model, input_shape=(3, 16, 16))
    xt = torch.from_numpy(x)
    res = smt_mask(net, xt, top_k=6, threshold=0.5, granularity=SUPERPIXEL)
    assert res.patch is None and 8 <= res.num_groups <= 64
    _check_regions(res.groups)
    for g in range(res.num_groups):  # no superpixel straddles the square's edge
        side = inside[res.groups[0] == g]
        assert side.all() or not side.any()
    _mask_follows_groups(res)
    assert res.status == OPTIMAL
    mask = torch.from_numpy(res.mask)
    assert holds(model, xt, mask[None], res).item()
    drops = torch.stack([mask & (torch.from_numpy(res.groups) != g)
                         for g in np.flatnonzero(res.group_mask)])
    assert not holds(model, xt, drops, res).any()


def test_superpixel_mask_on_a_digit_is_the_brute_force_minimum() -> None:
    digits = np.load(SAMPLE_MODELS / "gallery" / "digits.npz")
    torch.manual_seed(11)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                          nn.Linear(16, 10)).double().eval()
    net = load_network(model, input_shape=(1, 8, 8))
    for index in (0, 5):
        x = torch.from_numpy(digits["x"][index].astype(np.float64))
        res = smt_mask(net, x, top_k=6, threshold=0.6, granularity=SUPERPIXEL)
        assert 8 <= res.num_groups <= 16 and res.status == OPTIMAL
        _check_regions(res.groups)
        _mask_follows_groups(res)
        groups = torch.from_numpy(res.groups)
        every = torch.tensor(list(itertools.product([0, 1], repeat=res.num_groups)),
                             dtype=torch.bool)
        masks = every[:, groups]  # one input-shaped mask per superpixel subset
        ok = holds(model, x, masks, res)
        assert ok[every.tolist().index(res.group_mask.tolist())]
        assert res.mask_size == int(every[ok].sum(1).min())
