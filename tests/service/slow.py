"""A test-only analysis that takes as long as asked: for cancel and restart tests.

Loaded by the server under test through ``ATLAS_EXTRA_ANALYSES=tests.service.slow``.
"""

from __future__ import annotations

import time

import numpy as np
from pydantic import BaseModel, Field

from backend.analyses.base import Analysis, JobContext, register


class Params(BaseModel):
    steps: int = Field(10, ge=1, le=10_000)
    step_s: float = Field(0.1, ge=0, le=5)
    fail: bool = False
    tag: str = ""
    allocate_mb: int = Field(0, ge=0, le=100_000, description="memory to fill (limit tests)")


def run(ctx: JobContext, params: Params) -> dict:
    ballast = np.ones(params.allocate_mb * 2**20, dtype=np.uint8)  # noqa: F841 - held
    for i in range(params.steps):
        ctx.progress(i / params.steps, f"step {i + 1} of {params.steps}")
        time.sleep(params.step_s)
    if params.fail:
        raise RuntimeError("the slow analysis was asked to fail")
    (ctx.artifacts / "steps.txt").write_text(str(params.steps))
    return {"steps": params.steps, "input_shape": list(ctx.x.shape)}


register(Analysis(name="test_slow", title="Slow (tests only)",
                  description="Sleeps step by step, reporting progress.", params=Params, run=run))
