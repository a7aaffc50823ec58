"""Adds our encoders to smp's encoder table, so ``smp.create_model`` and ``get_encoder`` find them.

Imported by ``seg/__init__.py``; registering again is harmless (a dict update).
"""

from segmentation_models_pytorch import encoders as smp_encoders

from seg.modeling.encoders.mobilenet_v2 import MOBILENET_V2_OUT_CHANNELS, MobileNetV2AttentionEncoder
from seg.modeling.encoders.resnet import RESNET_LAYERS, RESNET_OUT_CHANNELS, ResNetAttentionEncoder

ATTENTION_NAMES = ("ca", "se", "cbam")


def _entry(encoder: type, **params) -> dict:
    # No pretrained_settings: weights are local files loaded by seg/modeling/weights.py, never downloads.
    return {"encoder": encoder, "pretrained_settings": {}, "params": params}


def _build_table() -> dict[str, dict]:
    table = {}
    for attention in ATTENTION_NAMES:
        table[f"mobilenet_v2_{attention}"] = _entry(
            MobileNetV2AttentionEncoder, out_channels=MOBILENET_V2_OUT_CHANNELS, attention=attention
        )
        for arch, layers in RESNET_LAYERS.items():
            table[f"{arch}_{attention}"] = _entry(
                ResNetAttentionEncoder,
                out_channels=RESNET_OUT_CHANNELS,
                layers=layers,
                attention=attention,
            )
    return table


ENCODERS = _build_table()
ENCODER_NAMES = tuple(ENCODERS)


def register() -> None:
    """Add (or re-add) every name in ENCODER_NAMES to ``segmentation_models_pytorch.encoders.encoders``."""
    smp_encoders.encoders.update(ENCODERS)


register()
