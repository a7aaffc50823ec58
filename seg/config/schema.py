"""What a run configuration is: its keys, types and defaults (the dataclasses), the rules its
values must meet (:func:`validate`), and what it means for inference (:func:`inference_settings`).

The dataclasses are the single source of truth for every key and default; reading and writing
them is :mod:`seg.config.files`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, get_type_hints

from seg.errors import UserError

log = logging.getLogger(__name__)
MAX_DEFAULT_WORKERS = 4
# Bumped when a key is renamed or removed; stored in every checkpoint beside its config.
CONFIG_VERSION = 2
# Keys whose stored value decides the model's architecture: a stored config without one cannot
# rebuild its weights' model. Keys added later (model.attention, ...) default to the old behaviour.
MODEL_KEYS = ("data.num_classes", "model.arch", "model.encoder", "model.output_stride", "model.atrous_rates",
              "model.aspp_separable", "model.decoder_channels", "model.aux_loss")
OUTPUT_STRIDE_PAD = 32  # eval images are padded to a multiple of the deepest stride, valid for every arch
FROM_SCRATCH = ("", "none", "null")  # encoder_weights spellings that mean "random init"


class ConfigError(UserError, ValueError):
    """A config file, override or stored config dict that does not fit the schema."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers() -> int:
    """Loader workers when a config does not say: more workers than CPUs only adds contention."""
    return min(MAX_DEFAULT_WORKERS, available_cpus())


@dataclass
class DataConfig:
    # imagefolder / synthetic_classes: classification sets, for encoder pretraining (seg.tools.pretrain) only
    name: Literal["synthetic", "voc", "cityscapes", "camvid", "imagefolder", "synthetic_classes"] = "synthetic"
    root: str = "data"
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int = 21
    # DeepLab's 513 = 16 * 32 + 1 suits its align_corners resizing; smp's models need crops that
    # divide by the output stride, and 512 is the nearest (0.4% fewer pixels, same recipe otherwise).
    crop_size: int = 512
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    jitter: bool = False
    batch_size: int = 16  # global: summed over all processes, so a recipe means the same on any GPU count
    val_batch_size: int = 1  # per process (results do not depend on it); VOC images differ in size
    num_workers: int = field(default_factory=default_num_workers)  # min(4, CPUs) unless set
    synthetic_train_images: int = 256
    synthetic_val_images: int = 32
    synthetic_image_size: int = 128


@dataclass
class ModelConfig:
    arch: Literal["deeplabv3", "deeplabv3plus", "unet", "fpn"] = "deeplabv3"
    encoder: str = "mobilenet_v2_ca"
    encoder_weights: Optional[str] = None  # local path or URL; null / none / '' = random init (from scratch)
    output_stride: Literal[8, 16] = 16
    atrous_rates: tuple[int, int, int] = (6, 12, 18)
    aspp_separable: bool = True
    decoder_channels: int = 256
    aux_loss: bool = False
    aux_weight: float = 0.4
    # fused CA kernels on CUDA: off by default, slower than the reference in eager mode on an H200,
    # but faster under train.cuda_graphs (1.16x against 1.38x plain; docs/performance.md)
    fused_ca: bool = False
    # Attention put into the encoder's blocks by seg.modeling.attach (None: leave the encoder as built;
    # "none": empty the slots, e.g. remove EfficientNet's SE). attention_stages: deepest N stages only.
    attention: Optional[Literal["none", "ca", "se", "cbam"]] = None
    attention_stages: Optional[int] = None


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.007
    momentum: float = 0.9  # SGD only: AdamW uses its betas, and a changed value draws a warning
    weight_decay: Optional[float] = None  # None: seg.engine.optim.DEFAULT_WEIGHT_DECAY (4e-5 SGD, 1e-2 AdamW)
    encoder_lr_mult: float = 1.0
    warmup_iters: int = 0
    schedule: Literal["poly", "cosine"] = "poly"  # cosine: timm's CosineLRScheduler, by iteration
    poly_power: float = 0.9
    grad_clip: Optional[float] = None


@dataclass
class TrainConfig:
    iters: int = 30000
    eval_interval: int = 2000
    log_interval: int = 50
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = False
    # torch.compile's mode, e.g. "reduce-overhead" (inductor with CUDA graphs) or "max-autotune-no-cudagraphs"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    cuda_graphs: bool = False  # replay the train step's forward + backward as CUDA graphs (CUDA, one process)
    seed: int = 0
    vis_images: int = 4  # fixed val images shown in TensorBoard
    ca_maps: bool = False
    device: str = "auto"
    threads: Optional[int] = None  # intra-op CPU threads (torch.set_num_threads); None = PyTorch's default
    # how long a rank waits in a collective for its peers before it gives up, so a dead or hung
    # rank ends the group (and torchrun can restart it) instead of stalling it forever
    dist_timeout_s: int = 600


@dataclass
class EvalConfig:
    mode: Literal["whole", "slide"] = "whole"
    crop_size: Optional[int] = None  # slide window; None = the training crop, data.crop_size
    stride: Optional[int] = None  # None = 2/3 of the window
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    amp: Literal["none", "bf16", "fp16"] = "none"  # inference precision; independent of train.amp
    # eval_seg.py / predict_seg.py: the fastest inference path verified for the device (CUDA: CA's
    # Triton kernels + a CUDA graph per shape); false forces the paper's layers (seg.inference.paths)
    fast: bool = True


@dataclass
class PretrainConfig:
    """Encoder pretraining on a classification set (``python -m seg.tools.pretrain``); segmentation ignores it."""

    dropout: float = 0.2  # before the linear classifier, as in MobileNetV2
    label_smoothing: float = 0.0  # the CA paper's recipe uses none
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized crop's area range, ImageNet's (timm, torchvision)
    # plain weights (torchvision layout) to start an attention encoder from, its blocks set to an exact
    # identity (seg.modeling.warm_start); None: model.encoder_weights as for segmentation, or scratch
    warm_start: Optional[str] = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


SECTIONS = get_type_hints(Config)  # section name -> its dataclass
FIELD_TYPES = {f"{s}.{name}": tp for s, cls in SECTIONS.items() for name, tp in get_type_hints(cls).items()}

# (key, test, what the value must be): checked after file and overrides are merged.
RULES = [
    *((key, lambda v: v > 0, "> 0") for key in (
        "data.num_classes", "data.crop_size", "data.batch_size", "data.val_batch_size",
        "data.synthetic_train_images", "data.synthetic_val_images", "data.synthetic_image_size",
        "model.decoder_channels", "optim.lr", "train.iters", "train.eval_interval", "train.log_interval")),
    *((key, lambda v: v >= 0, ">= 0") for key in (
        "data.num_workers", "model.aux_weight", "optim.momentum",
        "optim.encoder_lr_mult", "optim.warmup_iters", "optim.poly_power", "train.vis_images")),
    ("data.scale_range", lambda v: 0 < v[0] <= v[1], "(min, max) with 0 < min <= max"),
    ("model.atrous_rates", lambda v: all(r > 0 for r in v), "positive dilation rates"),
    ("optim.grad_clip", lambda v: v is None or v > 0, "None or > 0"),
    ("pretrain.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("pretrain.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("pretrain.crop_scale", lambda v: 0 < v[0] <= v[1] <= 1, "(min, max) area fractions with 0 < min <= max <= 1"),
    ("optim.weight_decay", lambda v: v is None or v >= 0, "None or >= 0"),
    ("train.threads", lambda v: v is None or v > 0, "None or > 0"),
    ("train.dist_timeout_s", lambda v: v > 0, "> 0"),
    ("model.attention_stages", lambda v: v is None or v >= 1, "None or >= 1 (the deepest N stages)"),
    ("eval.crop_size", lambda v: v is None or v > 0, "None or > 0"),
    ("eval.stride", lambda v: v is None or v > 0, "None or > 0"),
    ("eval.scales", lambda v: len(v) > 0 and all(s > 0 for s in v), "a non-empty list of positive scales"),
]


def validate(cfg: Config) -> None:
    """Check value ranges and cross-field rules that types alone cannot express."""
    for key, test, expected in RULES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not test(value):
            raise ConfigError(f"'{key}' must be {expected}, got {value!r}")
    window = eval_window(cfg)
    if window["stride"] is not None and window["stride"] > window["crop_size"]:
        raise ConfigError(f"eval.stride ({window['stride']}) must be <= the window eval.crop_size "
                          f"({window['crop_size']}; default data.crop_size): a larger stride leaves pixels unpredicted")
    if cfg.model.attention_stages is not None and cfg.model.attention is None:
        raise ConfigError("model.attention_stages needs model.attention (one of 'none', 'ca', 'se', 'cbam')")
    if cfg.train.compile_mode != "default" and not cfg.train.compile:
        raise ConfigError(f"train.compile_mode={cfg.train.compile_mode} needs train.compile=true")
    if cfg.train.cuda_graphs and cfg.train.compile:
        raise ConfigError("train.cuda_graphs and train.compile exclude each other; for both, use "
                          "train.compile=true train.compile_mode=reduce-overhead")
    if cfg.train.cuda_graphs and cfg.train.device == "cpu":
        raise ConfigError("train.cuda_graphs needs a CUDA device, but train.device=cpu")
    if cfg.optim.warmup_iters > cfg.train.iters:
        raise ConfigError(f"optim.warmup_iters ({cfg.optim.warmup_iters}) exceeds train.iters ({cfg.train.iters})")
    if cfg.optim.name == "adamw" and cfg.optim.momentum != OptimConfig.momentum:
        log.warning("optim.momentum=%g is ignored by adamw, which uses its betas (0.9, 0.999)", cfg.optim.momentum)


def inference_settings(cfg: Config) -> dict:
    """The keyword arguments of :func:`seg.inference.tta.predict_labels` that ``cfg`` asks for.

    The one place a config becomes inference settings: training's validation, ``eval_seg.py``,
    ``seg.tools.ablation`` and TensorBoard's predictions all call it, so ``best.pt`` is chosen under
    exactly the settings (TTA and precision included) that ``eval_seg.py`` reports by default.
    """
    e = cfg.eval
    return dict(mode=e.mode, output_stride=OUTPUT_STRIDE_PAD, **eval_window(cfg), scales=tuple(e.scales),
                flip=e.flip, amp=e.amp)


def eval_window(cfg: Config) -> dict:
    """``crop_size``/``stride`` for :func:`seg.inference.tta.predict_labels`: in slide mode the window is
    eval.crop_size, else the training crop, and a stride of None means 2/3 of the window."""
    if cfg.eval.mode != "slide":
        return {"crop_size": None, "stride": None}
    return {"crop_size": cfg.eval.crop_size or cfg.data.crop_size, "stride": cfg.eval.stride}
