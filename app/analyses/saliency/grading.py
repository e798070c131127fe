"""Grading a ranked set of feature groups, the same way for every saliency method.

Every method is graded at the same number ``n`` of kept groups (the SMT mask's size) and with
the same baseline as the mask: its top ``n`` groups are kept and everything else is replaced by
the baseline. Rankings are built the same way for every method (:func:`ranking`): by score,
ties by group id, and groups equal to the baseline (which masking cannot change) last.
:func:`winners` compares methods per measure and reports ties as ties.

* ``sparsity``: the fraction of groups dropped (``1 - n / groups``).
* ``survives``: the masked input is still classified as the target.
* ``survive_size``: the fewest top-ranked groups whose masked input keeps the prediction
  (``None`` if even all of them do not); compares how sparse each ranking can go.
* ``insertion_auc`` / ``deletion_auc``: the target's probability while the top ``n`` groups are
  inserted into the baseline / deleted from the input one by one (area under the curve over
  the fraction inserted; higher insertion and lower deletion are better).
* ``saliency_metric`` (Dabkowski & Gal 2017): ``log(max(a, 0.05)) - log(p)`` where ``a`` is the
  area fraction of the tight box around the kept groups and ``p`` the target's probability on
  the input cropped to that box (outside the box = baseline; no resize, since the network takes
  a fixed size). Lower is better.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from app.analyses.saliency.first_layer import masked_input, spatial_shape
from app.network import Network

MIN_AREA = 0.05
TIE_RTOL = 1e-9
LOWER_IS_BETTER = {"saliency_metric": True, "insertion_auc": False, "deletion_auc": True}


@dataclass
class Grade:
    kept: int
    sparsity: float
    survives: bool
    survive_size: int | None
    insertion_auc: float
    deletion_auc: float
    saliency_metric: float
    insertion_curve: list[float]
    deletion_curve: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def grade(net: Network, x: Tensor, baseline: Tensor, groups: Tensor, order: Tensor,
          kept: int, target: int) -> Grade:
    """Grade the ranking ``order`` (group ids, most important first, all groups) at ``kept``."""
    num = order.numel()
    ranks = torch.empty(num, dtype=torch.long, device=order.device)
    ranks[order] = torch.arange(num, device=order.device)
    steps = torch.arange(num + 1, device=order.device)
    top = ranks[None, :] < steps[:, None]  # row i keeps the top-i groups
    with torch.no_grad():
        keep_probs = _probs(net, masked_input(x, baseline, groups, top), target)
        keep_pred = net(masked_input(x, baseline, groups, top)).argmax(1)
        drop_probs = _probs(net, masked_input(x, baseline, groups, ~top[: kept + 1]), target)
    survivors = torch.nonzero(keep_pred == target).reshape(-1)
    insertion = keep_probs[: kept + 1].tolist()
    deletion = drop_probs.tolist()
    return Grade(
        kept=kept,
        sparsity=1.0 - kept / num,
        survives=bool(keep_pred[kept] == target),
        survive_size=int(survivors[0]) if survivors.numel() else None,
        insertion_auc=_auc(insertion),
        deletion_auc=_auc(deletion),
        saliency_metric=saliency_metric(net, x, baseline, groups, top[kept], target),
        insertion_curve=insertion,
        deletion_curve=deletion,
    )


def ranking(scores: np.ndarray, inert: np.ndarray,
            device: torch.device | str | None = None) -> Tensor:
    """Group ids, highest score first; groups equal to the baseline (``inert``) last, ties by
    group id (a stable order, so equal scores never reorder between runs)."""
    return torch.from_numpy(np.lexsort((np.arange(len(scores)), -scores, inert))).to(device)


def winners(grades: dict[str, Grade]) -> dict[str, list[str]]:
    """Per measure, every method whose value is the best one (within ``TIE_RTOL``): one name
    is a win, several are a tie."""
    out = {}
    for key, lower in LOWER_IS_BETTER.items():
        values = {name: getattr(g, key) for name, g in grades.items()}
        if not values:
            continue
        best = min(values.values()) if lower else max(values.values())
        out[key] = [name for name, v in values.items()
                    if abs(v - best) <= TIE_RTOL * max(1.0, abs(best))]
    return out


def saliency_metric(net: Network, x: Tensor, baseline: Tensor, groups: Tensor,
                    group_mask: Tensor, target: int) -> float:
    """Dabkowski & Gal's saliency metric of the tight box around the kept groups."""
    c, h, w = spatial_shape(tuple(x.shape))
    kept = group_mask[groups].reshape(c, h, w).any(0)
    if not kept.any():
        box = torch.zeros(h, w, dtype=torch.bool, device=x.device)
        area = 0.0
    else:
        rows = torch.nonzero(kept.any(1)).reshape(-1)
        cols = torch.nonzero(kept.any(0)).reshape(-1)
        box = torch.zeros(h, w, dtype=torch.bool, device=x.device)
        box[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1] = True
        area = float(box.sum()) / (h * w)
    crop = torch.where(box.expand(c, h, w).reshape(x.shape), x, baseline)
    with torch.no_grad():
        p = float(_probs(net, crop[None], target)[0])
    return math.log(max(area, MIN_AREA)) - math.log(max(p, 1e-12))


def _probs(net: Network, batch: Tensor, target: int) -> Tensor:
    return torch.softmax(net(batch), dim=1)[:, target]


def _auc(curve: list[float]) -> float:
    if len(curve) == 1:
        return float(curve[0])
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))
