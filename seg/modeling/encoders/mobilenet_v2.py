"""MobileNetV2 encoder with an attention block in every expanded inverted residual.

Placement follows the official MobileNetV2-CA: in each block with expansion t != 1
(``features.2`` .. ``features.17``, 16 blocks) the attention sits after the depthwise
conv + BN + ReLU6 and before the linear 1x1 projection. The block's ``conv`` Sequential
becomes ``[0: pw ConvBNReLU6, 1: dw ConvBNReLU6, 2: attention, 3: pw-linear Conv2d, 4: BN]``;
``seg/modeling/weights.py`` maps checkpoint keys onto exactly this layout, so keep it.
"""

from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from segmentation_models_pytorch.encoders.mobilenet import MobileNetV2Encoder

from seg.modeling.attention import make_attention
from seg.modeling.encoders import load_backbone_state

MOBILENET_V2_OUT_CHANNELS = [3, 16, 24, 32, 96, 1280]
ATTENTION_SLOT = 2  # index in block.conv, right after the depthwise ConvBNReLU6


class MobileNetV2AttentionEncoder(MobileNetV2Encoder):
    """smp's MobileNetV2 encoder with ``attention`` inserted into each expanded block.

    Args:
        out_channels: channels of the six features, as smp's encoder table gives them.
        attention: a name understood by ``seg.modeling.attention.make_attention``.
        depth: number of downsampling stages to run (1..5).
        output_stride: 32, or 8/16 after ``make_dilated``.
    """

    # Checked by tests/test_encoders.py (jit.script, export.export, compile with fullgraph).
    _is_torch_scriptable = True
    _is_torch_exportable = True
    _is_torch_compilable = True

    def __init__(
        self, out_channels: list[int], attention: str, depth: int = 5, output_stride: int = 32
    ) -> None:
        super().__init__(out_channels=out_channels, depth=depth, output_stride=output_stride)
        self.attention_name = attention
        for block in self.features:
            if isinstance(block, InvertedResidual) and len(block.conv) == 4:
                block.conv = with_attention_slot(block.conv, make_attention(attention, slot_channels(block.conv)))

    def load_state_dict(self, state_dict: dict, **kwargs):
        """Load backbone weights (``classifier.*`` dropped); returns missing/unexpected keys."""
        return load_backbone_state(self, state_dict, "classifier.", **kwargs)


def slot_channels(conv: nn.Sequential) -> int:
    """Channels at the attention slot of an expanded block's ``conv`` (with or without the slot)."""
    return conv[1][0].out_channels  # the depthwise conv works in the expanded space


def with_attention_slot(conv: nn.Sequential, attention: nn.Module) -> nn.Sequential:
    """Return ``conv`` (pw, dw, pw-linear, BN) with ``attention`` inserted at ATTENTION_SLOT.

    Shared with ``seg.modeling.attach`` so that smp's ``mobilenet_v2`` with attention attached has
    exactly the layout (and state-dict keys) of our named encoders.
    """
    layers = list(conv)
    layers.insert(ATTENTION_SLOT, attention)
    return ExpandedConv(*layers)


class ExpandedConv(nn.Sequential):
    """An expanded block's ``conv`` with its attention slot: pw, dw, attention, pw-linear, BN.

    A plain ``nn.Sequential``; ``seg.kernels.fast.optimize_for_inference`` swaps in its fused
    CPU inference path where CA fills the slot.
    """
