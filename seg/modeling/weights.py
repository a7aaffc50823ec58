"""Load ImageNet checkpoints into our encoders, with an explicit key map per layout.

Layouts understood (detected from the checkpoint's keys):

- ``official``: the released ``mbv2_ca.pth`` of the CoordAttention repository (flat
  ``features.N.conv.K`` Sequentials, the 1280 conv as top-level ``conv.{0,1}``, CoordAtt
  strip convs named ``conv2``/``conv3``).
- ``torchvision``: torchvision's MobileNetV2 (``features.N.conv.0.0`` ..., 1280 conv at
  ``features.18``). This is also smp's plain ``mobilenet_v2`` encoder layout.
- ``attention``: our MobileNetV2 encoders, which hold an attention block at ``conv.2`` of
  every expanded block (see ``seg/modeling/encoders/mobilenet_v2.py``).
- ``resnet``: torchvision's ResNet, which our ResNet encoders keep name for name.

MobileNetV2 layouts are translated through the *role* of each layer (pw conv, dw BN, ...),
so any of them loads into any MobileNetV2 encoder. Anything else loads key for key.
Classification heads are dropped. Layers the file does not cover (in practice the
attention blocks) are initialised the way the official MobileNetV2-CA code does.
"""

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file
from torch import nn

logger = logging.getLogger(__name__)

HEAD_PREFIXES = ("classifier.", "fc.")  # ImageNet classifiers; encoders have none
CONTAINER_KEYS = ("state_dict", "model")
WRAPPER_PREFIX = "module."  # DataParallel / DDP
EXAMPLE_KEYS = 3

# Sub-layer prefix of each role inside an inverted residual's ``conv``, per layout.
EXPANDED_ROLES = {
    "official": {"pw_conv": "conv.0", "pw_bn": "conv.1", "dw_conv": "conv.3", "dw_bn": "conv.4",
                 "attn": "conv.6", "proj_conv": "conv.7", "proj_bn": "conv.8"},
    "torchvision": {"pw_conv": "conv.0.0", "pw_bn": "conv.0.1", "dw_conv": "conv.1.0",
                    "dw_bn": "conv.1.1", "proj_conv": "conv.2", "proj_bn": "conv.3"},
    "attention": {"pw_conv": "conv.0.0", "pw_bn": "conv.0.1", "dw_conv": "conv.1.0",
                  "dw_bn": "conv.1.1", "attn": "conv.2", "proj_conv": "conv.3", "proj_bn": "conv.4"},
}
UNEXPANDED_ROLES = {  # the t = 1 block (features.1): dw, pw-linear, BN
    "official": {"dw_conv": "conv.0", "dw_bn": "conv.1", "proj_conv": "conv.3", "proj_bn": "conv.4"},
    "torchvision": {"dw_conv": "conv.0.0", "dw_bn": "conv.0.1", "proj_conv": "conv.1", "proj_bn": "conv.2"},
}
UNEXPANDED_ROLES["attention"] = UNEXPANDED_ROLES["torchvision"]
# The official CoordAtt calls its height/width convs conv2/conv3; ours are conv_h/conv_w.
OFFICIAL_CA_NAMES = {"conv2": "conv_h", "conv3": "conv_w"}

_BLOCK_KEY = re.compile(r"features\.(\d+)\.(.+)")


@dataclass
class LoadReport:
    """What happened to every tensor. Keys in ``unexpected``/``dropped`` are checkpoint keys;
    ``loaded``/``missing``/``mismatched`` name the encoder's keys."""

    path: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    fraction: float = 0.0  # share of the encoder's elements that came from the file

    @property
    def summary(self) -> str:
        return (f"{Path(self.path).name} ({self.layout} layout): {len(self.loaded)} tensors loaded "
                f"({self.fraction:.1%} of elements), {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched, "
                f"{len(self.dropped)} head tensors dropped")


def load_encoder_weights(encoder: nn.Module, path: str | Path, *, min_fraction: float = 0.5) -> LoadReport:
    """Load a local .pth/.pt/.safetensors checkpoint into ``encoder`` and report what matched.

    Raises FileNotFoundError for a missing file, and ValueError when less than
    ``min_fraction`` of the encoder's elements match: that is the wrong file, not a partial load.
    """
    path = Path(path)
    source = read_state_dict(path)
    target = encoder.state_dict()
    layout = detect_layout(source)
    report, loaded = _match(source, target, _key_map(layout, source, target), path, layout)
    if report.fraction < min_fraction:
        raise ValueError(
            f"{path}: only {report.fraction:.1%} of the encoder's parameters match this file "
            f"(need {min_fraction:.0%}; detected layout {layout!r}). Checkpoint keys e.g. "
            f"{list(source)[:EXAMPLE_KEYS]}; encoder keys e.g. {list(target)[:EXAMPLE_KEYS]}. "
            "Is it the checkpoint for this encoder?")
    encoder.load_state_dict({**target, **loaded})
    _init_fresh_layers(encoder, target, set(report.missing))
    logger.info(report.summary)
    if report.unexpected:
        logger.warning("%s: %d checkpoint tensors have no place in the encoder, e.g. %s",
                       path.name, len(report.unexpected), report.unexpected[:EXAMPLE_KEYS])
    for key, have, want in report.mismatched:
        logger.warning("%s: %s has shape %s in the checkpoint, %s in the encoder; left as is",
                       path.name, key, have, want)
    return report


def resolve_weights(spec: str | Path) -> Path:
    """Turn a local path or an http(s) URL into a local file; URLs are cached in torch hub's dir."""
    text = str(spec)
    if urlparse(text).scheme in ("http", "https"):
        return _download_cached(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the checkpoint layout from its keys: official, torchvision, attention, resnet or as-is."""
    if "features.0.0.weight" in state_dict and "conv.0.weight" in state_dict:
        return "official"
    if "features.1.conv.0.0.weight" in state_dict:
        has_slot = any(re.fullmatch(r"features\.\d+\.conv\.4\..+", key) for key in state_dict)
        return "attention" if has_slot else "torchvision"
    if "layer1.0.conv1.weight" in state_dict:
        return "resnet"
    return "as-is"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from training containers and DDP prefixes."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        obj = load_file(str(path), device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as err:
            raise ValueError(f"{path}: not readable as a weights-only torch checkpoint ({err})") from err
    while isinstance(obj, dict):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    tensors = {} if not isinstance(obj, dict) else {
        key.removeprefix(WRAPPER_PREFIX): value for key, value in obj.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: holds no tensors; expected a state dict, "
                         f"optionally under one of {CONTAINER_KEYS}")
    return tensors


def _key_map(layout: str, source: dict, target: dict) -> Callable[[str], Optional[str]]:
    """Source key -> encoder key (None: no place for it). Role map between MobileNetV2 layouts."""
    target_layout = detect_layout(target)
    if layout not in EXPANDED_ROLES or target_layout not in EXPANDED_ROLES:
        return lambda key: key
    expanded = {int(m.group(1)) for key in source if (m := _BLOCK_KEY.fullmatch(key))
                and m.group(2).startswith(EXPANDED_ROLES[layout]["proj_bn"] + ".")}
    source_last = _last_block(source) if layout != "official" else None
    target_last = _last_block(target)

    def map_key(key: str) -> Optional[str]:
        if layout == "official" and key.startswith("conv."):
            return f"features.{target_last}.{key.removeprefix('conv.')}"
        m = _BLOCK_KEY.fullmatch(key)
        if m is None:
            return None
        block, rest = int(m.group(1)), m.group(2)
        if not rest.startswith("conv."):  # stem and 1280 head are (conv, BN) Sequentials everywhere
            if block == 0:
                return key
            return f"features.{target_last}.{rest}" if block == source_last else None
        roles = EXPANDED_ROLES if block in expanded else UNEXPANDED_ROLES
        for role, prefix in roles[layout].items():
            if rest.startswith(prefix + "."):
                if role not in roles[target_layout]:
                    return None
                inner = rest.removeprefix(prefix + ".")
                if role == "attn" and layout == "official":
                    name, _, tail = inner.partition(".")
                    inner = f"{OFFICIAL_CA_NAMES.get(name, name)}.{tail}"
                return f"features.{block}.{roles[target_layout][role]}.{inner}"
        return None

    return map_key


def _last_block(state_dict: dict) -> int:
    return max(int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.fullmatch(key)))


def _match(source: dict, target: dict, map_key: Callable, path: Path, layout: str
           ) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """Sort every checkpoint tensor into loaded / unexpected / mismatched / dropped."""
    report = LoadReport(path=str(path), layout=layout)
    loaded: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        if key.startswith(HEAD_PREFIXES):
            report.dropped.append(key)
            continue
        dest = map_key(key)
        if dest is None or dest not in target or dest in loaded:
            report.unexpected.append(key)
        elif tensor.shape != target[dest].shape:
            report.mismatched.append((dest, tuple(tensor.shape), tuple(target[dest].shape)))
        else:
            loaded[dest] = tensor
    report.loaded = [key for key in target if key in loaded]
    mismatched = {key for key, _, _ in report.mismatched}
    report.missing = [key for key in target if key not in loaded and key not in mismatched]
    total = sum(t.numel() for t in target.values())
    report.fraction = sum(loaded[k].numel() for k in report.loaded) / max(total, 1)
    return report, loaded


def _init_fresh_layers(encoder: nn.Module, target: dict, missing: set[str]) -> None:
    """Initialise every layer none of whose tensors came from the file, as the official code does.

    The official MobileNetV2-CA (``MBV2_CA._initialize_weights``) draws conv weights from
    N(0, 2 / (k*k*out)), i.e. Kaiming normal in fan_out mode, zeroes conv biases, sets BN to
    (1, 0) and Linear to N(0, 0.01). Applying it to new attention blocks means a
    fine-tune starts them where an ImageNet run would have.
    """
    owners: dict[str, list[str]] = {}
    for key in target:
        owners.setdefault(key.rpartition(".")[0], []).append(key)
    for name, keys in owners.items():
        if all(key in missing for key in keys):
            _official_init(encoder.get_submodule(name))


@torch.no_grad()
def _official_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
        module.reset_running_stats()
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _download_cached(url: str) -> Path:
    name = Path(urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot cache {url!r}: its path ends without a file name")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file():
        logger.info("using cached %s for %s", cached, url)
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, cached)
    torch.hub.download_url_to_file(url, str(cached), progress=True)
    return cached
