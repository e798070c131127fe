"""Black-box weight recovery over seeded random networks (float64 oracles).

Prints, per network: neurons found, queries, queries per parameter, time, max relative weight
error over all layers after alignment, arg-max agreement and max logit difference on 10^4
inputs. 2-hidden-layer nets whose first layer is expansive (more neurons than inputs) go
through the second-layer equations; where some second-layer neuron barely crosses the box the
result is partial (undetermined weights, always-on stand-ins), and the median error shows how
well the rest was recovered. The output ends with

    RESULT max_rel_err_1hidden=<x> queries_1hidden=<n> max_rel_err_2hidden=<y> false_complete=<k>

(worst error over the 1-hidden nets, most queries any 1-hidden net needed, worst error over
the 2-hidden runs the attack reports complete; the line above it counts the partial ones;
``false_complete`` counts runs reported complete whose outputs differ from the truth by more
than 1e-6, relative to the largest output, on 10^5 uniform points). Besides the torch-seeded
nets: single-output He-normal nets (100-20-1, 784-32-1 at the default budget of 200k and,
with ``--large``, 784-128-1 within 2^21.5 queries) and 3-8-6-1 / 5-10-8-1 nets whose
second-layer neuron 0 is active on about 0.02% of the box (found where the others misfit the
box's vertices and followed from cell to cell: complete where every weight is determined,
never falsely complete), and He-normal 10-10-10-1 / 8-16-16-16-1 nets with bias sigma 0.1 and 1
under a 60 s time limit (partial with a reason where they are not recovered). Nets are named
``sizes@box`` for the domain ``[-box, box]^d``. ``--large`` adds bigger nets; ``--only`` runs
a subset of the groups (the RESULT line then covers only those: inf / 0 for a group left out).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from app import load_network  # noqa: E402
from app.analyses.extraction import QueryOracle, extract, grade  # noqa: E402
from tests.seeded_mlp import mlp  # noqa: E402

GROUPS = ("one", "single", "two", "expansive", "rare", "hard")
ONE_HIDDEN = [((2, 8, 1), 5.0), ((10, 20, 3), 1.0), ((64, 32, 10), 1.0), ((64, 128, 10), 1.0)]
TWO_HIDDEN = [((64, 32, 16, 10), 1.0), ((64, 48, 24, 10), 1.0), ((20, 16, 8, 1), 1.0)]
EXPANSIVE = [((6, 12, 8, 2), 3.0), ((10, 20, 20, 1), 1.0), ((10, 20, 20, 1), 2.0)]
LARGE = [((784, 32, 1), 1.0), ((784, 128, 10), 1.0), ((100, 64, 32, 10), 1.0)]
SINGLE_OUTPUT = [((100, 20, 1), 200_000), ((784, 32, 1), 200_000)]
SINGLE_OUTPUT_LARGE = [((784, 128, 1), int(2**21.5))]
RARE = [(3, 8, 6, 1), (5, 10, 8, 1)]
HARD = [((10, 10, 10, 1), 0.1), ((10, 10, 10, 1), 1.0), ((8, 16, 16, 16, 1), 1.0)]
HARD_TIME_LIMIT = 60.0


def he_normal(sizes: tuple[int, ...], seed: int, bias_sigma: float = 0.1) -> nn.Sequential:
    """He-normal weights, normal biases: another family than torch's default init."""
    rng = np.random.default_rng(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(rng.normal(0, np.sqrt(2 / a), (b, a))))
            lin.bias.copy_(torch.from_numpy(rng.normal(0, bias_sigma, b)))
        mods += [lin, nn.ReLU()] if i < len(sizes) - 2 else [lin]
    return nn.Sequential(*mods).eval()


def rare_neuron(sizes: tuple[int, ...], seed: int, active: float = 2e-4) -> nn.Sequential:
    """``he_normal`` with second-layer neuron 0 active on about ``active`` of [-1, 1]^d."""
    module = he_normal(sizes, seed)
    first, second = module[0], module[2]
    x = torch.from_numpy(np.random.default_rng(100 + seed).uniform(-1, 1, (400_000, sizes[0])))
    with torch.no_grad():
        u = second(torch.relu(first(x)))[:, 0]
        second.bias[0] -= torch.quantile(u, 1 - active)
    return module


def output_error(net, result, box: float, n: int = 100_000) -> float:
    """Largest output difference on ``n`` uniform points, relative to the largest output."""
    if result.network is None:
        return float("inf")
    x = torch.from_numpy(np.random.default_rng(12345).uniform(-box, box, (n, net.input_shape[0])))
    with torch.no_grad():
        ref = net.with_dtype(torch.float64)(x)
        ours = result.network.with_dtype(torch.float64)(x)
    return float((ours - ref).abs().max() / ref.abs().max())


def run(sizes: tuple[int, ...], box: float, seed: int, budget: int,
        module: nn.Sequential | None = None, name: str = "",
        time_limit_s: float | None = None) -> dict:
    net = load_network(module if module is not None else mlp(sizes, seed),
                       input_shape=(sizes[0],))
    result = extract(QueryOracle(net), sizes[0], budget, lo=-box, hi=box, seed=seed,
                     time_limit_s=time_limit_s)
    report = grade(net, result, -box, box)
    params = sum(p.numel() for p in net.parameters())
    err_out = output_error(net, result, box)
    row = {
        "net": name + "-".join(map(str, sizes)) + f"@{box:g}", "found": "/".join(
            f"{g.found_neurons}/{g.true_neurons}" for g in report.layers[:-1]),
        "queries": result.queries, "q/param": result.queries / params,
        "seconds": result.seconds, "max_rel_err": max(g.max_rel_err for g in report.layers),
        "median_rel_err": report.layers[1].median_rel_err if len(sizes) > 3 else float("nan"),
        "first_up_to_sign": report.layers[0].max_rel_err_up_to_sign,
        "agree": report.argmax_agreement, "max_logit_diff": report.max_abs_logit_diff,
        "complete": result.complete, "output_err": err_out,
        "false_complete": result.complete and err_out > 1e-6,
    }
    print(f"{row['net']:>14} {row['found']:>12} {row['queries']:>8} {row['q/param']:>8.1f} "
          f"{row['seconds']:>7.2f} {row['max_rel_err']:>11.2e} {row['first_up_to_sign']:>11.2e} "
          f"{row['agree']:>7.4f} {row['max_logit_diff']:>10.2e} {row['complete']!s:>8} "
          f"{row['median_rel_err']:>10.2e} {row['output_err']:>10.2e}"
          + ("  FALSE COMPLETE" if row["false_complete"] else ""), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budget", type=int, default=1_000_000)
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated groups to run (a subset: "
                        "the RESULT line then covers only them): " + ",".join(GROUPS))
    args = parser.parse_args()
    groups = set(args.only.split(",")) if args.only else set(GROUPS)
    print(f"{'net':>14} {'found/true':>12} {'queries':>8} {'q/param':>8} {'seconds':>7} "
          f"{'max_rel_err':>11} {'L1 up2sign':>11} {'agree':>7} {'logit_diff':>10} "
          f"{'complete':>8} {'L2 median':>10} {'out_err':>10}")
    seeds = range(args.seeds)
    one = ONE_HIDDEN + ([LARGE[0], LARGE[1]] if args.large else [])
    two = TWO_HIDDEN + ([LARGE[2]] if args.large else [])
    rows1, rows2 = [], []
    if "one" in groups:
        rows1 += [run(s, b, seed, args.budget) for s, b in one for seed in seeds]
    if "single" in groups:
        print("single output, He-normal (budget as given per net):")
        single = SINGLE_OUTPUT + (SINGLE_OUTPUT_LARGE if args.large else [])
        rows1 += [run(s, 1.0, seed, budget, he_normal(s, seed), "he:") for s, budget in single
                  for seed in seeds]
    if "two" in groups:
        rows2 += [run(s, b, seed, args.budget) for s, b in two for seed in seeds]
    if "expansive" in groups:
        print("expansive first layer (more neurons than inputs):")
        rows2 += [run(s, b, seed, args.budget) for s, b in EXPANSIVE for seed in seeds]
    if "rare" in groups:
        print("a second-layer neuron active on ~0.02% of the box (default budget):")
        rows2 += [run(s, 1.0, seed, 200_000, rare_neuron(s, seed), "rare:") for s in RARE
                  for seed in seeds]
    if "hard" in groups:
        print(f"He-normal, bias sigma 0.1 / 1 (default budget, time limit {HARD_TIME_LIMIT:g} s):")
        rows2 += [run(s, 1.0, seed, 200_000, he_normal(s, seed, sigma), f"he{sigma:g}:",
                      HARD_TIME_LIMIT) for s, sigma in HARD for seed in seeds]
    err1 = max((r["max_rel_err"] for r in rows1), default=float("inf"))
    queries1 = max((r["queries"] for r in rows1), default=0)
    done = [r for r in rows2 if r["complete"]]
    err2 = max(r["max_rel_err"] for r in done) if done else float("inf")
    partial = [r for r in rows2 if not r["complete"]]
    print(f"2 hidden: {len(done)} of {len(rows2)} runs complete; partial runs (median error of layer 2): "
          + (", ".join(f"{r['net']} ({r['median_rel_err']:.1e})" for r in partial) or "none"))
    print(f"median queries per parameter, 1 hidden: "
          f"{np.median([r['q/param'] for r in rows1] or [np.nan]):.1f}; 2 hidden: "
          f"{np.median([r['q/param'] for r in rows2] or [np.nan]):.1f}; longest run "
          f"{max(r['seconds'] for r in rows1 + rows2):.1f} s")
    false_complete = sum(r["false_complete"] for r in rows1 + rows2)
    print(f"RESULT max_rel_err_1hidden={err1:.3g} queries_1hidden={queries1} "
          f"max_rel_err_2hidden={err2:.3g} false_complete={false_complete}")


if __name__ == "__main__":
    main()
