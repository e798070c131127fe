"""SMT saliency masks and verified explanations: solve time, optimality, grades, soundness.

For every sample digit model (``--inputs`` gallery images each) and the shared MNIST networks
mnist-net_256x2 and mnist_0.1 (``--mnist`` ERAN images): one ``smt_mask`` per input with the
default solver (HiGHS), printing per model the median / 90th-percentile solve time, the optimal
rate, time-outs, the mask's sparsity and, for SMT vs IG vs SmoothGrad at the same number of
kept features and the same baseline, the Dabkowski & Gal saliency metric (wins / ties /
losses of SMT against IG), the survival rate, insertion / deletion AUC and the fewest
top-ranked features that keep the prediction. Then HiGHS against the two z3 strategies on
the first ``--compare`` inputs of each model, same time-out. Then VeriX explanations
(``--verix`` ERAN images on mnist-net_256x2 at ``--verix-eps``, a budget of
``--verix-timeout`` s each): time, size, how many kept features are witnessed, unproven and
left without a complete check, and whether an independent PGD on the complement of the explanation
(64 restarts) ever flips the class; then the share of kept features witnessed by a
counterexample over all images. ``--verix-only`` runs only that part (the mask numbers of
the RESULT line are then ``nan``). Before the first image, torch's lazy import behind
``torch.optim`` (seconds, once per process) is done outside the timed budget.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_saliency.py [--inputs 50 --mnist 20]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_saliency.py --verix-only --verix 5

Ends with ``RESULT median_solve_s=<s> optimal_rate=<r> mnist_timeouts=<n>
verified_median_s=<s> verified_median_size=<features> verified_unsound=<n>
smt_beats_ig_saliency_rate=<r>`` (masks over every input of every model; "beats" = the SMT
mask alone has the best saliency metric, a tie is not a win).
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from app import load_network
from app.analyses.saliency import OPTIMAL, TIMEOUT, smt_mask
from app.analyses.saliency.verix import WITNESSED, verified_explanation

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = ("smt", "ig", "smoothgrad")


def _models(n_digits: int, n_mnist: int) -> list[tuple[str, Path, np.ndarray]]:
    gallery = np.load(ROOT / "sample_models" / "gallery" / "digits.npz")["x"][:n_digits]
    models = [(p.stem, p, gallery.astype(np.float64))
              for p in sorted((ROOT / "sample_models").glob("digits_*.onnx"))]
    for mnist in MNIST:
        if mnist.exists() and n_mnist:
            net = load_network(mnist)
            models.append((mnist.stem, mnist, _eran(n_mnist).reshape(-1, *net.input_shape)))
    return models


MNIST = (SHARED / "vnncomp2021" / "mnistfc" / "mnist-net_256x2.onnx",
         SHARED / "profit_nets" / "mnist_0.1.onnx")


def _eran(n: int) -> np.ndarray:
    rows = np.loadtxt(SHARED / "eran" / "mnist_test.csv", delimiter=",", max_rows=n, ndmin=2)
    return rows[:, 1:] / 255.0


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
    print(f"solve time median {np.median(solve):.3f} s, p90 {np.percentile(solve, 90):.3f} s, "
          f"max {solve.max():.3f} s; optimal {np.mean([r.status == OPTIMAL for r in results]):.2f}"
          f"; time-outs {sum(r.status == TIMEOUT for r in results)}; "
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
    pair = [_versus(r.grades["smt"].saliency_metric, r.grades["ig"].saliency_metric)
            if r.grades else "ungraded" for r in results]
    beats = [p == "win" for p in pair]
    print(f"SMT vs IG on saliency metric: wins {pair.count('win')}, ties {pair.count('tie')}, "
          f"losses {pair.count('loss')}")
    if args.compare:
        times = {}
        for solver in ("highs", "bisection", "optimize"):
            runs = [smt_mask(net, x, top_k=args.top_k, threshold=args.threshold,
                             timeout_s=args.compare_timeout, solver=solver)
                    for x in xs[: args.compare]]
            times[solver] = (np.median([r.timings["solve_s"] for r in runs]),
                             np.mean([r.status == OPTIMAL for r in runs]))
        print(f"solvers on {args.compare} inputs (time-out {args.compare_timeout} s): "
              + ", ".join(f"{s} median {t:.3f} s optimal {o:.2f}" for s, (t, o) in times.items())
              + f"; z3 bisection / HiGHS time ratio "
                f"{times['bisection'][0] / max(times['highs'][0], 1e-9):.2f}")
    mnist = path in MNIST
    return [(r.timings["solve_s"], r.status == OPTIMAL, b, mnist and r.status == TIMEOUT)
            for r, b in zip(results, beats, strict=True)]


def _versus(smt: float, ig: float) -> str:
    if abs(smt - ig) <= 1e-9 * max(1.0, abs(ig)):
        return "tie"
    return "win" if smt < ig else "loss"


def _pgd_flips(net, x: torch.Tensor, res, restarts: int = 64, steps: int = 100) -> bool:
    """Independent PGD (cross-entropy, random starts) over the features off the explanation."""
    free = torch.from_numpy(~res.explanation)
    lo_r, hi_r = res.input_range
    lo = torch.where(free, (x - res.eps).clamp(lo_r, hi_r), x)
    hi = torch.where(free, (x + res.eps).clamp(lo_r, hi_r), x)
    gen = torch.Generator().manual_seed(0)
    z = lo + (hi - lo) * torch.rand((restarts, *x.shape), generator=gen, dtype=x.dtype)
    label = torch.full((restarts,), res.target)
    for _ in range(steps):
        z.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(net(z), label), z)
        z = torch.minimum(torch.maximum(z.detach() + res.eps / 8 * grad.sign(), lo), hi)
    with torch.no_grad():
        return bool((net(z).argmax(1) != res.target).any())


def bench_verix(args: argparse.Namespace) -> list[tuple[float, int, bool, int]]:
    path = MNIST[0]
    if not path.exists() or not args.verix:
        return []
    net = load_network(path).with_dtype(torch.float64)
    importlib.import_module("torch._dynamo")  # torch.optim.Adam's lazy import (once, seconds)
    rows = []
    print(f"\n== VeriX on {path.stem}, eps {args.verix_eps}, time-out {args.verix_timeout} s")
    for x in _eran(args.verix):
        x = torch.from_numpy(x).reshape(net.input_shape)
        cpu = time.process_time()
        res = verified_explanation(net, x, args.verix_eps, timeout_s=args.verix_timeout,
                                   check_timeout_s=args.verix_check_timeout)
        cpu = time.process_time() - cpu
        unsound = _pgd_flips(net, x, res)
        witnessed = sum(v == WITNESSED for v in res.kept.values())
        print(f"size {res.size:4d}  witnessed {witnessed:4d}  unproven {res.size - witnessed:4d} "
              f"(no complete check {res.checks['unchecked']:4d})  {res.timings['total_s']:7.2f} s "
              f"(CPU {cpu:5.2f} s)  "
              f"checks {res.checks}  PGD flips: {unsound}")
        rows.append((res.timings["total_s"], res.size, unsound, witnessed))
    if rows:
        kept, seen = sum(r[1] for r in rows), sum(r[3] for r in rows)
        print(f"kept features witnessed by a counterexample: {seen} of {kept} "
              f"({seen / max(kept, 1):.3f}); per image median "
              f"{np.median([r[3] / max(r[1], 1) for r in rows]):.3f}")
    return rows


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
    parser.add_argument("--verix", type=int, default=5, help="ERAN inputs for VeriX")
    parser.add_argument("--verix-eps", type=float, default=0.05)
    parser.add_argument("--verix-timeout", type=float, default=9.0,
                        help="VeriX budget per image (untried features are kept unproven)")
    parser.add_argument("--verix-check-timeout", type=float, default=2.0)
    parser.add_argument("--verix-only", action="store_true",
                        help="only the VeriX part (mask numbers nan)")
    args = parser.parse_args()
    rows = []
    if not args.verix_only:
        for name, path, xs in _models(args.inputs, args.mnist):
            rows += bench_model(name, path, xs, args)
    solve, optimal, beats, timeouts = ((np.array(c, dtype=float) for c in zip(*rows, strict=True))
                                       if rows else (np.full(1, np.nan),) * 4)
    verix = bench_verix(args)
    v_time, v_size, v_bad, _ = ((np.array(c, dtype=float) for c in zip(*verix, strict=True))
                                if verix else (np.full(1, np.nan),) * 4)
    n_timeouts = int(timeouts.sum()) if rows else "nan"
    print(f"\nRESULT median_solve_s={np.median(solve):.3f} optimal_rate={optimal.mean():.3f} "
          f"mnist_timeouts={n_timeouts} verified_median_s={np.median(v_time):.2f} "
          f"verified_median_size={np.median(v_size):.0f} verified_unsound={int(np.nansum(v_bad))} "
          f"smt_beats_ig_saliency_rate={beats.mean():.3f}")


if __name__ == "__main__":
    main()
