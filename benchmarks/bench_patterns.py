"""Pattern rules: mining, verification and distillation on the sample models and ACAS Xu.

For every sample digit model: mine rules at the last ReLU layer from the gallery, verify the
top ``--rules`` on the L-inf ball (``--eps``) around an input each covers; distil rule lists
from the model's training split (plus noisy copies labelled by the network) and measure their
agreement with the network on the held-out gallery, for several rule-list sizes and for
on/off against threshold literals; measure proven coverage on the gallery: the share of
inputs whose decision is implied by their input property (the polytope of their complete
pattern, an LP) on their ``--eps`` ball, and on the whole pixel box.
For the shared ACAS Xu network 1_1: mine "clear of conflict" (lowest score, index 0) rules on
the normalized input box, verify them on the box around a covered input and, with a short
time-out, on the whole box, and refine each refuted one by literals; then decide input
properties on the whole box at layers 2 (MILP with input splitting on the polytope's bounding
box) and 6 (LP) for sampled inputs, with ``--acas-budget`` seconds per layer. Every counterexample is re-checked by a forward pass here.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_patterns.py [--rules 3 --timeout 30]

Ends with ``RESULT rules=<n> proven=<p> median_verify_s=<x> distilled_fidelity=<f>
proven_coverage=<c> acas_input_props_proven=<k>/<n>`` (rules verified, of them proven, median
verification time, mean fidelity and coverage over the digits FC models on the held-out
gallery, ACAS Xu input properties proven at layers 2 and 6 together).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from app import load_network
from app.analyses.patterns import (
    InputDomain,
    distill,
    mine_rules,
    property_verdict,
    proven_coverage,
    refine_rule,
    verify_rule,
)
from sample_models.train import load_split

ROOT = Path(__file__).resolve().parents[1]
ACAS = ROOT.parent / "shared" / "data" / "vnncomp2021" / "acasxu" / "ACASXU_run2a_1_1_batch_2000.onnx"
ACAS_LO = [-0.328422877, -0.5, -0.5, -0.5, -0.5]
ACAS_HI = [0.679857769, 0.5, 0.5, 0.5, 0.5]


def _check(net, rule, verdict) -> None:
    """A counterexample must satisfy the premise and change the decision (forward pass)."""
    if verdict.status != "counterexample":
        return
    net64 = net.with_dtype(torch.float64)
    x = verdict.counterexample.reshape(1, *net.input_shape)
    assert x.dtype == torch.float64
    assert bool(rule.fires(net64, x)[0]), "counterexample outside the premise"
    with torch.no_grad():
        y = net64(x)[0]
    assert int(y.argmin() if rule.lowest else y.argmax()) != rule.target


def _verify_top(net, mined, xs, rules: int, domain_of, timeout: float) -> list[tuple]:
    held = xs[mined.heldout]
    rows = []
    for rule in mined.rules[:rules]:
        start = held[rule.fires(net, held)][:1]
        if not len(start):
            continue
        verdict = verify_rule(net, rule, domain_of(start[0]), timeout=timeout)
        _check(net, rule, verdict)
        rows.append((rule, verdict))
        print(f"  {verdict.status:<15}{verdict.seconds:7.2f}s  {rule}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=3, help="rules verified per model")
    parser.add_argument("--eps", type=float, default=0.05, help="L-inf ball of the digit domains")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per verification")
    parser.add_argument("--acas-radius", type=float, default=0.05)
    parser.add_argument("--acas-budget", type=float, default=60.0,
                        help="seconds of input properties per ACAS Xu layer")
    parser.add_argument("--rule-list-size", type=int, default=100,
                        help="rules in the distilled list whose fidelity is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)

    gallery = np.load(ROOT / "sample_models" / "gallery" / "digits.npz")
    xs = torch.from_numpy(gallery["x"].astype(np.float32))
    x_train = load_split()[0]
    both = torch.cat([x_train, xs])
    held = np.arange(len(x_train), len(both))  # the gallery: never trained on
    verdicts, fidelities, coverages = [], [], []
    for path in sorted((ROOT / "sample_models").glob("digits_*.onnx")):
        net = load_network(path)
        t0 = time.perf_counter()
        mined = mine_rules(net, xs, layer=-1, min_support=10)
        mine_s = time.perf_counter() - t0
        with torch.no_grad():
            decided = net(xs).argmax(1).numpy()
        majority = np.bincount(decided).max() / len(decided)
        print(f"{path.stem}: {len(mined.rules)} rules at L{mined.layer} in {mine_s:.2f}s; "
              f"majority-class baseline {majority:.3f}")
        for literals in ("threshold", "pattern"):
            curve = []
            for size in (10, 30, args.rule_list_size, None):
                rule_list = distill(net, both, layer=-1, literals=literals, max_depth=None,
                                    max_rules=size, augment=10, heldout=held)
                curve.append(f"{len(rule_list.rules)} rules {rule_list.fidelity:.3f}")
                if literals == "threshold" and size == args.rule_list_size and "_fc_" in path.stem:
                    fidelities.append(rule_list.fidelity)
            print(f"  distilled {literals} rule lists (held-out fidelity): " + ", ".join(curve))
        box = InputDomain.box(net, 0.0, 1.0)
        local = proven_coverage(net, xs, box, layer=-1, eps=args.eps)
        line = (f"  proven coverage (input properties, L{local.layer}): {local.fraction:.3f} on "
                f"eps={args.eps} balls ({local.seconds:.1f}s)")
        if "_fc_" in path.stem:
            coverages.append(local.fraction)
            whole = proven_coverage(net, xs, box, layer=-1)
            line += f", {whole.fraction:.3f} on the whole pixel box ({whole.seconds:.1f}s)"
        print(line)
        verdicts += _verify_top(net, mined, xs, args.rules,
                                lambda x, net=net: InputDomain.linf_ball(net, x, args.eps),
                                args.timeout)

    if ACAS.exists():
        net = load_network(ACAS)
        lo, hi = torch.tensor(ACAS_LO).reshape(1, 1, 5), torch.tensor(ACAS_HI).reshape(1, 1, 5)
        gen = torch.Generator().manual_seed(0)
        xa = lo + (hi - lo) * torch.rand((5000, 1, 1, 5), generator=gen)
        t0 = time.perf_counter()
        mined = mine_rules(net, xa, layer=2, target=0, lowest=True, min_support=20, max_depth=10)
        print(f"{ACAS.stem}: {len(mined.rules)} clear-of-conflict rules at L2 in "
              f"{time.perf_counter() - t0:.2f}s; local boxes of radius {args.acas_radius}:")
        r = args.acas_radius
        verdicts += _verify_top(
            net, mined, xa, args.rules,
            lambda x: InputDomain.box(net, torch.max(x - r, lo[0]), torch.min(x + r, hi[0])),
            args.timeout)
        box = InputDomain.box(net, lo, hi)
        for k, rule in enumerate(mined.rules[: args.rules]):
            # the whole normalized box: one MILP against input splitting, same rule, same run
            timed = {m: verify_rule(net, rule, box, timeout=args.timeout, method=m)
                     for m in ("milp", "split")}
            for verdict in timed.values():
                _check(net, rule, verdict)
            print(f"  whole normalized box, rule {k}: "
                  + ", ".join(f"{m} {v.status} in {v.seconds:.2f}s" for m, v in timed.items())
                  + f" (milp/split time ratio {timed['milp'].seconds / timed['split'].seconds:.1f})")
        for k, rule in enumerate(mined.rules[: args.rules]):
            # refuted on the whole box: restrict by literals towards a provable rule
            ref = refine_rule(net, rule, box, xa[mined.heldout], max_steps=8, timeout=10)
            for before, verdict in ref.steps[:-1]:
                _check(net, before, verdict)
            print(f"  refined rule {k}: {ref.outcome} after {len(ref.steps) - 1} literals, "
                  f"covering {ref.support} of its {rule.support} held-out inputs")
        gen = torch.Generator().manual_seed(1)
        starts = lo.double() + (hi - lo).double() * torch.rand((200, 1, 1, 5), generator=gen,
                                                               dtype=torch.float64)
        props = _acas_properties(net, box, starts, args.acas_budget)
    else:
        print("ACAS Xu network absent: skipped")
        props = (0, 0)

    proven = sum(v.status == "proven" for _, v in verdicts)
    median = statistics.median(v.seconds for _, v in verdicts) if verdicts else float("nan")
    print(f"proven share {proven / max(1, len(verdicts)):.2f} of {len(verdicts)} verified rules")
    print(f"RESULT rules={len(verdicts)} proven={proven} median_verify_s={median:.3f} "
          f"distilled_fidelity={float(np.mean(fidelities)) if fidelities else float('nan'):.3f} "
          f"proven_coverage={float(np.mean(coverages)) if coverages else float('nan'):.3f} "
          f"acas_input_props_proven={props[0]}/{props[1]}")


def _acas_properties(net, box, starts, budget: float) -> tuple[int, int]:
    """Input properties on the whole box at layers 2 and 6, ``budget`` seconds per layer
    (each at most a tenth of it); counterexamples re-checked. ``(proven, decided)`` over
    both layers, where the inputs tried in the budget count as decided-or-not."""
    net64 = net.with_dtype(torch.float64)
    proven = tried = 0
    for layer in (2, 6):
        counts: dict[str, int] = {}
        t0 = time.perf_counter()
        for x in starts:
            left = budget - (time.perf_counter() - t0)
            if left <= 0:
                break
            verdict = property_verdict(net, x, box, layer=layer, lowest=True,
                                       timeout=min(budget / 10, left), net64=net64)
            if verdict.status == "counterexample":
                ce = verdict.counterexample.reshape(1, *net.input_shape)
                assert bool(((ce >= box.lo) & (ce <= box.hi)).all())
                with torch.no_grad():
                    assert int(net64(ce)[0].argmin()) == verdict.counterexample_class
            counts[verdict.status] = counts.get(verdict.status, 0) + 1
        n = sum(counts.values())
        print(f"  input properties at L{layer} on the whole box: {counts} of {n} inputs in "
              f"{time.perf_counter() - t0:.1f}s")
        proven += counts.get("proven", 0)
        tried += n
    return proven, tried


if __name__ == "__main__":
    main()
