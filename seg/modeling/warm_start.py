"""Start an attention encoder as the plain network it was loaded from: the identity warm start.

The paper pretrains every encoder on ImageNet with its attention in place (200 epochs). A cheaper
approximation starts from plain ImageNet weights (torchvision's MobileNetV2 or ResNet) and trains
a few epochs with attention. For that, the untrained blocks must not disturb what the plain
network computes, yet stay the paper's blocks. One exact construction:

- zero the weights of each gate's last conv and give it bias ``b``: every gate is then the
  constant ``sigmoid(b)``, whatever the input. CA multiplies its input by ``sigmoid(b)^2`` (its
  height and width gates), SE by ``sigmoid(b)``, CBAM by ``sigmoid(2b) * sigmoid(b)`` (its channel
  gate sums two MLP outputs, each ``b``; then its spatial gate);
- fold the inverse of that constant into the next linear layer: MobileNetV2's 1x1 projection conv
  (no bias, so the fold is exact), or the ResNet bottleneck's ``bn3`` affine in front of the gate.

At step 0 the network then computes the plain network's function (to float rounding). The last
convs' weights get gradients at once (their inputs are the non-zero bottleneck activations), and
everything before them as soon as those weights move, so every attention parameter learns.

``b = 0`` (:data:`GATE_BIAS`): the gates start at 0.5, where a freshly initialised gate sits and
where the sigmoid is steepest, so the attention learns fastest. The price is a fold factor of 4
(CA, CBAM) or 2 (SE) on the next layer's weights, which changes their scale but not the function.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

from seg.modeling.attention import CBAM, CoordAttention, SqueezeExcite
from seg.modeling.encoders.mobilenet_v2 import ATTENTION_SLOT

GATE_BIAS = 0.0


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@torch.no_grad()
def constant_gate(block: nn.Module, bias: float = GATE_BIAS) -> float:
    """Make ``block``'s gates the constant ``sigmoid(bias)``; return the factor the block now scales by."""
    if isinstance(block, CoordAttention):
        for conv in (block.conv_h, block.conv_w):
            conv.weight.zero_()
            conv.bias.fill_(bias)
        return _sigmoid(bias) ** 2
    if isinstance(block, SqueezeExcite):
        block.fc[-1].weight.zero_()
        block.fc[-1].bias.fill_(bias)
        return _sigmoid(bias)
    if isinstance(block, CBAM):
        block.mlp[-1].weight.zero_()
        block.mlp[-1].bias.fill_(bias)
        block.spatial.weight.zero_()
        block.spatial.bias.fill_(bias)
        return _sigmoid(2 * bias) * _sigmoid(bias)
    raise TypeError(f"no constant-gate construction for {type(block).__name__}")


@torch.no_grad()
def identity_warm_start(encoder: nn.Module, bias: float = GATE_BIAS) -> int:
    """Turn every attention block of a MobileNetV2 or ResNet attention encoder into an exact identity
    of the network around it (see the module docstring); returns how many blocks were set."""
    count = 0
    for module in encoder.modules():
        if isinstance(module, InvertedResidual) and len(module.conv) == 5:  # pw, dw, attention, proj, BN
            attention, projection = module.conv[ATTENTION_SLOT], module.conv[ATTENTION_SLOT + 1]
            projection.weight.div_(constant_gate(attention, bias))
            count += 1
        elif isinstance(getattr(module, "attention", None), (CoordAttention, SqueezeExcite, CBAM)):
            norm = module.bn3 if hasattr(module, "bn3") else module.bn2  # Bottleneck / BasicBlock
            scale = constant_gate(module.attention, bias)
            norm.weight.div_(scale)
            norm.bias.div_(scale)
            count += 1
    if count == 0:
        raise ValueError(f"{type(encoder).__name__} holds no attention block in a MobileNetV2 or ResNet slot")
    return count
