"""Channel/spatial attention blocks that can be dropped into a backbone.

``CoordAttention`` follows Hou, Zhou and Feng, "Coordinate Attention for Efficient Mobile
Network Design", CVPR 2021 (arXiv 2103.02907), parameter for parameter like the authors'
``CoordAtt`` block, so its state dict loads with ``strict=True``. ``SqueezeExcite`` (Hu et al.,
CVPR 2018) and ``CBAM`` (Woo et al., ECCV 2018) are the baselines that paper compares against.

The SE and CBAM reductions are chosen so that 16 blocks at the CA places of MobileNetV2 add
about as many parameters as CA does (445,776): SE with reduction 20 adds 455,587 and
CBAM with reduction 20 adds 457,171 (reduction 21 would undershoot by ~3%, 20 overshoots by ~2%).
"""

import torch
from torch import nn

CA_REDUCTION = 32
CA_MIN_MIP = 8
SE_REDUCTION = 20
CBAM_REDUCTION = 20
MIN_HIDDEN = 8


class CoordAttention(nn.Module):
    """Coordinate attention: a gate factorised into a height strip and a width strip.

    This is the paper's block and nothing else. Faster implementations of the same function are
    swapped in from outside by an explicit call, with the state dict unchanged:
    ``seg.kernels.fast.optimize_for_inference`` (CPU inference) and ``seg.kernels.fast.use_fused``
    (the Triton kernels).

    Args:
        channels: input (and output) channels C.
        reduction: C is squeezed to ``mip = max(8, C // reduction)`` channels in between.
    """

    def __init__(self, channels: int, reduction: int = CA_REDUCTION) -> None:
        super().__init__()
        mip = max(CA_MIN_MIP, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mip, kernel_size=1)
        # One BN over both strips: its batch statistics pool H + W positions per sample.
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = nn.Hardswish()
        self.conv_h = nn.Conv2d(mip, channels, kernel_size=1)
        self.conv_w = nn.Conv2d(mip, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        x_h = x.mean(dim=3, keepdim=True)  # (N, C, H, 1): pooled along the width
        x_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (N, C, W, 1): pooled along the height
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = torch.sigmoid(self.conv_h(y_h))  # (N, C, H, 1)
        # A 1x1 conv commutes with the transpose, so transpose the small output, not the input.
        a_w = torch.sigmoid(self.conv_w(y_w)).transpose(2, 3)  # (N, C, 1, W)
        return x * a_h * a_w


class _ChannelMLP(nn.Sequential):
    """1x1 conv -> ReLU -> 1x1 conv, the shared MLP of SE and CBAM."""

    def __init__(self, channels: int, reduction: int) -> None:
        hidden = max(MIN_HIDDEN, channels // reduction)
        super().__init__(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: a per-channel sigmoid gate from global average pooling.

    Args:
        channels: input (and output) channels C.
        reduction: the MLP's hidden width is ``max(8, C // reduction)``.
    """

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.fc = _ChannelMLP(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))


class CBAM(nn.Module):
    """Convolutional block attention: a channel gate, then a spatial gate.

    Args:
        channels: input (and output) channels C.
        reduction: the shared MLP's hidden width is ``max(8, C // reduction)``.
        kernel_size: size of the conv that maps [mean, max] over channels to the spatial gate.
    """

    def __init__(
        self, channels: int, reduction: int = CBAM_REDUCTION, kernel_size: int = 7
    ) -> None:
        super().__init__()
        self.mlp = _ChannelMLP(channels, reduction)
        # No BN after the spatial conv (unlike the CBAM code): it would fail on 1x1 maps at batch 1.
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        x = x * torch.sigmoid(avg + mx)
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


ATTENTIONS: dict[str, type[nn.Module]] = {
    "ca": CoordAttention,
    "se": SqueezeExcite,
    "cbam": CBAM,
    "none": nn.Identity,
}


def make_attention(name: str, channels: int) -> nn.Module:
    """Build the attention block called ``name`` ("ca", "se", "cbam" or "none") for ``channels``."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; expected one of {sorted(ATTENTIONS)}")
    if name == "none":
        return nn.Identity()
    return ATTENTIONS[name](channels)
