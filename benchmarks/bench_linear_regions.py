"""ExactLine cost against one forward pass, and exact IG against Captum's IG.

For every sample model and shared conv network: exact lines for a batch of segments (pairs of
gallery/ERAN images), timed against one batched float64 forward pass over all the resulting
piece endpoints; then exact IG for a few inputs against Captum IG (riemann_trapezoid and
gausslegendre), at the first step count whose relative L1 error is <= 1%.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_linear_regions.py [--segments 16]

Ends with ``RESULT worst_ratio_to_forward=<x> ig_speedup_at_1pct=<y>`` (worst over models).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from app import load_network
from app.analyses.linear_regions import (
    captum_integrated_gradients,
    exact_integrated_gradients,
    exact_lines,
    relative_error,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
STEPS = (20, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10000)
GAUSS_MAX_STEPS = 1000  # Captum's Gauss-Legendre nodes cost O(n^3) to compute beyond this


def _inputs(path: Path, n: int) -> np.ndarray:
    """``n`` real inputs for the model at ``path``, in its input layout."""
    if path.parent.name == "profit_nets":
        name = "cifar10" if "cifar" in path.stem or "convSmall" in path.stem else "mnist"
        rows = np.loadtxt(SHARED / "eran" / f"{name}_test.csv", delimiter=",", max_rows=n,
                          ndmin=2)[:, 1:] / 255.0
        if name == "cifar10":
            return rows.reshape(n, 32, 32, 3).transpose(0, 3, 1, 2)
        return rows.reshape(n, 1, 28, 28)
    return np.load(ROOT / "sample_models" / "gallery" / "digits.npz")["x"][:n].astype(np.float64)


def _best_time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_lines(net, xs: np.ndarray, segments: int, shrink: float) -> tuple[int, float, float]:
    """Pieces, our time and the forward time; segments run a fraction ``shrink`` of the way
    from image ``2k`` to image ``2k + 1`` (CIFAR lines between images have ~1e4 pieces)."""
    net64 = net.with_dtype(torch.float64)
    starts = torch.from_numpy(xs[0:2 * segments:2])
    ends = starts + shrink * (torch.from_numpy(xs[1:2 * segments:2]) - starts)
    lines = exact_lines(net64, starts, ends)
    ours = _best_time(lambda: exact_lines(net64, starts, ends))
    pts = torch.from_numpy(np.concatenate([ln.points(ln.ts) for ln in lines]))
    with torch.no_grad():
        fwd = _best_time(lambda: net64(pts))
    return sum(ln.num_pieces for ln in lines), ours, fwd


def bench_ig(net, x: np.ndarray) -> tuple[float, float, str, int, float, float]:
    """Exact IG time, the fastest Captum time reaching 1% and its method/steps, the 20-step
    Gauss-Legendre error and the 20-step trapezoid error."""
    exact_s = _best_time(lambda: exact_integrated_gradients(net, x))
    exact = exact_integrated_gradients(net, x)
    best = (float("inf"), "none", 0)
    err20 = {}
    for method in ("riemann_trapezoid", "gausslegendre"):
        for n in STEPS:
            if method == "gausslegendre" and n > GAUSS_MAX_STEPS:
                break
            attr = captum_integrated_gradients(net, x, None, exact.target, n, method=method)
            err = relative_error(attr, exact.attributions)
            err20.setdefault(method, err)
            if err <= 0.01:
                t = _best_time(lambda n=n, method=method: captum_integrated_gradients(
                    net, x, None, exact.target, n, method=method))
                best = min(best, (t, method, n))
                break
    return exact_s, best[0], best[1], best[2], err20["gausslegendre"], err20["riemann_trapezoid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=16, help="segments per model")
    parser.add_argument("--ig-inputs", type=int, default=2, help="IG inputs per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = sorted((ROOT / "sample_models").glob("digits_*.onnx"))
    models += sorted((SHARED / "profit_nets").glob("*.onnx")) if SHARED.exists() else []
    print(f"{'model':28s} {'pieces':>7s} {'ours_s':>8s} {'fwd_s':>8s} {'ratio':>6s} | "
          f"{'ig_s':>7s} {'captum_s':>8s} {'at':>22s} {'speedup':>7s} {'err20_gl':>8s} "
          f"{'err20_tr':>8s}")
    ratios, speedups = [], []
    for path in models:
        net = load_network(path).with_dtype(torch.float64)
        cifar = "convSmall" in path.stem
        segs = max(2, args.segments // 4) if path.parent.name == "profit_nets" else args.segments
        xs = _inputs(path, max(2 * segs, args.ig_inputs))
        pieces, ours, fwd = bench_lines(net, xs, segs, 0.05 if cifar else 1.0)
        ratios.append(ours / fwd)
        rows = [bench_ig(net, xs[k]) for k in range(args.ig_inputs)]
        exact_s, cap_s = (float(np.mean([r[i] for r in rows])) for i in (0, 1))
        speedups.append(cap_s / exact_s)
        method, steps = rows[0][2], rows[0][3]
        print(f"{path.stem:28s} {pieces:7d} {ours:8.4f} {fwd:8.4f} {ours / fwd:6.2f} | "
              f"{exact_s:7.4f} {cap_s:8.4f} {method + '@' + str(steps):>22s} "
              f"{cap_s / exact_s:7.2f} {np.mean([r[4] for r in rows]):8.3f} "
              f"{np.mean([r[5] for r in rows]):8.3f}", flush=True)
    print(f"RESULT worst_ratio_to_forward={max(ratios):.2f} "
          f"ig_speedup_at_1pct={min(speedups):.2f}")


if __name__ == "__main__":
    main()
