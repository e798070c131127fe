"""The first layer's neurons as an affine function of a feature mask.

The "first-layer neurons" are the inputs of the network's first ReLU: the output of its first
``Linear``/``Conv2d``, composed with whatever affine layers surround it (an input
normalisation or ``Flatten`` before it, a folded BatchNorm after it). Everything before that
ReLU must be affine, so the masked pre-activations are exactly linear in the mask.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from skimage.segmentation import slic
from torch import Tensor

from app.errors import InvalidInputError, UnsupportedModelError
from app.layers import AffineLayer, Conv2d, Linear
from app.network import INPUT, Network

MNIST_FEATURES = 28 * 28
MAX_PATCH_GROUPS = 256
SUPERPIXEL = "superpixel"
BLURRED = "blurred"
SLIC_COMPACTNESS = 0.1  # on intensities scaled to [0, 1]: boundaries follow edges, sizes even


def first_relu(net: Network) -> int:
    """Index of the first ReLU node, after checking that an affine chain with a
    ``Linear``/``Conv2d`` leads to it from the input."""
    if not net.relu_indices:
        raise UnsupportedModelError("SMT saliency needs a ReLU after the first affine layer")
    relu = net.relu_indices[0]
    chain, node = [], net.inputs[relu][0]
    while node != INPUT:
        layer = net.layers[node]
        if not isinstance(layer, AffineLayer) or len(net.inputs[node]) != 1:
            raise UnsupportedModelError(
                f"node {node} ({layer.kind}) before the first ReLU is not affine; SMT saliency "
                "encodes only an affine first layer")
        chain.append(layer)
        node = net.inputs[node][0]
    if not any(isinstance(layer, (Linear, Conv2d)) for layer in chain):
        raise UnsupportedModelError("no Linear or Conv2d layer before the first ReLU")
    return relu


def affine_chain(net: Network, relu: int) -> list[AffineLayer]:
    """The affine layers from the input to ``relu``'s input, in application order."""
    chain, node = [], net.inputs[relu][0]
    while node != INPUT:
        chain.append(net.layers[node])
        node = net.inputs[node][0]
    return chain[::-1]


def pre_activations(net: Network, relu: int, x: Tensor) -> Tensor:
    """The first-layer neurons of a batch ``x``, flattened to ``[B, neurons]``."""
    return net.pre_activations(x)[relu].reshape(x.shape[0], -1)


def linear_part(chain: list[AffineLayer], delta: Tensor) -> Tensor:
    """``A delta`` for the composed map ``A`` of the chain (biases left out), ``[B, neurons]``."""
    for layer in chain:
        delta = layer.linear(delta)
    return delta.reshape(delta.shape[0], -1)


def spatial_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(channels, height, width)`` used for patches and crops.

    Image inputs ``(C, H, W)`` keep their shape; a flat input whose size is a perfect square
    (MNIST's 784 as ``(784, 1)``) is read as a one-channel square image; anything else is a
    single row.
    """
    if len(input_shape) == 3 and min(input_shape[1:]) > 1:
        return input_shape  # type: ignore[return-value]
    n = math.prod(input_shape)
    side = math.isqrt(n)
    return (1, side, side) if side * side == n else (1, 1, n)


def auto_patch(input_shape: tuple[int, ...]) -> int:
    """Single features up to MNIST size, else the smallest square patch giving <= 256 groups."""
    _, h, w = spatial_shape(input_shape)
    if h * w <= MNIST_FEATURES:
        return 1
    patch = 2
    while math.ceil(h / patch) * math.ceil(w / patch) > MAX_PATCH_GROUPS:
        patch += 1
    return patch


def feature_groups(input_shape: tuple[int, ...], patch: int,
                   device: torch.device | str | None = None) -> Tensor:
    """Group id of every input element (shaped like one input): ``patch x patch`` squares of
    spatial positions, all channels of a position together."""
    c, h, w = spatial_shape(input_shape)
    if patch < 1 or patch > max(h, w):
        raise InvalidInputError(f"patch size must be between 1 and {max(h, w)}, got {patch}")
    rows = torch.arange(h, device=device) // patch
    cols = torch.arange(w, device=device) // patch
    ids = rows[:, None] * math.ceil(w / patch) + cols[None, :]
    return ids.expand(c, h, w).reshape(input_shape).contiguous()


def superpixel_groups(x: Tensor) -> Tensor:
    """Group id of every input element from SLIC superpixels of ``x`` itself (scikit-image),
    all channels of a position together: one mask bit per region of similar intensity.

    About four pixels per superpixel, at most 256; deterministic (SLIC starts on a grid).
    """
    shape = tuple(x.shape)
    c, h, w = spatial_shape(shape)
    image = x.detach().cpu().double().reshape(c, h, w).numpy()
    span = image.max() - image.min()
    image = (image - image.min()) / (span if span > 0 else 1.0)
    segments = slic(image if c > 1 else image[0], n_segments=min(MAX_PATCH_GROUPS,
                                                                 max(1, h * w // 4)),
                    compactness=SLIC_COMPACTNESS, channel_axis=0 if c > 1 else None,
                    convert2lab=False, start_label=0, enforce_connectivity=True)
    ids = np.unique(segments, return_inverse=True)[1].reshape(h, w)
    return torch.from_numpy(ids).to(x.device).expand(c, h, w).reshape(shape).contiguous()


def group_sum(values: Tensor, groups: Tensor) -> Tensor:
    """Sum of ``values`` (shaped like one input) within each group, ``[num_groups]``."""
    n = int(groups.max()) + 1
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, groups.reshape(-1),
                                                         values.reshape(-1))


def masked_input(x: Tensor, baseline: Tensor, groups: Tensor, group_mask: Tensor) -> Tensor:
    """``mask ? x : baseline`` for a batch of group masks ``[B, num_groups]``."""
    keep = group_mask[:, groups].to(x.dtype)
    return baseline + keep * (x - baseline)


def mask_coefficients(
    net: Network, relu: int, x: Tensor, baseline: Tensor, groups: Tensor, neurons: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(coeff [groups, neurons], const [neurons])`` with
    ``pre(masked) = const + mask @ coeff`` for the chosen neuron indices.

    ``const`` is the baseline's pre-activation and ``coeff[g] = A ((x - baseline) on g)``: each
    group's effect is measured from the baseline, so the form is exact for any baseline.
    """
    chain = affine_chain(net, relu)
    n = int(groups.max()) + 1
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    delta = x - baseline
    coeff = torch.cat([
        linear_part(chain, masked_input(delta, torch.zeros_like(x), groups, eye[i:i + 64]))[
            :, neurons]
        for i in range(0, n, 64)
    ])
    const = pre_activations(net, relu, baseline[None])[0, neurons]
    return coeff, const


def make_baseline(x: Tensor, baseline: float | str | np.ndarray | Tensor) -> Tensor:
    """The value of masked-out features, shaped like ``x``: a constant, ``"blurred"`` (``x``
    under a Gaussian blur of sigma = an eighth of the image side, per channel; scipy), or an
    array of one value per input element."""
    if isinstance(baseline, str):
        if baseline != BLURRED:
            raise InvalidInputError(f"baseline must be a number, an array or {BLURRED!r}")
        c, h, w = spatial_shape(tuple(x.shape))
        image = x.detach().cpu().double().reshape(c, h, w).numpy()
        sigma = (0, max(h, w) / 8, max(h, w) / 8)
        blurred = gaussian_filter(image, sigma, mode="nearest")
        return torch.from_numpy(blurred).to(x.device, x.dtype).reshape(x.shape)
    if isinstance(baseline, (int, float)):
        if not math.isfinite(baseline):
            raise InvalidInputError("baseline must be finite")
        return torch.full_like(x, float(baseline))
    values = np.asarray(baseline.detach().cpu() if isinstance(baseline, Tensor) else baseline,
                        dtype=np.float64)
    if values.size != x.numel() or not np.isfinite(values).all():
        raise InvalidInputError(
            f"a per-element baseline needs {x.numel()} finite values, got {values.size}")
    return torch.as_tensor(values, device=x.device).reshape(x.shape).to(x.dtype)
