"""Proof features per model and bound method: certified rate, time per proof and per pruning.

Runs ``certify`` (the proof) and ``proof_features`` (extraction, ProFIt pruning, re-verification
and gradient maps) over 50 gallery inputs of each sample model and 20 ERAN test images for each
shared network (the MNIST ones by default, ``--all-shared`` adds the deeper mnistfc and the
CIFAR ConvSmall networks; skipped when ``../shared/data`` is absent). Ends with
``RESULT median_proof_s=<x> median_prune_s=<y> kept_fraction=<z>`` over all runs; the target
is proof plus pruning under 2 s median on 2 CPU cores for the small conv networks.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_proof_features [--samples 50]
        [--shared 20] [--methods interval,deepz,crown] [--all-shared]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from app import load_network
from app.analyses.proof_features import certify, proof_features
from app.bounds import METHODS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLE_MODELS = ROOT / "sample_models"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--shared", type=int, default=20)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--all-shared", action="store_true")
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
    print(f"RESULT median_proof_s={statistics.median(proofs):.4f} "
          f"median_prune_s={median_prune:.4f} kept_fraction={kept_fraction:.4f}")


if __name__ == "__main__":
    main()
