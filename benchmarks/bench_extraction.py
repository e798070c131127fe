"""Black-box weight recovery over seeded random networks (float64 oracles).

Prints, per network: neurons found, queries, queries per parameter, time, max relative weight
error over all layers after alignment, arg-max agreement and max logit difference on 10^4
inputs. 2-hidden-layer nets whose first layer is expansive (more neurons than inputs) go
through the second-layer equations; where some second-layer neuron barely crosses the box the
result is partial (undetermined weights, always-on stand-ins), and the median error shows how
well the rest was recovered. The output ends with

    RESULT max_rel_err_1hidden=<x> queries_1hidden=<n> max_rel_err_2hidden=<y>

(worst error over the 1-hidden nets, most queries any 1-hidden net needed, worst error over
the 2-hidden runs the attack reports complete; the line above it counts the partial ones).
Nets are named ``sizes@box`` for the domain ``[-box, box]^d``. ``--large`` adds bigger nets.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from app import load_network  # noqa: E402
from app.analyses.extraction import QueryOracle, extract, grade  # noqa: E402
from tests.seeded_mlp import mlp  # noqa: E402

ONE_HIDDEN = [((2, 8, 1), 5.0), ((10, 20, 3), 1.0), ((64, 32, 10), 1.0), ((64, 128, 10), 1.0)]
TWO_HIDDEN = [((64, 32, 16, 10), 1.0), ((64, 48, 24, 10), 1.0), ((20, 16, 8, 1), 1.0)]
EXPANSIVE = [((6, 12, 8, 2), 3.0), ((10, 20, 20, 1), 1.0), ((10, 20, 20, 1), 2.0)]
LARGE = [((784, 32, 1), 1.0), ((784, 128, 10), 1.0), ((100, 64, 32, 10), 1.0)]


def run(sizes: tuple[int, ...], box: float, seed: int, budget: int) -> dict:
    net = load_network(mlp(sizes, seed), input_shape=(sizes[0],))
    result = extract(QueryOracle(net), sizes[0], budget, lo=-box, hi=box, seed=seed)
    report = grade(net, result, -box, box)
    params = sum(p.numel() for p in net.parameters())
    row = {
        "net": "-".join(map(str, sizes)) + f"@{box:g}", "found": "/".join(
            f"{g.found_neurons}/{g.true_neurons}" for g in report.layers[:-1]),
        "queries": result.queries, "q/param": result.queries / params,
        "seconds": result.seconds, "max_rel_err": max(g.max_rel_err for g in report.layers),
        "median_rel_err": report.layers[1].median_rel_err if len(sizes) > 3 else float("nan"),
        "first_up_to_sign": report.layers[0].max_rel_err_up_to_sign,
        "agree": report.argmax_agreement, "max_logit_diff": report.max_abs_logit_diff,
        "complete": result.complete,
    }
    print(f"{row['net']:>14} {row['found']:>12} {row['queries']:>8} {row['q/param']:>8.1f} "
          f"{row['seconds']:>7.2f} {row['max_rel_err']:>11.2e} {row['first_up_to_sign']:>11.2e} "
          f"{row['agree']:>7.4f} {row['max_logit_diff']:>10.2e} {row['complete']!s:>8} "
          f"{row['median_rel_err']:>10.2e}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budget", type=int, default=1_000_000)
    parser.add_argument("--large", action="store_true")
    args = parser.parse_args()
    print(f"{'net':>14} {'found/true':>12} {'queries':>8} {'q/param':>8} {'seconds':>7} "
          f"{'max_rel_err':>11} {'L1 up2sign':>11} {'agree':>7} {'logit_diff':>10} "
          f"{'complete':>8} {'L2 median':>10}")
    one = ONE_HIDDEN + ([LARGE[0], LARGE[1]] if args.large else [])
    two = TWO_HIDDEN + ([LARGE[2]] if args.large else [])
    rows1 = [run(s, b, seed, args.budget) for s, b in one for seed in range(args.seeds)]
    rows2 = [run(s, b, seed, args.budget) for s, b in two for seed in range(args.seeds)]
    print("expansive first layer (more neurons than inputs):")
    rows2 += [run(s, b, seed, args.budget) for s, b in EXPANSIVE for seed in range(args.seeds)]
    err1 = max(r["max_rel_err"] for r in rows1)
    queries1 = max(r["queries"] for r in rows1)
    done = [r for r in rows2 if r["complete"]]
    err2 = max(r["max_rel_err"] for r in done) if done else float("inf")
    partial = [r for r in rows2 if not r["complete"]]
    print(f"2 hidden: {len(done)} of {len(rows2)} runs complete; partial runs (median error of layer 2): "
          + (", ".join(f"{r['net']} ({r['median_rel_err']:.1e})" for r in partial) or "none"))
    print(f"median queries per parameter, 1 hidden: "
          f"{np.median([r['q/param'] for r in rows1]):.1f}; 2 hidden: "
          f"{np.median([r['q/param'] for r in rows2]):.1f}")
    print(f"RESULT max_rel_err_1hidden={err1:.3g} queries_1hidden={queries1} "
          f"max_rel_err_2hidden={err2:.3g}")


if __name__ == "__main__":
    main()
