"""Attention-equipped encoders for segmentation-models-pytorch (registered by ``register``)."""

from torch import nn


def load_backbone_state(encoder: nn.Module, state_dict: dict, head_prefix: str, **kwargs):
    """``nn.Module.load_state_dict`` without the classifier keys under ``head_prefix``.

    smp's encoders drop those keys too but return None and pop from the caller's dict;
    this returns the missing/unexpected-keys report and leaves ``state_dict`` untouched.
    """
    kept = {k: v for k, v in state_dict.items() if not k.startswith(head_prefix)}
    return nn.Module.load_state_dict(encoder, kept, **kwargs)
