"""Proof features per model and bound method: certified rate, time per proof and per pruning.

Runs ``certify`` (the proof) and ``proof_features`` (extraction, ProFIt pruning, re-verification
and gradient maps) over 50 gallery inputs of each sample model and 20 ERAN test images for each
shared network (the MNIST ones by default, ``--all-shared`` adds the deeper mnistfc and the
CIFAR ConvSmall networks; skipped when ``../shared/data`` is absent). Ends with
``RESULT median_proof_s=<x> median_prune_s=<y> kept_fraction=<z>`` over all runs; the target
is proof plus pruning under 2 s median on 2 CPU cores for the small conv networks.

With the shared VNN-COMP 2021 data the RESULT line adds ``vnn_mnistfc_safe_proven=<k>/<n>
vnn_violated_proven=<v>/<m> acasxu_safe_proven=<a>/<b>``: ``app.properties.verify`` with
``bab`` (input splitting on ACAS Xu's 5 inputs, ReLU-split branch and bound on mnistfc's 784;
at most ``--vnn-limit`` seconds per instance) on the instances that the competition's
tools agree on (``results_csv``: some tool proved it and none found a counterexample, or the
reverse); ``--acas-max`` (known-safe ACAS Xu) and ``--vnn-max`` (each benchmark and outcome)
take evenly spread subsets to stay short. These run on ``--vnn-threads`` threads (default:
every core, as a verifier given a time limit would be run; the rest of the run uses one).

``crown_speed_vs_auto_lirpa=<r>`` (issue 18, item 3): auto_LiRPA 0.3's time divided by ours
for CROWN bounds (lower and upper bounds of all 10 logits, one box per image, one thread,
after one untimed warm-up) on the two shared CIFAR ConvSmall nets, measured in the same run:
``--lirpa-images`` ERAN test images at each radius of ``--lirpa-eps`` (in 1/255 units), in
``--lirpa-rounds`` alternating rounds, each box keeping its fastest round per tool. Time is
process CPU time (one thread: on a shared machine, wall time mostly measures the other
processes); the wall-clock ratio is printed beside it. ``r`` is the smaller of the two nets'
ratios of median times per box (each net's line also gives the largest amount by which our
bounds are looser than auto_LiRPA's). auto_LiRPA runs in its own environment,
a benchmark dependency only (never the product's), driven by ``benchmarks/lirpa_reference.py``
as a subprocess; build it once with pyenv's Python 3.10:

    ~/.pyenv/versions/3.10.13/bin/python -m venv .venv-lirpa
    .venv-lirpa/bin/pip install "torch==1.12.1" "numpy<2" onnx==1.14.1 tqdm packaging \
        appdirs pyyaml
    .venv-lirpa/bin/pip install --no-deps auto_LiRPA==0.3

(``--no-deps``: its declared test and lint requirements such as torchvision and pylint are not
needed to compute bounds). ``LIRPA_PYTHON`` names another interpreter; without one the
number reads ``crown_speed_vs_auto_lirpa=skipped``, as it does with ``--no-lirpa`` or
without ``../shared/data``.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_proof_features [--samples 50]
        [--shared 20] [--methods interval,deepz,crown] [--all-shared]
        [--vnn-limit 60] [--vnn-threads N] [--acas-max 139] [--vnn-max N] [--no-vnn]
        [--vnn-benchmarks mnistfc,acasxu] [--no-lirpa] [--lirpa-images 20]
        [--lirpa-eps 0.5,2,8] [--lirpa-rounds 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from app import load_network
from app.analyses.proof_features import certify, proof_features
from app.bounds import QUICK_METHODS, analyze, input_box
from app.properties import read_vnnlib, verify

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLE_MODELS = ROOT / "sample_models"
LIRPA_PYTHON = Path(os.environ.get("LIRPA_PYTHON", ROOT / ".venv-lirpa" / "bin" / "python"))
CONV_SMALL = ("convSmallRELU__Point", "convSmall_pgd_cifar")


def sample_cases(n: int) -> list[tuple[str, str, np.ndarray, np.ndarray, float]]:
    gallery = SAMPLE_MODELS / "gallery" / "digits.npz"
    if not gallery.exists():
        return []
    data = np.load(gallery)
    cases = []
    for path in sorted(SAMPLE_MODELS.glob("digits_*.onnx")):
        cases.append((path.stem, str(path), data["x"][:n], data["y"][:n], 0.05))
    return cases


def shared_cases(n: int, everything: bool) -> list[tuple[str, str, np.ndarray, np.ndarray, float]]:
    if not SHARED.exists():
        return []
    mnist = np.loadtxt(SHARED / "eran" / "mnist_test.csv", delimiter=",", max_rows=n, ndmin=2)
    cifar = np.loadtxt(SHARED / "eran" / "cifar10_test.csv", delimiter=",", max_rows=n, ndmin=2)
    mnist_x, cifar_x = mnist[:, 1:] / 255.0, cifar[:, 1:] / 255.0
    cifar_x = cifar_x.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2)
    nets = [("vnncomp2021/mnistfc/mnist-net_256x2.onnx", 0.02),
            ("profit_nets/mnist_0.1.onnx", 0.02)]
    if everything:  # DeepZ gradient maps over 3072 CIFAR input generators take ~30 s each
        nets += [("vnncomp2021/mnistfc/mnist-net_256x4.onnx", 0.02),
                 ("vnncomp2021/mnistfc/mnist-net_256x6.onnx", 0.02),
                 ("profit_nets/convSmallRELU__Point.onnx", 0.5 / 255),
                 ("profit_nets/convSmall_pgd_cifar.onnx", 0.5 / 255)]
    cases = []
    for rel, eps in nets:
        is_cifar = "convSmall" in rel
        x, y = (cifar_x, cifar[:, 0]) if is_cifar else (mnist_x, mnist[:, 0])
        cases.append((Path(rel).stem, str(SHARED / rel), x, y.astype(int), eps))
    return cases


def known_outcomes(benchmark: str) -> dict[tuple[str, str], str]:
    """``holds``/``violated`` per (onnx, vnnlib) where the 2021 tools do not contradict."""
    said: dict[tuple[str, str], set[str]] = {}
    words = {"holds": "holds", "unsat": "holds", "violated": "violated", "sat": "violated"}
    for tool in sorted((SHARED / "vnncomp2021" / "results_csv").glob("*.csv")):
        for row in csv.reader(tool.open()):
            if len(row) >= 5 and row[0] == benchmark and row[4].strip().lower() in words:
                key = (Path(row[1]).name, Path(row[2]).name)
                said.setdefault(key, set()).add(words[row[4].strip().lower()])
    return {k: v.pop() for k, v in sorted(said.items()) if len(v) == 1}


def _every(items: list, most: int) -> list:
    """At most ``most`` of ``items``, evenly spread."""
    return items[::max(1, len(items) // max(1, most))][:most]


def vnn_counts(limit: float, acas_max: int, most: int,
               benches: tuple[str, ...] = ("mnistfc", "acasxu")) -> dict[str, str]:
    """Proven / counterexample / unknown per benchmark and truth, one line per instance."""
    counts: dict[tuple[str, str], list[int]] = {}
    for bench in benches:
        items = list(known_outcomes(bench).items())
        safe = _every([it for it in items if it[1] == "holds"],
                      min(most, acas_max) if bench == "acasxu" else most)
        items = safe + _every([it for it in items if it[1] == "violated"], most)
        nets: dict[str, object] = {}
        for (onnx_name, prop_name), truth in items:
            folder = SHARED / "vnncomp2021" / bench
            if not (folder / onnx_name).exists() or not (folder / prop_name).exists():
                continue  # results rows of networks not in the shared data (test_nano)
            net = nets.setdefault(onnx_name, load_network(str(folder / onnx_name)))
            verdict = verify(net, read_vnnlib(folder / prop_name), "bab", time_limit=limit)
            tally = counts.setdefault((bench, truth), [0, 0])
            tally[0] += verdict.status == "proven"
            tally[1] += 1
            print(f"{bench:8s} {onnx_name:34s} {prop_name:20s} {truth:9s} {verdict.status:15s} "
                  f"{verdict.seconds:6.1f}s {verdict.message}", flush=True)
    mnist, acas = counts.get(("mnistfc", "holds"), [0, 0]), counts.get(("acasxu", "holds"), [0, 0])
    bad = [sum(x) for x in zip(*(counts.get((b, "violated"), [0, 0]) for b in ("mnistfc", "acasxu")),
                                strict=True)]
    return {"vnn_mnistfc_safe_proven": f"{mnist[0]}/{mnist[1]}",
            "vnn_violated_proven": f"{bad[0]}/{bad[1]}",
            "acasxu_safe_proven": f"{acas[0]}/{acas[1]}"}


def _our_crown_seconds(net, lo: torch.Tensor, hi: torch.Tensor) -> tuple[dict, list]:
    """Wall and CPU seconds per box for CROWN bounds of the logits (after one untimed
    warm-up), and the bounds."""
    last = len(net.layers) - 1
    analyze(net, lo[:1], hi[:1], "crown").bounds(last)
    times: dict[str, list[float]] = {"seconds": [], "cpu_seconds": []}
    found = []
    for k in range(lo.shape[0]):
        start, start_cpu = time.perf_counter(), time.process_time()
        bounds = analyze(net, lo[k:k + 1], hi[k:k + 1], "crown").bounds(last)
        times["seconds"].append(time.perf_counter() - start)
        times["cpu_seconds"].append(time.process_time() - start_cpu)
        found.append(bounds)
    return times, found


def crown_speed(images: int, eps_255: list[float], rounds: int = 2) -> str:
    """auto_LiRPA's CPU seconds over ours for CROWN boxes, the smaller of the two ConvSmall
    nets (``skipped`` without the reference environment or the shared data)."""
    if not LIRPA_PYTHON.exists() or not SHARED.exists():
        print(f"crown speed: skipped ({LIRPA_PYTHON} or {SHARED} missing)")
        return "skipped"
    cifar = np.loadtxt(SHARED / "eran" / "cifar10_test.csv", delimiter=",", max_rows=images,
                       ndmin=2)
    x = torch.tensor(cifar[:, 1:] / 255.0, dtype=torch.float32).reshape(-1, 32, 32, 3)
    x = x.permute(0, 3, 1, 2).contiguous()
    boxes = [input_box(x, e / 255) for e in eps_255]
    lo, hi = torch.cat([b[0] for b in boxes]), torch.cat([b[1] for b in boxes])
    ratios = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        box_file = Path(tmp) / "boxes.npz"
        np.savez(box_file, lo=lo.numpy(), hi=hi.numpy())
        for name in CONV_SMALL:
            path = SHARED / "profit_nets" / f"{name}.onnx"
            net = load_network(str(path))
            best: dict[str, dict[str, list[float]]] = {"ours": {}, "lirpa": {}}
            for _ in range(rounds):  # alternating; each box keeps its fastest round per tool
                ours, found = _our_crown_seconds(net, lo, hi)
                run = subprocess.run([str(LIRPA_PYTHON), str(ROOT / "benchmarks" /
                                                             "lirpa_reference.py"),
                                      str(path), str(box_file)], capture_output=True, text=True,
                                     env=env, check=False)
                if run.returncode != 0:
                    print(f"crown speed: auto_LiRPA failed on {name}: {run.stderr[-2000:]}")
                    return "skipped"
                ref = json.loads(run.stdout.strip().splitlines()[-1])
                for tool, got in (("ours", ours), ("lirpa", ref)):
                    for key in ("seconds", "cpu_seconds"):
                        old = best[tool].get(key, got[key])
                        best[tool][key] = [min(a, b) for a, b in zip(old, got[key], strict=True)]
            ref_lo, ref_hi = torch.tensor(ref["lower"]), torch.tensor(ref["upper"])
            our_lo = torch.cat([b[0] for b in found]).double()
            our_hi = torch.cat([b[1] for b in found]).double()
            looser = max(float((ref_lo - our_lo).max()), float((our_hi - ref_hi).max()))
            med = {tool: {k: statistics.median(v) for k, v in t.items()}
                   for tool, t in best.items()}
            ratio = med["lirpa"]["cpu_seconds"] / med["ours"]["cpu_seconds"]
            wall = med["lirpa"]["seconds"] / med["ours"]["seconds"]
            ratios.append(ratio)
            print(f"crown speed {name:22s} boxes={lo.shape[0]} eps={eps_255}/255 "
                  f"median cpu_s ours={med['ours']['cpu_seconds']:.4f} "
                  f"auto_lirpa={med['lirpa']['cpu_seconds']:.4f} ratio={ratio:.2f}; "
                  f"wall_s ours={med['ours']['seconds']:.4f} "
                  f"auto_lirpa={med['lirpa']['seconds']:.4f} ratio={wall:.2f}; "
                  f"ours_looser_by_at_most={looser:.2e}", flush=True)
    return f"{min(ratios):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--shared", type=int, default=20)
    parser.add_argument("--methods", default=",".join(QUICK_METHODS))
    parser.add_argument("--all-shared", action="store_true")
    parser.add_argument("--vnn-limit", type=float, default=60.0)
    parser.add_argument("--vnn-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--acas-max", type=int, default=139)
    parser.add_argument("--vnn-max", type=int, default=10_000,
                        help="at most this many instances per benchmark and outcome")
    parser.add_argument("--no-vnn", action="store_true")
    parser.add_argument("--vnn-benchmarks", default="mnistfc,acasxu",
                        help="which VNN-COMP benchmarks to run (a subset: the others read 0/0)")
    parser.add_argument("--no-lirpa", action="store_true",
                        help="leave out the CROWN speed comparison with auto_LiRPA")
    parser.add_argument("--lirpa-images", type=int, default=20)
    parser.add_argument("--lirpa-eps", default="0.5,2,8",
                        help="radii of the CROWN speed boxes, in 1/255 units")
    parser.add_argument("--lirpa-rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    proofs, prunes, kept_fracs = [], [], []
    print(f"{'model':28s} {'method':9s} {'eps':>7s} {'cert':>6s} {'proof_s':>8s} "
          f"{'prune_s':>8s} {'kept/total':>11s}")
    for name, path, xs, ys, eps in sample_cases(args.samples) + shared_cases(args.shared,
                                                                            args.all_shared):
        net = load_network(path)
        for method in methods:
            t_proof, t_prune, kept, total, certified = [], [], [], 0, 0
            for x, y in zip(xs, ys, strict=True):
                x_t = torch.tensor(x, dtype=torch.float32).reshape(net.input_shape)
                start = time.perf_counter()
                cert = certify(net, x_t, int(y), eps, method)
                t_proof.append(time.perf_counter() - start)
                if not cert.certified:
                    continue
                certified += 1
                start = time.perf_counter()
                result = proof_features(net, x_t, int(y), eps, method)
                t_prune.append(time.perf_counter() - start)
                kept.append(len(result.kept))
                total = result.num_features
            proofs += t_proof
            prunes += t_prune
            kept_fracs += [k / total for k in kept]
            prune = f"{statistics.median(t_prune):8.3f}" if t_prune else f"{'-':>8s}"
            ratio = f"{statistics.mean(kept):5.1f}/{total:<5d}" if kept else f"{'-':>11s}"
            print(f"{name:28s} {method:9s} {eps:7.4f} {certified / len(xs):6.2f} "
                  f"{statistics.median(t_proof):8.3f} {prune} {ratio}", flush=True)
    median_prune = statistics.median(prunes) if prunes else float("nan")
    kept_fraction = statistics.mean(kept_fracs) if kept_fracs else float("nan")
    torch.set_num_threads(args.vnn_threads)
    vnn = {} if args.no_vnn or not SHARED.exists() else vnn_counts(
        args.vnn_limit, args.acas_max, args.vnn_max, tuple(args.vnn_benchmarks.split(",")))
    torch.set_num_threads(1)
    vnn["crown_speed_vs_auto_lirpa"] = "skipped" if args.no_lirpa else crown_speed(
        args.lirpa_images, [float(e) for e in args.lirpa_eps.split(",")], args.lirpa_rounds)
    extra = "".join(f" {k}={v}" for k, v in vnn.items())
    median_proof = statistics.median(proofs) if proofs else float("nan")
    print(f"RESULT median_proof_s={median_proof:.4f} "
          f"median_prune_s={median_prune:.4f} kept_fraction={kept_fraction:.4f}{extra}")


if __name__ == "__main__":
    main()
