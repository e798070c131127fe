"""The engine on CPU and GPU: CROWN bounds, batched exact lines and exact IG.

Networks: the shared CIFAR-10 ConvSmall nets (``../shared/data/profit_nets``: standard and PGD
training) and a small CIFAR ResNet built here (a stride-2 stem, two residual blocks
``x + conv(relu(conv(x)))``, a stride-2 conv, a linear head; seeded weights: timing only).
Inputs: the first ``--images`` ERAN CIFAR-10 test images (random ones when the shared data
is absent).

* crown: ``analyze(net, box, "crown").bounds(logits)`` on the batch of L-inf balls (eps
  2/255), the bound methods' common core;
* lines: ``exact_lines`` through the segments image i -> image i+1 (batched);
* ig: exact Integrated Gradients of image 0 from a zero baseline.

Each is timed on the CPU and, where CUDA is present, with the network moved to the GPU
(``net.to("cuda")``; inputs as the caller has them, on the CPU). Exact lines and exact IG do
their bookkeeping in numpy and run on a host copy of a GPU network (``points.on_host``), so
their GPU column measures that copy plus the host walk. Times are wall-clock, best of
``--repeats`` (after one warm-up run), synchronised with the GPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_device.py [--images 8] [--repeats 3]

Ends with ``RESULT gpu_speedup_crown=<x> gpu_speedup_lines=<y>`` (geometric means over the
networks) where a GPU is present and ``RESULT skipped=no_gpu`` where not (after printing the
CPU times).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app import load_network
from app.analyses.linear_regions import exact_integrated_gradients, exact_lines
from app.bounds import analyze, input_box
from app.network import Network

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CONV_SMALL = ("convSmallRELU__Point.onnx", "convSmall_pgd_cifar.onnx")
EPS = 2 / 255


class _Block(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b(torch.relu(self.a(x))))


class CifarResNet(nn.Module):
    """3x32x32 -> stem 8x16x16 -> 2 residual blocks -> 16x8x8 -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(_Block(8), _Block(8))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.relu(self.stem(x)))
        return self.head(torch.relu(self.down(h)).flatten(1))


def networks() -> dict[str, Network]:
    nets = {}
    for name in CONV_SMALL:
        path = SHARED / "profit_nets" / name
        if path.exists():
            nets[path.stem] = load_network(path)
    torch.manual_seed(0)
    resnet = CifarResNet().eval()
    for m in resnet.modules():  # small weights: the residual sums stay in a sane range
        if isinstance(m, nn.Conv2d | nn.Linear):
            m.weight.data.mul_(0.5)
    nets["cifar_resnet"] = load_network(resnet, input_shape=(3, 32, 32))
    return nets


def images(n: int) -> torch.Tensor:
    path = SHARED / "eran" / "cifar10_test.csv"
    if not path.exists():
        return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = np.loadtxt(path, delimiter=",", max_rows=n, ndmin=2)
    x = torch.tensor(rows[:, 1:] / 255.0, dtype=torch.float32).reshape(n, 32, 32, 3)
    return x.permute(0, 3, 1, 2).contiguous()


def best_time(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` runs after one warm-up, synchronised with the GPU."""
    run()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def tasks(net: Network, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    def crown() -> torch.Tensor:
        xd = x.to(net.device, net.dtype)
        with torch.no_grad():
            lo, hi = input_box(xd, EPS)
            return analyze(net, lo, hi, "crown").bounds(len(net.layers) - 1)[0].cpu()

    return {
        "crown": crown,
        "lines": lambda: exact_lines(net, x[:-1], x[1:]),
        "ig": lambda: exact_integrated_gradients(net, x[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    x = images(args.images)
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    cpu = torch.device("cpu")
    speedups: dict[str, list[float]] = {"crown": [], "lines": [], "ig": []}
    print(f"{'network':28s} {'task':6s} {'cpu_s':>9s} {'gpu_s':>9s} {'speedup':>8s}")
    for name, net in networks().items():
        on_gpu = net.with_dtype(net.dtype).to(gpu) if gpu is not None else None
        for task, run in tasks(net, x).items():
            cpu_s = best_time(run, args.repeats, cpu)
            if on_gpu is None:
                print(f"{name:28s} {task:6s} {cpu_s:9.4f} {'-':>9s} {'-':>8s}")
                continue
            gpu_s = best_time(tasks(on_gpu, x)[task], args.repeats, gpu)
            speedups[task].append(cpu_s / gpu_s)
            print(f"{name:28s} {task:6s} {cpu_s:9.4f} {gpu_s:9.4f} {cpu_s / gpu_s:8.2f}")
    if gpu is None:
        print("RESULT skipped=no_gpu")
        return
    mean = {k: float(np.exp(np.mean(np.log(v)))) for k, v in speedups.items()}
    print(f"gpu_speedup_ig={mean['ig']:.2f} (exact IG: host walk, see the docstring)")
    print(f"RESULT gpu_speedup_crown={mean['crown']:.2f} gpu_speedup_lines={mean['lines']:.2f}")


if __name__ == "__main__":
    main()
