"""Put our paper-faithful CA / SE / CBAM blocks into an existing smp or timm encoder.

Where each block goes follows the block type, as the CA author answers on the official
CoordAttention repository (and as SE-Net places SE):

- inverted residual / depthwise-separable blocks (timm EfficientNet, MobileNetV3, MNASNet, MixNet;
  smp ``mobilenet_v2``): after the depthwise 3x3, before the linear 1x1 projection;
- ResNet bottleneck / basic blocks (timm ResNet, ResNet-D, ResNeXt; smp ``resnet*``): after the
  last conv + BN, before the residual add;
- RegNet blocks: their own SE slot, after the grouped 3x3.

timm keeps a ``se`` slot at exactly these places (``nn.Identity`` or None when empty, an SE in
EfficientNet, MobileNetV3 and RegNetY); it is replaced, so an existing SE is never stacked with the
new block. smp's own MobileNetV2 and ResNet get the slot of our named encoders
(``seg/encoders``), so ``mobilenet_v2`` + "ca" is ``mobilenet_v2_ca`` key for key.

Each block is sized from the real channel count at its slot, and its *stage* (the encoder level
1..5 whose feature, at stride ``2**stage``, it feeds) is read from one probe forward: the order in
which the slots and the encoder's feature modules run. Strides cannot tell stages apart once
smp has dilated the encoder for output stride 8/16; the order can.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from segmentation_models_pytorch.encoders.mobilenet import MobileNetV2Encoder
from segmentation_models_pytorch.encoders.resnet import ResNetEncoder
from timm.models import _efficientnet_blocks as timm_eff
from timm.models import regnet as timm_regnet
from timm.models import resnet as timm_resnet
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual as TorchvisionInvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

from seg.config import ConfigError
from seg.modeling.attention import ATTENTIONS, make_attention
from seg.modeling.encoders import mobilenet_v2 as seg_mbv2
from seg.modeling.encoders import resnet as seg_resnet

# timm blocks whose ``se`` attribute sits where the CA author places attention (module docstring).
TIMM_SE_BLOCKS = (
    timm_eff.DepthwiseSeparableConv, timm_eff.InvertedResidual, timm_eff.EdgeResidual,  # CondConv is an IR
    timm_resnet.BasicBlock, timm_resnet.Bottleneck,
    timm_regnet.Bottleneck, timm_regnet.PreBottleneck,
)
PROBE_SIZE = 64
MAX_LISTED_TYPES = 12


class UnsupportedEncoderError(ConfigError):
    """The encoder has no block in which this module knows where attention belongs."""


@dataclass
class Placement:
    """One attention block put into the encoder."""

    name: str  # the block's qualified name inside the encoder
    block: str  # its type, e.g. "InvertedResidual"
    channels: int
    stage: Optional[int]  # encoder level 1..5 (stride 2**stage) the block feeds; None if unknown
    replaced: Optional[str]  # type of what held the slot before (e.g. "SqueezeExcite"); None if empty


@dataclass
class AttachReport:
    """What ``attach_attention`` changed.

    ``new_keys`` are the new blocks' state-dict keys (relative to the encoder): a checkpoint of
    the original backbone cannot hold them, so they are missing from it on purpose.
    ``removed_keys`` belonged to the modules they replaced (an existing SE, say).
    """

    kind: str
    placements: list[Placement] = field(default_factory=list)
    new_params: int = 0  # parameters of the new blocks
    removed_params: int = 0  # parameters of the modules they replaced
    new_keys: list[str] = field(default_factory=list)
    removed_keys: list[str] = field(default_factory=list)

    @property
    def added_params(self) -> int:
        """Net change of the encoder's parameter count."""
        return self.new_params - self.removed_params

    @property
    def count(self) -> int:
        return len(self.placements)

    @property
    def places(self) -> list[str]:
        return [p.name for p in self.placements]

    @property
    def summary(self) -> str:
        replaced = Counter(p.replaced for p in self.placements if p.replaced)
        stages = sorted({p.stage for p in self.placements if p.stage is not None})
        return (f"attention {self.kind!r} in {self.count} blocks (stages {stages}), "
                f"{self.added_params:+,} params; replaced {dict(replaced) or 'nothing'}; "
                f"{len(self.new_keys)} new tensors not in any checkpoint of the original backbone")


@dataclass
class _Slot:
    name: str
    block: nn.Module
    key_prefix: str  # state-dict prefix of whatever the slot holds
    get: Callable[[], Optional[nn.Module]]
    put: Callable[[Optional[nn.Module]], None]
    channels: Optional[int] = None
    stage: Optional[int] = None


def _timm_slot(name: str, block: nn.Module) -> _Slot:
    """timm's ``se`` slot; empty is whatever timm put there (None in ResNets, else Identity)."""
    return _Slot(name, block, f"{name}.se", lambda: block.se, lambda module: setattr(block, "se", module))


def _resnet_slot(name: str, block: nn.Module) -> _Slot:
    """The ``attention`` slot of our ResNet blocks; a plain torchvision block is given one first."""
    def put(module: Optional[nn.Module]) -> None:
        seg_resnet.add_attention_slot(block)
        block.attention = nn.Identity() if module is None else module

    return _Slot(name, block, f"{name}.attention", lambda: getattr(block, "attention", None), put)


def _mobilenet_v2_slot(name: str, block: nn.Module) -> _Slot:
    """The slot of our MobileNetV2 encoders, ``conv[2]``; smp's plain blocks get it inserted."""
    original = block.conv

    def get() -> Optional[nn.Module]:
        return block.conv[seg_mbv2.ATTENTION_SLOT] if len(block.conv) == 5 else None

    def put(module: Optional[nn.Module]) -> None:
        if module is None:  # only for a block built without the slot: its layout and keys as smp made them
            block.conv = original
        elif len(block.conv) == 5:
            block.conv[seg_mbv2.ATTENTION_SLOT] = module
        else:
            block.conv = seg_mbv2.with_attention_slot(block.conv, module)

    return _Slot(name, block, f"{name}.conv.{seg_mbv2.ATTENTION_SLOT}", get, put)


def _find_slots(encoder: nn.Module) -> list[_Slot]:
    slots = []
    for name, module in encoder.named_modules():
        if isinstance(module, TIMM_SE_BLOCKS):
            slots.append(_timm_slot(name, module))
        elif isinstance(encoder, MobileNetV2Encoder) and isinstance(module, TorchvisionInvertedResidual):
            if len(module.conv) in (4, 5):  # expanded blocks only, as in the official MobileNetV2-CA
                slots.append(_mobilenet_v2_slot(name, module))
        elif isinstance(encoder, ResNetEncoder) and isinstance(module, (BasicBlock, Bottleneck)):
            slots.append(_resnet_slot(name, module))
    return slots


def _feature_modules(encoder: nn.Module) -> tuple[list[nn.Module], int]:
    """Modules whose outputs are the encoder's features, in order, and the stage of the first."""
    if isinstance(encoder, MobileNetV2Encoder):
        return [encoder.features[i] for i in encoder._out_indexes], 1
    if isinstance(encoder, ResNetEncoder):
        return [encoder.relu, encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4], 1
    model = getattr(encoder, "model", None)
    info = getattr(model, "feature_info", None)
    if info is None:
        return [], 1
    first = 2 if getattr(encoder, "_is_transformer_style", False) else 1
    return [model.get_submodule(n) for n in info.module_name()], first


class _Probe(nn.Module):
    """Identity that records the channels it sees and when it ran."""

    def __init__(self, slot: _Slot, events: list) -> None:
        super().__init__()
        self.slot, self.events = slot, events

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot.channels is None:
            self.slot.channels = x.shape[1]
            self.events.append(self.slot)
        return x


def _probe(encoder: nn.Module, slots: list[_Slot]) -> None:
    """Fill each slot's channels and stage from one eval-mode forward with probes in the slots."""
    originals = [slot.get() for slot in slots]
    events: list = []
    for slot in slots:
        slot.put(_Probe(slot, events))
    features, first = _feature_modules(encoder)
    hooks = [m.register_forward_hook(lambda *_, k=k: events.append(k)) for k, m in enumerate(features)]
    in_channels = getattr(encoder, "_in_channels", 3)
    was_training = encoder.training
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(1, in_channels, PROBE_SIZE, PROBE_SIZE))
    finally:
        encoder.train(was_training)
        for hook in hooks:
            hook.remove()
        for slot, original in zip(slots, originals):
            slot.put(original)
    done = 0  # feature modules finished so far: a slot feeds the next one to finish
    for event in events:
        if isinstance(event, int):
            done = max(done, event + 1)
        elif features:
            event.stage = first + done


def _block_types(encoder: nn.Module) -> list[str]:
    """Type names of the modules held in containers: what a backbone's blocks usually are."""
    types = {type(child).__name__ for m in encoder.modules() if isinstance(m, (nn.Sequential, nn.ModuleList))
             for child in m.children() if next(child.children(), None) is not None}
    return sorted(types - {"Sequential", "ModuleList"})[:MAX_LISTED_TYPES]


def _encoder_name(encoder: nn.Module) -> str:
    name = getattr(encoder, "name", None)
    return f"tu-{name}" if isinstance(name, str) and hasattr(encoder, "model") else type(encoder).__name__


def attach_attention(encoder: nn.Module, kind: str, stages: Optional[int] = None) -> AttachReport:
    """Put a ``kind`` block ("ca", "se", "cbam"; "none" empties the slots) into ``encoder``, in place.

    Args:
        encoder: an smp encoder: a ``tu-`` timm encoder of a supported family, or smp's own
            ``mobilenet_v2`` / ``resnet*`` (also our ``*_ca/_se/_cbam`` ones: their blocks are replaced).
        kind: a name of ``seg.modeling.attention.ATTENTIONS``.
        stages: only the deepest ``stages`` encoder levels that hold blocks get attention; None for all.

    Raises:
        UnsupportedEncoderError: no block of a known type, or ``stages`` on an encoder whose
            feature levels are unknown. The encoder is then left unchanged.
    """
    if kind not in ATTENTIONS:
        raise ConfigError(f"attention {kind!r} is not one of {sorted(ATTENTIONS)}")
    if stages is not None and stages < 1:
        raise ConfigError(f"attention stages must be >= 1 (the deepest N stages), got {stages}")
    slots = _find_slots(encoder)
    if slots:
        _probe(encoder, slots)
        slots = [s for s in slots if s.channels is not None]  # the rest never run at this encoder depth
    if not slots:
        raise UnsupportedEncoderError(
            f"encoder {_encoder_name(encoder)}: no block where attention can be placed runs in it; found "
            f"block types {_block_types(encoder)}; supported: timm EfficientNet/MobileNetV3/MNASNet/MixNet/"
            "ResNet/RegNet blocks, smp mobilenet_v2 and resnet*")
    if stages is not None:
        if any(s.stage is None for s in slots):
            raise UnsupportedEncoderError(
                f"encoder {_encoder_name(encoder)}: its feature levels are unknown, so attention "
                "stages cannot be chosen; leave the stages option unset")
        deepest = max(s.stage for s in slots)
        slots = [s for s in slots if s.stage > deepest - stages]
    report = AttachReport(kind)
    for slot in slots:
        old, new = slot.get(), make_attention(kind, slot.channels)
        if old is not None:
            report.removed_keys += [f"{slot.key_prefix}.{k}" for k in old.state_dict()]
            report.removed_params += sum(p.numel() for p in old.parameters())
        slot.put(new)
        report.new_keys += [f"{slot.key_prefix}.{k}" for k in new.state_dict()]
        report.new_params += sum(p.numel() for p in new.parameters())
        replaced = None if old is None or type(old) is nn.Identity else type(old).__name__
        report.placements.append(Placement(slot.name, type(slot.block).__name__, slot.channels, slot.stage, replaced))
    encoder.seg_attention = {"kind": kind, "stages": stages}  # seg.modeling.hub saves it, so a reload can redo this call
    return report
