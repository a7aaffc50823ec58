"""smp's hub API (``model.save_pretrained(dir)``, ``smp.from_pretrained(dir)``) for our models.

smp rebuilds a saved model from the class name and constructor arguments in ``config.json``. That
is not enough for ours: :func:`seg.modeling.models.build_model` returns a ``SegModel`` that smp does not
know, and :func:`seg.attach_attention` changes an smp model after construction. ``import seg``
(which calls :func:`install`) makes ``save_pretrained`` also write a ``"_seg"`` entry (the
``build_model`` arguments, or the attention that was attached), and makes ``smp.from_pretrained``
read it (:func:`from_pretrained`). Models saved without that entry load as smp loads them.

Without ``import seg``, smp fails on these directories with, for a ``build_model`` model,
``AttributeError: module 'segmentation_models_pytorch' has no attribute 'SegModel'``; for our
encoders (``mobilenet_v2_ca``...) ``KeyError: "Wrong encoder name `mobilenet_v2_ca`, supported
encoders: [...]"``; for attention attached to an smp encoder, a "Mismatched keys" warning, then
``RuntimeError: Error(s) in loading state_dict for Unet: Missing key(s) in state_dict: ...``.
The fix for each is ``import seg`` first, or ``seg.from_pretrained(dir)``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base.hub_mixin import SMPHubMixin
from torch import nn

SEG_KEY = "_seg"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def _record(model: nn.Module) -> dict:
    """The ``"_seg"`` entry for ``model``: empty for a plain smp model."""
    recipe = getattr(model, "build_recipe", None)
    if recipe is not None:
        return {"build_model": recipe}
    attention = getattr(getattr(model, "encoder", None), "seg_attention", None)
    return {"attention": attention} if attention is not None else {}


def _save_with_record(save: callable):
    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        record = _record(self)
        if not record:
            return save(self, save_directory, *args, **kwargs)
        saved = self._hub_mixin_config  # SegModel's constructor takes modules, so the mixin stored nothing
        self._hub_mixin_config = {**(saved or {}), SEG_KEY: record}
        try:
            return save(self, save_directory, *args, **kwargs)
        finally:
            self._hub_mixin_config = saved

    save_pretrained._seg_wrapped = True
    return save_pretrained


def from_pretrained(path: str | Path, *args, **kwargs) -> nn.Module:
    """Rebuild a model saved by ``save_pretrained`` in folder ``path`` (eval mode); other ids go to smp."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        return _SMP_FROM_PRETRAINED(path, *args, **kwargs)
    config = json.loads((folder / CONFIG_FILE).read_text())
    record = config.get(SEG_KEY)
    if record is None:
        return _SMP_FROM_PRETRAINED(path, *args, **kwargs)
    from safetensors.torch import load_model

    from seg.modeling.attach import attach_attention
    from seg.modeling.models import build_model

    if "build_model" in record:
        recipe = record["build_model"]
        model = build_model(**{**recipe, "decoder_atrous_rates": tuple(recipe["decoder_atrous_rates"])})
    else:
        arguments = {k: v for k, v in config.items() if not k.startswith("_")}
        model = getattr(smp, config["_model_class"])(**{**arguments, "encoder_weights": None})  # weights: the file
        attach_attention(model.encoder, **record["attention"])
    load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    return model.eval()


_SMP_FROM_PRETRAINED = smp.from_pretrained


def install() -> None:
    """Make smp's ``save_pretrained`` / ``from_pretrained`` handle our models (idempotent)."""
    if not getattr(SMPHubMixin.save_pretrained, "_seg_wrapped", False):
        SMPHubMixin.save_pretrained = _save_with_record(SMPHubMixin.save_pretrained)
    smp.from_pretrained = from_pretrained
