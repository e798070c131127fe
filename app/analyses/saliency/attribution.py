"""Gradient attributions from Captum: neuron selection and the two baselines.

* Layer Integrated Gradients on the first ReLU's input ranks the first-layer neurons by how
  much they carry the target class; SMUG constrains the top ones.
* Input-space Integrated Gradients and SmoothGrad are the gradient-only saliency maps the
  SMT mask is graded against.
"""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients, NoiseTunnel, Saliency
from torch import Tensor

from app.network import Network

IG_STEPS = 64
SMOOTHGRAD_SAMPLES = 32
SMOOTHGRAD_NOISE = 0.15  # noise std as a fraction of the input's value range (Smilkov et al.)


def neuron_ig(net: Network, relu: int, x: Tensor, baseline: Tensor, target: int) -> Tensor:
    """IG attribution of the target logit to each first-layer neuron, flattened."""
    lig = LayerIntegratedGradients(net, net.layers[relu])
    attr = lig.attribute(x[None], baselines=baseline[None], target=target, n_steps=IG_STEPS,
                         attribute_to_layer_input=True)
    return attr.detach().reshape(-1)


def input_ig(net: Network, x: Tensor, baseline: Tensor, target: int) -> Tensor:
    """Input-space Integrated Gradients (shaped like ``x``)."""
    attr = IntegratedGradients(net).attribute(x[None], baselines=baseline[None], target=target,
                                              n_steps=IG_STEPS)
    return attr.detach()[0]


def smoothgrad(net: Network, x: Tensor, target: int, seed: int = 0) -> Tensor:
    """SmoothGrad: absolute input gradients averaged over Gaussian-noised copies of ``x``."""
    spread = float(x.max() - x.min()) or 1.0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        attr = NoiseTunnel(Saliency(net)).attribute(
            x[None], nt_type="smoothgrad", nt_samples=SMOOTHGRAD_SAMPLES,
            nt_samples_batch_size=SMOOTHGRAD_SAMPLES, stdevs=SMOOTHGRAD_NOISE * spread,
            target=target, abs=True)
    return attr.detach()[0]
