"""Typed run configuration: dataclass defaults, then one YAML file, then ``key=value`` overrides.

The dataclasses below are the single source of truth for every key and default. A YAML file
holds only what differs from them (no ``_base_`` inheritance); overrides such as
``optim.lr=0.02`` or ``model.encoder=mobilenet_v2_se`` are parsed with ``yaml.safe_load`` and
checked against the field's type. Every user error raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_type_hints

import yaml

from seg.coerce import Mismatch, coerce, type_name

log = logging.getLogger(__name__)
MAX_DEFAULT_WORKERS = 4
# Bumped when a key is renamed or removed; stored in every checkpoint beside its config.
CONFIG_VERSION = 2
# Keys whose stored value decides the model's architecture: a stored config without one cannot
# rebuild its weights' model. Keys added later (model.attention, ...) default to the old behaviour.
MODEL_KEYS = ("data.num_classes", "model.arch", "model.encoder", "model.output_stride", "model.atrous_rates",
              "model.aspp_separable", "model.decoder_channels", "model.aux_loss")
_WARNED: set[tuple[str, ...]] = set()  # unknown stored keys already warned about
OUTPUT_STRIDE_PAD = 32  # eval images are padded to a multiple of the deepest stride, valid for every arch
FROM_SCRATCH = ("", "none", "null")  # encoder_weights spellings that mean "random init"


class ConfigError(ValueError):
    """A config file, override or stored config dict that does not fit the schema."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers() -> int:
    """Loader workers when a config does not say: more workers than CPUs only adds contention."""
    return min(MAX_DEFAULT_WORKERS, available_cpus())


@dataclass
class DataConfig:
    name: Literal["synthetic", "voc", "cityscapes", "camvid"] = "synthetic"
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
    # Attention put into the encoder's blocks by seg.attach (None: leave the encoder as built;
    # "none": empty the slots, e.g. remove EfficientNet's SE). attention_stages: deepest N stages only.
    attention: Optional[Literal["none", "ca", "se", "cbam"]] = None
    attention_stages: Optional[int] = None


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.007
    momentum: float = 0.9  # SGD only: AdamW uses its betas, and a changed value draws a warning
    weight_decay: Optional[float] = None  # None: seg.optim.DEFAULT_WEIGHT_DECAY (4e-5 SGD, 1e-2 AdamW)
    encoder_lr_mult: float = 1.0
    warmup_iters: int = 0
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


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
    ("optim.weight_decay", lambda v: v is None or v >= 0, "None or >= 0"),
    ("train.threads", lambda v: v is None or v > 0, "None or > 0"),
    ("train.dist_timeout_s", lambda v: v > 0, "> 0"),
    ("model.attention_stages", lambda v: v is None or v >= 1, "None or >= 1 (the deepest N stages)"),
    ("eval.crop_size", lambda v: v is None or v > 0, "None or > 0"),
    ("eval.stride", lambda v: v is None or v > 0, "None or > 0"),
    ("eval.scales", lambda v: len(v) > 0 and all(s > 0 for s in v), "a non-empty list of positive scales"),
]


def _suggest(key: str) -> str:
    """Hint naming the nearest valid key(s) for an unknown dotted ``key``."""
    section, _, leaf = key.rpartition(".")
    if not section:  # a top-level name: a misspelt section, or a field put outside its section
        same_leaf = [k for k in FIELD_TYPES if k.endswith("." + leaf)]
        close = same_leaf or difflib.get_close_matches(leaf, list(SECTIONS), n=1)
        return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; sections are {list(SECTIONS)}"
    in_section = [k.split(".", 1)[1] for k in FIELD_TYPES if k.startswith(section + ".")]
    # the exact name in another section beats a near spelling in this one: train.crop_size -> data.crop_size
    close = [k for k in FIELD_TYPES if k.endswith("." + leaf)]
    close = close or [f"{section}.{c}" for c in difflib.get_close_matches(leaf, in_section, n=1)]
    close = close or difflib.get_close_matches(key, list(FIELD_TYPES), n=1)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"; valid keys in '{section}': {in_section}"


def _check(key: str, value: Any, source: str) -> Any:
    tp = FIELD_TYPES[key]
    try:
        return coerce(value, tp)
    except Mismatch:
        raise ConfigError(
            f"{source}: '{key}' expects {type_name(tp)}, got {value!r} ({type(value).__name__})") from None


def _apply(cfg: Config, data: Any, source: str) -> None:
    """Merge a ``{section: {key: value}}`` mapping into ``cfg`` in place, checking every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections {list(SECTIONS)}, got {data!r}")
    for section, values in data.items():
        values = {} if values is None else values  # a section left empty in YAML, e.g. only comments
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown key '{section}'{_suggest(str(section))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{section}' must be a mapping of keys, got {values!r}")
        for name, value in values.items():
            key = f"{section}.{name}"
            if key not in FIELD_TYPES:
                raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key)}")
            value = _check(key, value, source)
            if key == "model.encoder_weights" and value is not None and value.strip().lower() in FROM_SCRATCH:
                value = None  # YAML reads `none` as a string; it plainly means "no weights"
            setattr(getattr(cfg, section), name, value)


def _parse_override(text: str) -> dict:
    """``a.b=value`` -> ``{"a": {"b": value}}``, with the value parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.lr=0.02")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    # A string field keeps the text as typed: data.train_split=2012 means "2012", not the int 2012.
    accepts_str = key in FIELD_TYPES and str in (FIELD_TYPES[key], *get_args(FIELD_TYPES[key]))
    if accepts_str and value is not None and not isinstance(value, (str, list, dict)):
        value = raw.strip()
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


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
    """The keyword arguments of :func:`seg.inference.predict_labels` that ``cfg`` asks for.

    The one place a config becomes inference settings: training's validation, ``eval_seg.py``,
    ``seg.ablation`` and TensorBoard's predictions all call it, so ``best.pt`` is chosen under
    exactly the settings (TTA and precision included) that ``eval_seg.py`` reports by default.
    """
    e = cfg.eval
    return dict(mode=e.mode, output_stride=OUTPUT_STRIDE_PAD, **eval_window(cfg), scales=tuple(e.scales),
                flip=e.flip, amp=e.amp)


def eval_window(cfg: Config) -> dict:
    """``crop_size``/``stride`` for :func:`seg.inference.predict_labels`: in slide mode the window is
    eval.crop_size, else the training crop, and a stride of None means 2/3 of the window."""
    if cfg.eval.mode != "slide":
        return {"crop_size": None, "stride": None}
    return {"crop_size": cfg.eval.crop_size or cfg.data.crop_size, "stride": cfg.eval.stride}


def load_config(path: str | Path | None, overrides: list[str] = (), base: Config | None = None) -> Config:
    """Defaults (or ``base``, e.g. a run's stored config, changed in place), then the YAML file at
    ``path`` (if any), then ``key=value`` overrides; validated."""
    cfg = Config() if base is None else base
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        _apply(cfg, data or {}, str(path))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` overrides to ``cfg`` in place, validate, and return it."""
    for text in overrides:
        _apply(cfg, _parse_override(text), f"override {text!r}")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists): safe for YAML, JSON and ``torch.load(weights_only=True)``."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {s: {k: plain(v) for k, v in values.items()} for s, values in asdict(cfg).items()}


def config_from_dict(d: dict, version: int = CONFIG_VERSION, source: str = "stored config") -> Config:
    """Inverse of :func:`config_to_dict`, for a config stored by this or another version of the code.

    Keys it lacks keep today's defaults; keys this code does not know (renamed or added since)
    are dropped with one warning. Only a missing key of :data:`MODEL_KEYS` is refused, because
    the stored weights could then be given the wrong model.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections {list(SECTIONS)}, got {d!r}")
    known, unknown = {}, []
    for section, values in d.items():
        if section not in SECTIONS or not isinstance(values, (dict, type(None))):
            unknown.append(str(section))
            continue
        known[section] = {k: v for k, v in (values or {}).items() if f"{section}.{k}" in FIELD_TYPES}
        unknown += [f"{section}.{k}" for k in (values or {}) if f"{section}.{k}" not in FIELD_TYPES]
    missing = [key for key in MODEL_KEYS if key.split(".")[1] not in known.get(key.split(".")[0], {})]
    if missing:
        raise ConfigError(f"{source} (config version {version}) lacks {', '.join(missing)}, which decide the "
                          f"model; pass the run's config file with --config")
    if unknown and tuple(unknown) not in _WARNED:
        _WARNED.add(tuple(unknown))  # resume and evaluation may read one checkpoint's config twice
        log.warning("%s (config version %s; this code reads version %d): ignoring keys it does not know: %s",
                    source, version, CONFIG_VERSION, ", ".join(unknown))
    cfg = Config()
    _apply(cfg, known, source)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML; :func:`load_config` reads it back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
