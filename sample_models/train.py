"""Train the sample models the product ships with, on scikit-learn's 8x8 digits.

Six small ReLU networks, ``digits_{fc,conv}_{standard,pgd,ibp}``, so every analysis has
something real to open and so users can compare how training changes a network:

* ``standard``: plain cross-entropy.
* ``pgd``: adversarial training on PGD points (Madry et al.), via :func:`app.attacks.pgd`.
* ``ibp``: certified training with interval bound propagation (Gowal et al. 2018): the loss
  mixes clean and worst-case cross-entropy, ``kappa`` ramping 1 -> 0.5 while ``eps`` ramps
  0 -> ``train_eps``. The bounds come from the engine (:meth:`app.Network.interval_bounds`),
  which shares the module's parameters, so the loss is differentiable.

Each model is written as ONNX plus a JSON card (clean, PGD and IBP-certified accuracy on the
held-out split); the held-out split itself is written as the gallery. Run with
``python -m sample_models.train [--only NAME] [--out DIR] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from app import Network, load_network
from app.attacks import pgd

DATASET = "digits"
INPUT_SHAPE = (1, 8, 8)
CLASSES = list(range(10))
EPS = 0.1  # L-inf radius on the [0, 1] pixel scale, for PGD training, IBP training and the cards
SPLIT_SEED = 0
TEST_FRACTION = 0.2
SEED = 0
BATCH = 64
OUT_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Architecture:
    build: Callable[[], nn.Sequential]
    text: str


ARCHITECTURES: dict[str, Architecture] = {
    "fc": Architecture(
        lambda: nn.Sequential(
            nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
            nn.Linear(32, 10),
        ),
        "Flatten - Linear(64,64) - ReLU - Linear(64,32) - ReLU - Linear(32,10)",
    ),
    "conv": Architecture(
        lambda: nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
        ),
        "Conv(1->8,3x3,pad 1) - ReLU - Conv(8->16,3x3,stride 2,pad 1) - ReLU - Flatten"
        " - Linear(256,32) - ReLU - Linear(32,10)",
    ),
}


@dataclass(frozen=True)
class Method:
    """How one training method is run; ``quick_epochs`` is for tests."""

    epochs: int
    quick_epochs: int
    lr: float
    train_eps: float = 0.0
    pgd_steps: int = 0
    warmup_frac: float = 0.0  # IBP: fraction of the steps with eps = 0, kappa = 1
    ramp_frac: float = 0.0  # IBP: fraction of the steps over which eps and kappa ramp


METHODS: dict[str, Method] = {
    "standard": Method(epochs=60, quick_epochs=8, lr=2e-3),
    "pgd": Method(epochs=80, quick_epochs=4, lr=2e-3, train_eps=EPS, pgd_steps=7),
    "ibp": Method(epochs=200, quick_epochs=10, lr=2e-3, train_eps=1.1 * EPS,
                  warmup_frac=0.1, ramp_frac=0.5),
}

NAMES = [f"{DATASET}_{a}_{m}" for a in ARCHITECTURES for m in METHODS]


# -- data -------------------------------------------------------------------------------------


def load_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: digits scaled to [0, 1], shape ``[N, 1, 8, 8]``.

    The split is fixed (seeded, stratified) so cards and gallery describe the same test set.
    """
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    return tuple(torch.from_numpy(a) for a in (xtr, ytr, xte, yte))  # type: ignore[return-value]


def write_gallery(out_dir: Path, x: Tensor, y: Tensor) -> Path:
    path = out_dir / "gallery" / f"{DATASET}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64))
    return path


# -- robustness -------------------------------------------------------------------------------


def input_box(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The L-inf ball of radius ``eps`` around ``x``, intersected with the pixel range [0, 1]."""
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def margin_lower_bounds(net: Network, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Interval lower bounds of ``z_y - z_j`` for every class ``j`` (``[B, classes]``).

    Bounds are propagated up to the input of the last linear layer; the margin rows
    ``W_y - W_j`` are then applied exactly (the specification folded into the last layer,
    as in Gowal et al.), which is tighter than subtracting bounds of separate logits.
    ``net`` must end in a ``Linear`` layer, as all sample architectures do.
    """
    last = net.layers[-1]
    h_lo, h_hi = net.interval_bounds(*input_box(x, eps))[net.inputs[-1][0]]
    w = last.weight[y][:, None, :] - last.weight[None]  # [B, C, H]
    b = last.bias[y][:, None] - last.bias[None]
    mid, rad = ((h_lo + h_hi) / 2).flatten(1), ((h_hi - h_lo) / 2).flatten(1)
    return torch.einsum("bch,bh->bc", w, mid) - torch.einsum("bch,bh->bc", w.abs(), rad) + b


def certified(net: Network, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Per sample: is the label provably kept on the whole ``eps`` box (by IBP)?"""
    with torch.no_grad():
        m = margin_lower_bounds(net, x, y, eps)
    m[torch.arange(len(y)), y] = torch.inf
    return m.min(dim=1).values > 0


def evaluate(net: Network, x: Tensor, y: Tensor, eps: float, seed: int = SEED) -> dict[str, float]:
    """Clean accuracy, accuracy under PGD (20 steps) and IBP-certified accuracy at ``eps``."""
    with torch.no_grad():
        clean = (net(x).argmax(1) == y).float().mean()
    adv = pgd(net, x, y, eps, steps=20, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        robust = (net(adv).argmax(1) == y).float().mean()
    cert = certified(net, x, y, eps).float().mean()
    return {"clean_accuracy": round(float(clean), 4), "pgd_accuracy": round(float(robust), 4),
            "certified_accuracy": round(float(cert), 4)}


# -- training ---------------------------------------------------------------------------------


def ibp_schedule(method: Method, step: int, total: int) -> tuple[float, float]:
    """``(eps, kappa)`` at ``step``: warm-up at 0 / 1, linear ramp to ``train_eps`` / 0.5."""
    start, length = method.warmup_frac * total, max(1.0, method.ramp_frac * total)
    t = min(1.0, max(0.0, (step - start) / length))
    return t * method.train_eps, 1.0 - 0.5 * t


def batch_loss(model: nn.Sequential, net: Network, name: str, method: Method, x: Tensor,
               y: Tensor, step: int, total: int, gen: torch.Generator) -> Tensor:
    if name == "pgd":
        adv = pgd(model, x, y, method.train_eps, steps=method.pgd_steps, generator=gen)
        return F.cross_entropy(model(adv), y)
    clean = F.cross_entropy(model(x), y)
    if name == "standard":
        return clean
    eps, kappa = ibp_schedule(method, step, total)
    if eps == 0:
        return clean
    worst = F.cross_entropy(-margin_lower_bounds(net, x, y, eps), y)
    return kappa * clean + (1 - kappa) * worst


def train_model(arch: str, method_name: str, quick: bool = False, seed: int = SEED,
                data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
                ) -> tuple[nn.Sequential, dict]:
    """Train one sample model; returns the module and its card."""
    method = METHODS[method_name]
    xtr, ytr, xte, yte = data if data is not None else load_split()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ARCHITECTURES[arch].build()
    net = load_network(model, input_shape=INPUT_SHAPE)  # shares the module's parameters
    params = list(model.parameters())
    epochs = method.quick_epochs if quick else method.epochs
    per_epoch = -(-len(ytr) // BATCH)
    total = epochs * per_epoch
    opt = torch.optim.Adam(params, lr=method.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(0.75 * total), int(0.9 * total)], gamma=0.3
    )
    started = time.perf_counter()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(ytr), BATCH):
            idx = order[i : i + BATCH]
            loss = batch_loss(model, net, method_name, method, xtr[idx], ytr[idx], step, total,
                              gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    seconds = time.perf_counter() - started
    card = {
        "name": f"{DATASET}_{arch}_{method_name}",
        "dataset": DATASET,
        "input_shape": list(INPUT_SHAPE),
        "input_range": [0.0, 1.0],
        "classes": CLASSES,
        "architecture": ARCHITECTURES[arch].text,
        "training": method_name,
        "eps": EPS,
        **evaluate(net, xte, yte, EPS, seed),
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "train_eps": round(method.train_eps, 4),
        "epochs": epochs,
        "test_size": len(yte),
        "evaluation": "held-out split (= gallery); PGD: 20 steps, 1 restart;"
                      " certified: IBP, last layer folded into the class margins",
    }
    return model, card


def export(model: nn.Sequential, card: dict, out_dir: Path) -> Path:
    """Write ``<name>.onnx`` (dynamic batch) and ``<name>.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{card['name']}.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros((1, *INPUT_SHAPE)),), str(path), dynamo=False, opset_version=13,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    (out_dir / f"{card['name']}.json").write_text(json.dumps(card, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                        help=f"train only this model (repeatable): {', '.join(NAMES)}")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    parser.add_argument("--quick", action="store_true", help="few epochs (for tests)")
    args = parser.parse_args(argv)
    data = load_split()
    write_gallery(args.out, data[2], data[3])
    for name in args.only or NAMES:
        _, arch, method = name.split("_")
        model, card = train_model(arch, method, quick=args.quick, data=data)
        export(model, card, args.out)
        print(f"{name}: clean {card['clean_accuracy']:.3f}  pgd {card['pgd_accuracy']:.3f}  "
              f"certified {card['certified_accuracy']:.3f}  ({card['train_seconds']:.0f} s)",
              flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the committed files were made this way; kind to shared machines
    main()
