"""MobileNetV2 encoder with an attention block in every expanded inverted residual.

Placement follows the official MobileNetV2-CA: in each block with expansion t != 1
(``features.2`` .. ``features.17``, 16 blocks) the attention sits after the depthwise
conv + BN + ReLU6 and before the linear 1x1 projection. The block's ``conv`` Sequential
becomes ``[0: pw ConvBNReLU6, 1: dw ConvBNReLU6, 2: attention, 3: pw-linear Conv2d, 4: BN]``;
``seg/weights.py`` maps checkpoint keys onto exactly this layout, so keep it.
"""

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from segmentation_models_pytorch.encoders.mobilenet import MobileNetV2Encoder

from seg.attention import CoordAttention, has_forward_hooks, make_attention
from seg.encoders import load_backbone_state
from seg.kernels.calibrate import prefers_kernel
from seg.kernels.cpu import kernels_for as cpu_kernels_for

MOBILENET_V2_OUT_CHANNELS = [3, 16, 24, 32, 96, 1280]
ATTENTION_SLOT = 2  # index in block.conv, right after the depthwise ConvBNReLU6


class MobileNetV2AttentionEncoder(MobileNetV2Encoder):
    """smp's MobileNetV2 encoder with ``attention`` inserted into each expanded block.

    Args:
        out_channels: channels of the six features, as smp's encoder table gives them.
        attention: a name understood by ``seg.attention.make_attention``.
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

    Shared with ``seg.attach`` so that smp's ``mobilenet_v2`` with attention attached has
    exactly the layout (and state-dict keys) of our named encoders.
    """
    layers = list(conv)
    if isinstance(attention, CoordAttention):
        # Its input is the depthwise ReLU6's (in-place) output, read by nothing else, so at inference
        # CA may gate it in place and skip allocating a full-size tensor per block.
        attention.inplace = True
    layers.insert(ATTENTION_SLOT, attention)
    return ExpandedConv(*layers)


class ExpandedConv(nn.Sequential):
    """An expanded block's ``conv`` with its attention slot: pw, dw, attention, pw-linear, BN.

    It runs as ``nn.Sequential`` does, except at CPU inference (eval, no grad) with CA in the slot.
    The depthwise ReLU6, CA and the pw-linear 1x1 conv then run as one C++ call of
    ``seg.kernels.cpu``: the ReLU6 is applied by CA's pooling pass, and the map is gated tile by
    tile inside the conv's matmul. Run one by one, the ReLU6 and CA's pooling each make a pass over
    the map, and the gate writes the whole gated map for the conv to read back. The ReLU6 still
    reads and writes the map once, as in the plain model: only CA's own passes are saved. Same
    function, same state dict; equal to the layer-by-layer result within fp32 rounding (the
    matmul sums in another order than the conv).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript skips this block: the kernels are not scriptable
            if not (self.training or torch.is_grad_enabled()) and _fusable(self):
                return self._forward_fused(x)
        for layer in self:
            x = layer(x)
        return x

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        expand, depthwise, attention, project, bn = self
        *conv_bn, relu6 = depthwise
        x = expand(x)
        for layer in conv_bn:
            x = layer(x)
        kernels = cpu_kernels_for(x)

        def layer_by_layer(t: torch.Tensor) -> torch.Tensor:
            return bn(project(attention(relu6(t))))

        def fused(t: torch.Tensor) -> torch.Tensor:
            return bn(kernels.forward_project(t, attention._fold_sources(), attention.bn1.eps, project.weight, True))

        # not a contiguous fp32 CPU map, no compiler, or slower than the layers on this CPU: layer by layer
        if kernels is None or not prefers_kernel(("block", tuple(x.shape), tuple(project.weight.shape)), fused,
                                                  layer_by_layer, x):
            return layer_by_layer(x)
        return fused(x)


def _fusable(conv: nn.Sequential) -> bool:
    """Whether the depthwise ReLU6, CA and the projection of ``conv`` may run as one kernel call:
    a depthwise block ending in ReLU6, CA in eval mode (its BN uses running statistics) without
    the Triton path, a bias-free 1x1 conv that acts per pixel, and no hooks on any of them that
    expect to see the layers run one by one."""
    if len(conv) != 5:
        return False
    depthwise, attention, project = conv[1], conv[ATTENTION_SLOT], conv[ATTENTION_SLOT + 1]
    if not (isinstance(depthwise, nn.Sequential) and len(depthwise) > 0 and isinstance(depthwise[-1], nn.ReLU6)):
        return False
    if not (isinstance(attention, CoordAttention) and not attention.training and not attention.fused):
        return False
    if not (isinstance(project, nn.Conv2d) and project.kernel_size == (1, 1) and project.stride == (1, 1)
            and project.padding == (0, 0) and project.groups == 1 and project.bias is None):
        return False
    return not has_forward_hooks([depthwise, depthwise[-1], attention, *attention.children(), project])
