"""An encoder with a classification head, for ImageNet-style pretraining (``seg.tools.pretrain``).

The head is MobileNetV2's: global average pool, dropout, linear. Only the encoder's state dict
leaves the run (``encoder.pth``); it is what ``model.encoder_weights`` loads into segmentation.
"""

from __future__ import annotations

import torch
from torch import nn


class EncoderClassifier(nn.Module):
    """``encoder`` (an smp encoder) -> its deepest feature -> pool -> dropout -> linear.

    Args:
        encoder: an smp encoder; its ``out_channels[-1]`` is the head's input width.
        num_classes: classes of the classification set.
        dropout: dropout before the linear layer (MobileNetV2 uses 0.2).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(encoder.out_channels[-1], num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)  # torchvision's MobileNetV2 classifier init
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.encoder(x)[-1]).flatten(1)))
