"""Seeded float64 ReLU MLPs: the true networks of the weight-extraction tests and benchmark."""

from __future__ import annotations

import torch
from torch import nn


def mlp(sizes: tuple[int, ...], seed: int) -> nn.Sequential:
    """Linear layers of widths ``sizes`` with ReLU between them, torch-seeded by ``seed``."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).double().eval()
