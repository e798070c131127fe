"""The black box: query access to a network, counted.

:class:`QueryOracle` is the only place where the extraction touches the engine's network before
grading: it turns flat float64 inputs into logits and counts every row it answers. The
extraction itself wraps any such callable in a :class:`Budget`, which stops it cleanly when the
query budget runs out and reports progress (queries spent, neurons found).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from app.network import Network
from app.progress import ProgressFn, report

Oracle = Callable[[np.ndarray], np.ndarray]


class QueryOracle:
    """Flat inputs ``[B, d]`` in, logits ``[B, k]`` out; ``queries`` counts rows, ``batches`` calls.

    The network is evaluated in ``dtype`` (float64 by default) so the oracle is as exact as the
    cryptanalytic attack assumes; the weights stay private to this object.
    """

    def __init__(self, net: Network, dtype: torch.dtype = torch.float64) -> None:
        self._net = net.with_dtype(dtype).eval()
        self._dtype = dtype
        self.input_shape = tuple(net.input_shape)
        self.input_dim = math.prod(self.input_shape)
        self.num_outputs = net.num_outputs
        self.queries = 0
        self.batches = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        flat = np.asarray(x, dtype=np.float64).reshape(-1, self.input_dim)
        self.queries += len(flat)
        self.batches += 1
        batch = torch.from_numpy(flat).to(self._dtype).reshape(len(flat), *self.input_shape)
        with torch.no_grad():
            out = self._net(batch)
        return out.reshape(len(flat), -1).to(torch.float64).numpy()


class BudgetExhausted(Exception):
    """Raised inside the extraction when the next batch would exceed the query budget."""


class Budget:
    """Counts the extraction's own queries, enforces the budget and drives the progress callback.

    The progress callback may raise :class:`app.Cancelled`; it is called after every batch.
    """

    def __init__(self, oracle: Oracle, budget: int, progress: ProgressFn | None,
                 deadline: float | None = None, end: float | None = None) -> None:
        self._oracle = oracle
        self.budget = int(budget)
        self.deadline = deadline  # time.perf_counter() value after which no query is made
        self.end = end  # the hard limit, for the output layer and the check after the search
        self._search_deadline = deadline
        self.used = 0
        self.neurons = 0
        self.phase = "search"
        self._progress = progress

    def finishing(self) -> None:
        """The search is over: the output layer and the final check may use the time left."""
        self.deadline = self.end

    def searching(self) -> None:
        """A search again (a second attempt): back to the search's deadline."""
        self.deadline = self._search_deadline

    def late(self) -> bool:
        """Past the current deadline (the next query would be refused)."""
        return self.deadline is not None and time.perf_counter() > self.deadline

    @property
    def left(self) -> int:
        return self.budget - self.used

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        if self.used + len(x) > self.budget:
            raise BudgetExhausted(f"query budget of {self.budget} exhausted in {self.phase}")
        if self.late():
            raise BudgetExhausted(f"time limit reached in {self.phase}")
        self.used += len(x)
        out = np.asarray(self._oracle(x), dtype=np.float64).reshape(len(x), -1)
        report(
            self._progress, self.used / max(self.budget, 1),
            f"{self.phase}: {self.used} queries, {self.neurons} neurons found",
        )
        return out
