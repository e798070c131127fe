"""Benchmark: the 3-model comparison over 100 gallery inputs, with 1 and with 2 Dask workers.

Each run starts a real server (``python -m backend.cli serve``) on a fresh data dir, so no
cell comes from the cache, warms its workers on inputs outside the measured set, then times
``frontend.comparison.run`` (one fan-out batch per analysis) until every cell has ended.

    .venv/bin/python benchmarks/bench_compare.py [--inputs 100] [--arch fc|conv] [--tol 0.01]

Ends with ``RESULT seconds_per_input_model=<x> parallel_efficiency=<y>``: x is the 2-worker
time per (input, model) pair, y = time with 1 worker / (time with 2 workers * 2).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from frontend import comparison  # noqa: E402
from frontend.client import ApiClient  # noqa: E402
from tests.service import Server  # noqa: E402

METHODS = ("standard", "pgd", "ibp")
WARMUP_INPUTS = [f"gallery:digits:{i}" for i in range(340, 350)]


def timed_run(workers: int, arch: str, input_ids: list[str],
              params: comparison.CompareParams) -> tuple[float, comparison.Cells]:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "data", ATLAS_DASK_WORKERS=str(workers)).start()
        try:
            api = ApiClient(server.url, timeout=120)
            by_name = {m["name"]: m["id"] for m in api.models()}
            model_ids = [by_name[f"digits_{arch}_{m}"] for m in METHODS]
            # per-input cells only: the per-model ones (proven coverage) would skew the rate
            offered = {a["name"] for a in api.analyses()} - set(comparison.MODEL_CELLS)
            comparison.run(api, comparison.plan(model_ids, WARMUP_INPUTS, params, {"predict"}))
            todo = comparison.plan(model_ids, input_ids, params, offered)
            start = time.perf_counter()
            cells = comparison.run(api, todo)
            return time.perf_counter() - start, cells
        finally:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100)
    parser.add_argument("--arch", choices=("fc", "conv"), default="fc")
    parser.add_argument("--tol", type=float, default=0.01, help="eps bisection tolerance")
    args = parser.parse_args()
    params = comparison.CompareParams(tol=args.tol)
    input_ids = [f"gallery:digits:{i}" for i in range(args.inputs)]
    pairs = len(METHODS) * args.inputs
    times = {}
    for workers in (1, 2):
        seconds, cells = timed_run(workers, args.arch, input_ids, params)
        times[workers] = seconds
        print(f"{workers} worker(s): {cells.done} cells ({len(cells.errors)} failed) for "
              f"{pairs} (input, model) pairs in {seconds:.1f} s = {seconds / pairs:.3f} s/pair",
              flush=True)
    print(f"speed-up with 2 workers: {times[1] / times[2]:.2f}x")
    print(f"RESULT seconds_per_input_model={times[2] / pairs:.4f} "
          f"parallel_efficiency={times[1] / (2 * times[2]):.3f}")


if __name__ == "__main__":
    main()
