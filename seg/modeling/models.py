"""Segmentation models: smp architectures on our attention encoders, plus an optional aux head.

Contract of ``build_model``: it returns a ``SegModel``. ``model(x)`` gives logits
(N, num_classes, H, W) at input resolution, except in train mode with ``aux_loss=True``, where
it gives ``(logits, aux_logits)``, both at input resolution. State-dict keys are smp's
(``encoder.*``, ``decoder.*``, ``segmentation_head.*``) plus ``aux_head.*`` when the aux head
is on, so weights move between smp models and ours, and ``seg/modeling/weights.py`` loads a backbone
into ``model.encoder``.
"""

import difflib
import logging
from dataclasses import replace
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationModel
from segmentation_models_pytorch.base.utils import is_torch_compiling
from torch import nn

from seg.config import Config, ConfigError, ModelConfig
from seg.kernels.fast import optimize_for_inference, use_fused
from seg.modeling.attach import AttachReport, attach_attention
import seg.modeling.encoders.register  # noqa: F401  (our encoder names must be in smp's table)
from seg.runs.checkpoint import load_model_weights

log = logging.getLogger(__name__)

DEEPLAB_ARCHS = ("deeplabv3", "deeplabv3plus")
ARCHS = DEEPLAB_ARCHS + ("unet", "fpn")
AUX_DROPOUT = 0.1
TIMM_PREFIX = "tu-"  # smp's timm-universal encoders: any timm model name after the prefix
MAX_SUGGESTIONS = 5


class AuxHead(nn.Sequential):
    """FCN-style auxiliary classifier: 3x3 conv-BN-ReLU-dropout, then 1x1 conv to classes."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        hidden = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(AUX_DROPOUT),
            nn.Conv2d(hidden, num_classes, kernel_size=1),
        )


class SegModel(SegmentationModel):
    """An smp model's encoder, decoder and head, with an optional aux head on ``features[-2]``.

    Subclasses smp's base, so ``predict``, ``freeze_encoder`` and the input-size check work
    as for any smp model.

    Args:
        model: a freshly built smp model (without smp's own classification head).
        aux_head: applied to the encoder's second-deepest feature (stride 16 at OS 16/32,
            stride 8 at OS 8) in train mode only; None for no auxiliary output.
    """

    def __init__(self, model: SegmentationModel, aux_head: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.decoder = model.decoder
        self.segmentation_head = model.segmentation_head
        self.classification_head = None
        self.aux_head = aux_head
        self.requires_divisible_input_shape = model.requires_divisible_input_shape
        self.name = model.name
        self.attention_report: AttachReport | None = None  # set by build_model when it attaches attention

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_torch_compiling()):
            self.check_input_shape(x)
        features = self.encoder(x)
        logits = self.segmentation_head(self.decoder(features))
        if self.aux_head is None or not self.training:
            return logits
        aux = self.aux_head(features[-2])
        aux = F.interpolate(aux, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, aux


def _arch_kwargs(
    arch: str, output_stride: int, rates: tuple[int, ...], separable: bool, channels: int
) -> dict:
    if arch not in DEEPLAB_ARCHS:
        return {}  # U-Net and FPN need every stride up to 32 and keep smp's decoder defaults
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16 for {arch}, got {output_stride}")
    return {
        "encoder_output_stride": output_stride,
        "decoder_atrous_rates": tuple(rates),
        "decoder_aspp_separable": separable,
        "decoder_channels": channels,
    }


def build_model(
    arch: str,
    encoder: str,
    num_classes: int,
    *,
    output_stride: int = 16,
    encoder_weights: str | None = None,
    in_channels: int = 3,
    decoder_atrous_rates: tuple[int, ...] = (12, 24, 36),
    aspp_separable: bool = False,
    decoder_channels: int = 256,
    aux_loss: bool = False,
    attention: str | None = None,
    attention_stages: int | None = None,
) -> SegModel:
    """Build ``arch`` on ``encoder`` with random weights (see the module docstring for the contract).

    ``output_stride``, ``decoder_atrous_rates``, ``aspp_separable`` and ``decoder_channels``
    apply to DeepLabV3/V3+ only; U-Net and FPN use smp's defaults at output stride 32.
    ``attention`` ("none", "ca", "se", "cbam"; None leaves the encoder as built) and
    ``attention_stages`` go to :func:`seg.modeling.attach.attach_attention`; its report is kept in
    ``model.attention_report``. ``encoder_weights`` may only name a local file for a ``tu-``
    (timm) encoder, which timm loads before the attention is attached; other encoders load
    local files afterwards with ``seg/modeling/weights.py``.
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; expected one of {list(ARCHS)}")
    _check_encoder(encoder)
    kwargs = _arch_kwargs(arch, output_stride, decoder_atrous_rates, aspp_separable, decoder_channels)
    kwargs.update(_timm_weights(encoder, encoder_weights))
    try:
        model = smp.create_model(
            arch, encoder_name=encoder, in_channels=in_channels, classes=num_classes, **kwargs,
        )
    except (ValueError, TypeError) as err:
        if not encoder.startswith(TIMM_PREFIX):
            raise  # our own and smp's named encoders all fit every arch: this is a bug, keep its traceback
        # a timm model smp cannot cut into a feature pyramid (ViTs), or one without output_stride (Swin)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        needs = "features at strides 2 to 32" + (" and an output_stride argument" if arch in DEEPLAB_ARCHS else "")
        raise ConfigError(f"encoder {encoder!r} cannot serve as the encoder of {arch} ({reason}); smp needs a timm "
                          f"model with {needs}, e.g. tu-resnet50 or tu-convnext_tiny") from None
    report = None
    if attention is not None:
        report = attach_attention(model.encoder, attention, attention_stages)
        log.info("%s: %s", encoder, report.summary)
    aux_head = AuxHead(model.encoder.out_channels[-2], num_classes) if aux_loss else None
    seg_model = SegModel(model, aux_head)
    seg_model.attention_report = report
    # what seg.modeling.hub saves beside the weights, so a reload rebuilds this model (weights come from the file)
    seg_model.build_recipe = dict(
        arch=arch, encoder=encoder, num_classes=num_classes, output_stride=output_stride, in_channels=in_channels,
        decoder_atrous_rates=list(decoder_atrous_rates), aspp_separable=aspp_separable,
        decoder_channels=decoder_channels, aux_loss=aux_loss, attention=attention, attention_stages=attention_stages)
    return seg_model


def _check_encoder(encoder: str) -> None:
    """Refuse an unknown name in one line, naming the closest of ours, smp's and ``tu-`` + timm's."""
    if encoder.startswith(TIMM_PREFIX):
        if timm.is_model(encoder.removeprefix(TIMM_PREFIX)):
            return
        what, where = "timm model in encoder", "timm.list_models()"
    elif encoder in smp.encoders.get_encoder_names():
        return
    else:
        what, where = "encoder", "smp.encoders.get_encoder_names(), or 'tu-' + a name from timm.list_models()"
    names = smp.encoders.get_encoder_names() + [TIMM_PREFIX + name for name in timm.list_models()]
    close = difflib.get_close_matches(encoder, names, n=MAX_SUGGESTIONS)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"the valid names are in {where}"
    raise ConfigError(f"unknown {what} {encoder!r}; {hint}")


def _timm_weights(encoder: str, encoder_weights: str | Path | None) -> dict:
    """smp arguments that make timm load a local file through its own path (never a download)."""
    if encoder_weights is None:
        return {"encoder_weights": None}
    if not encoder.startswith(TIMM_PREFIX):
        raise ConfigError(
            f"encoder_weights must be None for {encoder!r} (got {encoder_weights!r}): smp would download them; "
            "load a local checkpoint into model.encoder with seg/modeling/weights.py instead")
    path = Path(encoder_weights)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    # timm reads the file, drops the classifier and adapts the stem to in_channels
    return {"encoder_weights": True, "pretrained_cfg_overlay": {"file": str(path)}}


def model_from_config(cfg: ModelConfig, num_classes: int) -> SegModel:
    """Build the model a run config describes, loading ``cfg.encoder_weights`` if it names a file or URL."""
    from seg.modeling.weights import load_encoder_weights, resolve_weights

    try:
        weights = resolve_weights(cfg.encoder_weights) if cfg.encoder_weights else None
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.encoder_weights: {err}; put the checkpoint there, or train from "
                                "scratch with model.encoder_weights=none") from None
    by_timm = weights is not None and cfg.encoder.startswith(TIMM_PREFIX)
    model = build_model(cfg.arch, cfg.encoder, num_classes, output_stride=cfg.output_stride,
                        decoder_atrous_rates=tuple(cfg.atrous_rates), aspp_separable=cfg.aspp_separable,
                        decoder_channels=cfg.decoder_channels, aux_loss=cfg.aux_loss,
                        attention=cfg.attention, attention_stages=cfg.attention_stages,
                        encoder_weights=weights if by_timm else None)
    if by_timm:  # timm loaded the file while building; only the attention blocks are new
        if model.attention_report is not None:
            new = model.attention_report.new_keys
            log.info("%s loaded by timm; %d attention tensors are new, missing from it on purpose, e.g. %s",
                     weights.name, len(new), new[:3])
    elif weights is not None:
        load_encoder_weights(model.encoder, weights)
    use_fused(model, cfg.fused_ca)
    return model


def encoder_from_config(cfg: ModelConfig) -> nn.Module:
    """The encoder ``cfg`` describes (attention and init weights included), undilated (output stride 32)
    and without a decoder: what ``seg.tools.pretrain`` trains. FPN builds its encoder at stride 32,
    so this is that encoder, taken out of the model."""
    return model_from_config(replace(cfg, arch="fpn", aux_loss=False), num_classes=1).encoder


def model_from_checkpoint(ckpt: dict, cfg: Config, device: torch.device, fast: bool = True) -> nn.Module:
    """The checkpoint's model in eval mode on ``device``, with CA's inference fast paths unless
    ``fast`` is false; the init weights file is never read. Evaluation and prediction pick their
    path with ``seg.inference.paths.inference_model``."""
    model = model_from_config(replace(cfg.model, encoder_weights=None), cfg.data.num_classes)
    load_model_weights(model, ckpt["model"])
    model = model.to(device).eval()
    return optimize_for_inference(model) if fast else model
