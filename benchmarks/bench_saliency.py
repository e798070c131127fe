"""SMT saliency masks: solve time, optimality and grades against IG and SmoothGrad.

For every sample digit model (``--inputs`` gallery images each) and the shared MNIST network
mnist-net_256x2 (``--mnist`` ERAN images): one ``smt_mask`` per input with the default solver
(z3 bisection), printing per model the median / 90th-percentile solve time, the optimal rate,
the mask's sparsity and, for SMT vs IG vs SmoothGrad at the same number of kept features, the
Dabkowski & Gal saliency metric, the survival rate, insertion / deletion AUC and the fewest
top-ranked features that keep the prediction. Then the two z3 strategies (bisection vs
Optimize) on the first ``--compare`` inputs of each model, same time-out.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_saliency.py [--inputs 50 --mnist 20]

Ends with ``RESULT median_solve_s=<x> optimal_rate=<y> smt_beats_ig_saliency_rate=<z>``
(over every input of every model; "beats" = strictly lower saliency metric).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from app import load_network
from app.analyses.saliency import OPTIMAL, smt_mask

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = ("smt", "ig", "smoothgrad")


def _models(n_digits: int, n_mnist: int) -> list[tuple[str, Path, np.ndarray]]:
    gallery = np.load(ROOT / "sample_models" / "gallery" / "digits.npz")["x"][:n_digits]
    models = [(p.stem, p, gallery.astype(np.float64))
              for p in sorted((ROOT / "sample_models").glob("digits_*.onnx"))]
    mnist = SHARED / "vnncomp2021" / "mnistfc" / "mnist-net_256x2.onnx"
    if mnist.exists() and n_mnist:
        rows = np.loadtxt(SHARED / "eran" / "mnist_test.csv", delimiter=",", max_rows=n_mnist,
                          ndmin=2)
        models.append((mnist.stem, mnist, (rows[:, 1:] / 255.0).reshape(-1, 784, 1)))
    return models


def _row(label: str, values: list[float]) -> str:
    return f"{label:<28}" + " ".join(f"{v:>10.3f}" for v in values)


def bench_model(name: str, path: Path, xs: np.ndarray, args: argparse.Namespace) -> list:
    net = load_network(path)
    results = [smt_mask(net, x, top_k=args.top_k, threshold=args.threshold,
                        timeout_s=args.timeout) for x in xs]
    solve = np.array([r.timings["solve_s"] for r in results])
    graded = [r for r in results if r.grades]
    print(f"\n== {name}: {len(results)} inputs, {results[0].num_groups} features, "
          f"top_k={args.top_k}, threshold={args.threshold}")
    print(f"solve time median {np.median(solve):.3f} s, p90 {np.percentile(solve, 90):.3f} s; "
          f"optimal {np.mean([r.status == OPTIMAL for r in results]):.2f}; "
          f"mask size median {np.median([r.mask_size for r in results]):.0f}; "
          f"sparsity mean {np.mean([1 - r.mask_size / r.num_groups for r in results]):.3f}")
    print(f"{'(median unless noted)':<28}" + " ".join(f"{m:>10}" for m in METHODS))
    for label, key in (("saliency metric (lower)", "saliency_metric"),
                       ("insertion AUC (higher)", "insertion_auc"),
                       ("deletion AUC (lower)", "deletion_auc")):
        print(_row(label, [np.median([getattr(r.grades[m], key) for r in graded])
                           for m in METHODS]))
    print(_row("prediction survives (mean)",
               [np.mean([r.grades[m].survives for r in graded]) for m in METHODS]))
    print(_row("features to survive", [np.median([
        r.grades[m].survive_size if r.grades[m].survive_size is not None else r.num_groups
        for r in graded]) for m in METHODS]))
    beats = [r.grades["smt"].saliency_metric < r.grades["ig"].saliency_metric for r in graded]
    print(f"SMT beats IG on saliency metric: {np.mean(beats):.2f}")
    if args.compare:
        times = {}
        for solver in ("bisection", "optimize"):
            runs = [smt_mask(net, x, top_k=args.top_k, threshold=args.threshold,
                             timeout_s=args.compare_timeout, solver=solver)
                    for x in xs[: args.compare]]
            times[solver] = (np.median([r.timings["solve_s"] for r in runs]),
                             np.mean([r.status == OPTIMAL for r in runs]))
        print(f"z3 strategies on {args.compare} inputs (time-out {args.compare_timeout} s): "
              + ", ".join(f"{s} median {t:.3f} s optimal {o:.2f}" for s, (t, o) in times.items())
              + f"; bisection/optimize time ratio "
                f"{times['bisection'][0] / max(times['optimize'][0], 1e-9):.3f}")
    return [(r.timings["solve_s"], r.status == OPTIMAL, beats[i] if i < len(beats) else False)
            for i, r in enumerate(results)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=50, help="gallery inputs per digit model")
    parser.add_argument("--mnist", type=int, default=20, help="ERAN inputs for mnist-net_256x2")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--compare", type=int, default=3,
                        help="inputs per model on which bisection and Optimize are compared")
    parser.add_argument("--compare-timeout", type=float, default=5.0)
    args = parser.parse_args()
    rows = []
    for name, path, xs in _models(args.inputs, args.mnist):
        rows += bench_model(name, path, xs, args)
    solve, optimal, beats = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
    print(f"\nRESULT median_solve_s={np.median(solve):.3f} optimal_rate={optimal.mean():.3f} "
          f"smt_beats_ig_saliency_rate={beats.mean():.3f}")


if __name__ == "__main__":
    main()
