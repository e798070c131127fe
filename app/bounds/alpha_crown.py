"""alpha-CROWN: CROWN with optimised lower slopes of unstable ReLUs (Xu et al., ICLR 2021).

CROWN's lower line ``y >= s x`` of an unstable ReLU is sound for every slope ``s`` in
``[0, 1]``, so each slope may be chosen to make the bound asked for as tight as possible:
one slope per (bounded row, ReLU neuron), optimised by projected Adam steps on the bound
itself. The bounds of the intermediate nodes that feed ReLUs get their own slopes and are
re-tightened in every step (intersected with the best found so far, which stays sound since
every step's bounds are). Each step's result is a valid lower bound, so the best over the
steps is returned; the search stops early once every row is positive (proven), after ``patience`` steps
without progress, or at ``time_limit`` seconds.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from app.bounds.base import has_values
from app.bounds.crown import Bounds, CrownAnalysis, needs_input_bounds
from app.layers import ReLU
from app.network import INPUT, Network

# Slopes of intermediate rows are kept while their total size stays under this many entries
# (each step back-substitutes every such row; on conv nets mostly only the final
# specification's slopes are optimised).
SLOPE_BUDGET = 2_000_000


class AlphaCrownAnalysis(CrownAnalysis):
    """CROWN whose ``lower`` optimises the ReLU slopes for the asked specification.

    ``lower(node, spec, bias)`` is never looser than CROWN's; ``bounds(node)`` are CROWN's,
    intersected with the intermediate bounds the last ``lower`` optimised.
    """

    def __init__(self, net: Network, lo: Tensor, hi: Tensor, iterations: int = 100,
                 lr: float = 0.1, patience: int = 10, time_limit: float = 30.0) -> None:
        super().__init__(net, lo, hi)
        self.iterations, self.lr, self.patience = iterations, lr, patience
        self.time_limit = time_limit
        self.tightened: dict[int, Bounds] = {}

    def bounds(self, node: int) -> Bounds:
        lo, hi = super().bounds(node)
        if node in self.tightened:
            t_lo, t_hi = self.tightened[node]
            return torch.maximum(lo, t_lo), torch.minimum(hi, t_hi)
        return lo, hi

    def lower(self, node: int, spec: Tensor, bias: Tensor | None = None) -> Tensor:
        base = super().lower(node, spec, bias)
        if self.iterations <= 0 or (has_values(base) and bool((base > 0).all())):
            return base
        with torch.enable_grad():
            return torch.maximum(base, self._optimise(node, spec, bias, base))

    def _optimise(self, node: int, spec: Tensor, bias: Tensor | None, base: Tensor) -> Tensor:
        net = self.net
        relus = [k for k in range(node + 1) if isinstance(net.layers[k], ReLU)]
        if not relus:
            return base
        spec = spec.detach()
        bias = spec.new_zeros(spec.shape[:2]) if bias is None else bias.detach()
        final = self._slopes(relus, spec.shape[1])
        budget = SLOPE_BUDGET - sum(t.numel() for t in final.values())
        rows: dict[int, Tensor] = {}
        inner: dict[int, dict[int, Tensor]] = {}
        for j in sorted({net.inputs[k][0] for k in relus} - {INPUT}):
            if needs_input_bounds(net.layers[j]):
                continue
            lo, hi = (t.reshape(t.shape[0], -1) for t in self._relax[j])
            unstable = (((lo < 0) & (hi > 0)).any(0).nonzero().squeeze(1) if has_values(lo)
                        else torch.arange(lo.shape[1], device=lo.device))  # meta: all
            slopes = self._slopes([k for k in relus if k < j], 2 * unstable.numel())
            size = sum(t.numel() for t in slopes.values())
            if unstable.numel() and slopes and size <= budget:
                rows[j], inner[j], budget = unstable, slopes, budget - size
        params = [*final.values(), *(t for s in inner.values() for t in s.values())]
        opt = torch.optim.Adam(params, lr=self.lr)
        best_inner = {j: tuple(t.detach() for t in self._relax[j]) for j in rows}
        best, stale = base.detach().clone(), 0
        deadline = time.monotonic() + self.time_limit
        for _ in range(self.iterations):
            relax = dict(self._relax)
            for j in rows:
                relax[j] = self._tightened(j, rows[j], relax, inner[j], best_inner[j])
                best_inner[j] = tuple(t.detach() for t in relax[j])
            bound = self._backward(node, spec, relax, final) + bias
            improved = bound.detach() > best
            best = torch.maximum(best, bound.detach())
            stale = 0 if not has_values(best) or bool(improved.any()) else stale + 1
            self.tightened = best_inner
            done = has_values(best) and bool((best > 0).all())  # meta: run every iteration
            if done or stale >= self.patience or time.monotonic() > deadline:
                break
            open_rows = torch.where(best <= 0, bound, torch.zeros_like(bound))
            grads = torch.autograd.grad(-open_rows.sum(), params, allow_unused=True)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            with torch.no_grad():
                for p in params:
                    p.clamp_(0.0, 1.0)
        return best

    def _slopes(self, relus: list[int], m: int) -> dict[int, Tensor]:
        """CROWN's adaptive slopes as a starting point: one ``[B, m, *shape]`` per ReLU."""
        out = {}
        for k in relus:
            lo, hi = self._relax[self.net.inputs[k][0]]
            start = (hi > -lo).to(lo.dtype).unsqueeze(1)
            out[k] = start.expand(lo.shape[0], m, *lo.shape[1:]).clone().requires_grad_(True)
        return out

    def _tightened(self, j: int, rows: Tensor, relax: dict[int, Bounds],
                   slopes: dict[int, Tensor], best: Bounds) -> Bounds:
        """Bounds of node ``j``'s ``rows`` with the given slopes, intersected with ``best``."""
        lo, hi = (t.reshape(t.shape[0], -1) for t in best)
        b, n, r = lo.shape[0], lo.shape[1], rows.numel()
        eye = lo.new_zeros(r, n)
        eye[torch.arange(r, device=lo.device), rows] = 1
        spec = torch.cat([eye, -eye]).reshape(1, 2 * r, *self.shape(j)).expand(b, -1, *self.shape(j))
        both = self._backward(j, spec, relax, slopes)
        new_lo = lo.index_copy(1, rows, torch.maximum(both[:, :r], lo[:, rows]))
        new_hi = hi.index_copy(1, rows, torch.minimum(-both[:, r:], hi[:, rows]))
        shape = best[0].shape
        return new_lo.reshape(shape), new_hi.reshape(shape)
