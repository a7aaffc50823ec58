"""ResNet-50/101 encoders with an attention block in every bottleneck (and the same slot for
smp's plain ResNets, filled by ``seg.modeling.attach``).

As the CA author advises (and as SE-ResNet does), the attention sits after the last
1x1 conv + BN (``bn3``) and before the residual add. It lives in a new child
``attention`` of each block, so every torchvision ResNet key (``layer1.0.bn3.weight``,
...) keeps its name: a torchvision/smp checkpoint loads with only the
``*.attention.*`` keys missing.
"""

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from segmentation_models_pytorch.encoders.resnet import ResNetEncoder

from seg.modeling.attention import make_attention
from seg.modeling.encoders import load_backbone_state

RESNET_OUT_CHANNELS = [3, 64, 256, 512, 1024, 2048]
RESNET_LAYERS = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}


class AttentionBottleneck(Bottleneck):
    """torchvision's Bottleneck with an ``attention`` slot applied after ``bn3``.

    The slot holds ``nn.Identity`` until the encoder fills it, because torchvision's ResNet
    builds blocks with a fixed argument list that has no room for the attention type.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attention: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.attention(self.bn3(self.conv3(out)))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class AttentionBasicBlock(BasicBlock):
    """torchvision's BasicBlock with an ``attention`` slot after ``bn2``, before the residual add."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attention: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attention(self.bn2(self.conv2(out)))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


WITH_SLOT = {Bottleneck: AttentionBottleneck, BasicBlock: AttentionBasicBlock}


def add_attention_slot(block: nn.Module) -> nn.Module:
    """Turn a torchvision Bottleneck/BasicBlock into its ``Attention*`` twin in place (slot empty).

    Only the class changes and an ``attention`` child (Identity) appears: every existing key and
    weight stays, so a trained plain block keeps computing what it did.
    """
    if type(block) in WITH_SLOT:
        block.__class__ = WITH_SLOT[type(block)]
        block.attention = nn.Identity()
    return block


def slot_channels(block: nn.Module) -> int:
    """Channels at the attention slot: the output of the block's last BN."""
    return (block.bn3 if isinstance(block, Bottleneck) else block.bn2).num_features


class ResNetAttentionEncoder(ResNetEncoder):
    """smp's ResNet encoder built from ``AttentionBottleneck`` blocks.

    Args:
        out_channels: channels of the six features, as smp's encoder table gives them.
        layers: bottlenecks per stage, e.g. [3, 4, 6, 3] for ResNet-50.
        attention: a name understood by ``seg.modeling.attention.make_attention``.
        depth: number of downsampling stages to run (1..5).
        output_stride: 32, or 8/16 after ``make_dilated``.
    """

    # Checked by tests/test_encoders.py (jit.script, export.export, compile with fullgraph).
    _is_torch_scriptable = True
    _is_torch_exportable = True
    _is_torch_compilable = True

    def __init__(
        self,
        out_channels: list[int],
        layers: list[int],
        attention: str,
        depth: int = 5,
        output_stride: int = 32,
    ) -> None:
        super().__init__(
            out_channels=out_channels,
            depth=depth,
            output_stride=output_stride,
            block=AttentionBottleneck,
            layers=layers,
        )
        self.attention_name = attention
        blocks = [m for m in self.modules() if isinstance(m, AttentionBottleneck)]
        for block in blocks:
            block.attention = make_attention(attention, slot_channels(block))

    def load_state_dict(self, state_dict: dict, **kwargs):
        """Load backbone weights (``fc.*`` dropped); returns missing/unexpected keys."""
        return load_backbone_state(self, state_dict, "fc.", **kwargs)
