"""onnxruntime behind an ``nn.Module`` face, and the model card an exported model carries in its metadata.

:class:`OnnxModel` takes and returns torch tensors, so :func:`seg.inference.tta.predict_labels` (whole,
slide, multi-scale + flip) drives an exported model exactly as it drives the PyTorch one.
The metadata keys (:data:`CARD_KEYS`) each hold one JSON value, readable by any ONNX tool:
``mean``/``std`` (0..1 units, in the model's channel order), ``color_order`` (``"RGB"``, what our
exports write, or ``"BGR"`` for a model that takes BGR images: the predictor then reverses the
channels), ``input_stride`` (H and W must be multiples of it), ``pads_inside`` (true: the graph pads
any H and W to it and crops the logits back, as ``--dynamic`` exports do), ``classes``, ``palette``,
``inference`` and ``slide_window`` (see :func:`seg.inference.predictor.model_card`).

:func:`read_model_card` checks every value when the file is loaded, so a hand-edited or foreign
card fails in one line naming the key before anything is predicted or written.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seg.errors import UserError

CARD_KEYS = ("mean", "std", "color_order", "input_stride", "pads_inside", "classes", "palette", "inference",
             "slide_window")
COLOR_ORDERS = ("RGB", "BGR")
MAX_STRIDE = 1024  # encoders reduce by 32 at most; a larger stride is a typo
MAX_SCALE = 4.0  # a 2048 px image at 4x is 8192 px a side, already ~10 GB of logits for 19 classes


class OnnxModelError(UserError, ValueError):
    """An ONNX file that is missing, not ours, or cannot take the input it is given."""


def write_model_card(path: str | Path, card: dict) -> None:
    """Store ``card`` (see :data:`CARD_KEYS`) in the metadata of the ONNX file at ``path``, in place."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {key: json.dumps(card[key]) for key in CARD_KEYS})
    onnx.save(model, str(path))


def read_model_card(path: str | Path) -> dict:
    """The model card stored by :func:`write_model_card`, checked; one-line errors for other files."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise OnnxModelError(f"{path} is not a readable ONNX model: {str(err).splitlines()[0]}") from None
    props = session.get_modelmeta().custom_metadata_map
    missing = [key for key in CARD_KEYS if key not in props]
    if missing:
        raise OnnxModelError(f"{path} has no {missing} in its metadata; re-export it with python -m seg.export")
    card = {}
    for key in CARD_KEYS:
        try:
            card[key] = json.loads(props[key])
        except json.JSONDecodeError as err:
            raise OnnxModelError(f"{path}: metadata '{key}' is not JSON ({err.msg}): {_short(props[key])}") from None
    channels = session.get_outputs()[0].shape[1] if len(session.get_outputs()[0].shape) == 4 else None
    check_card(card, path, channels if isinstance(channels, int) else None)
    return card


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _window_side(value: Any) -> bool:
    return value is None or (_integer(value) and value > 0)


def _inference_keys() -> tuple[set[str], set[str]]:
    """(all, required) keyword arguments of predict_labels that a card's ``inference`` may hold."""
    from seg.inference.tta import predict_labels

    params = {name: p for name, p in inspect.signature(predict_labels).parameters.items()
              if p.kind is p.KEYWORD_ONLY and name not in ("num_classes", "out_size")}
    return set(params), {name for name, p in params.items() if p.default is p.empty}


def check_card(card: dict, path: str | Path, channels: int | None = None) -> None:
    """Raise :class:`OnnxModelError` naming the first key of ``card`` that predicting could not use,
    and what it must be; ``channels`` is the graph's output channel count, when fixed."""
    from seg.inference.predictor import MAX_CLASSES
    from seg.inference.tta import AMP_DTYPES, MODES

    def need(ok: bool, key: str, expected: str, value: Any) -> None:
        if not ok:
            raise OnnxModelError(f"{path}: metadata '{key}' must be {expected}, got {_short(value)}")

    for key in ("mean", "std"):
        value = card[key]
        need(isinstance(value, list) and len(value) == 3 and all(_number(v) for v in value), key,
             "a list of 3 finite numbers (0..1 units, one per channel)", value)
    need(all(0 <= v <= 1 for v in card["mean"]), "mean", "within 0..1 (0..1 units, not 0..255)", card["mean"])
    need(all(0 < v <= 1 for v in card["std"]), "std", "within 0..1 and > 0 (0..1 units, not 0..255)", card["std"])
    need(card["color_order"] in COLOR_ORDERS, "color_order", f"one of {COLOR_ORDERS}", card["color_order"])
    stride = card["input_stride"]
    need(_integer(stride) and 1 <= stride <= MAX_STRIDE, "input_stride", f"an int in 1..{MAX_STRIDE}", stride)
    need(isinstance(card["pads_inside"], bool), "pads_inside", "true or false", card["pads_inside"])
    classes = card["classes"]
    need(isinstance(classes, list) and 0 < len(classes) <= MAX_CLASSES and all(isinstance(c, str) for c in classes),
         "classes", f"a list of 1..{MAX_CLASSES} class names", classes)
    if channels is not None:
        need(len(classes) == channels, "classes", f"{channels} names, one per output channel of the graph", classes)
    palette = card["palette"]
    need(isinstance(palette, list) and len(palette) == len(classes), "palette",
         f"{len(classes)} rows, one per class", palette)
    for i, row in enumerate(palette):
        need(isinstance(row, list) and len(row) == 3 and all(_integer(v) and 0 <= v <= 255 for v in row),
             f"palette[{i}]", "3 ints in 0..255 (R, G, B)", row)
    _check_inference(card["inference"], need, MODES, ("none", *AMP_DTYPES))
    window = card["slide_window"]
    need(isinstance(window, dict) and set(window) == {"crop_size", "stride"}, "slide_window",
         "an object with keys crop_size and stride", window)
    need(_integer(window["crop_size"]) and window["crop_size"] > 0, "slide_window.crop_size", "an int > 0",
         window["crop_size"])
    need(_window_side(window["stride"]), "slide_window.stride", "null or an int > 0", window["stride"])


def _check_inference(settings: Any, need, modes: tuple[str, ...], amps: tuple[str, ...]) -> None:
    allowed, required = _inference_keys()
    need(isinstance(settings, dict) and required <= set(settings) <= allowed, "inference",
         f"an object with keys {sorted(required)} and at most {sorted(allowed)}", settings)
    need(settings.get("mode", "whole") in modes, "inference.mode", f"one of {modes}", settings.get("mode"))
    scales = settings.get("scales", [1.0])
    need(isinstance(scales, list) and scales and all(_number(s) and 0 < s <= MAX_SCALE for s in scales),
         "inference.scales", f"a non-empty list of numbers in (0, {MAX_SCALE:g}]", scales)
    need(isinstance(settings.get("flip", False), bool), "inference.flip", "true or false", settings.get("flip"))
    need(settings.get("amp", "none") in amps, "inference.amp", f"one of {amps}", settings.get("amp"))
    stride = settings.get("output_stride", 1)
    need(_integer(stride) and 1 <= stride <= MAX_STRIDE, "inference.output_stride", f"an int in 1..{MAX_STRIDE}",
         stride)
    for key in ("crop_size", "stride"):
        need(_window_side(settings.get(key)), f"inference.{key}", "null or an int > 0", settings.get(key))
    if settings.get("mode") == "slide":
        need(settings.get("crop_size") is not None, "inference.crop_size", "an int > 0 in slide mode", None)


class OnnxModel(nn.Module):
    """An exported segmentation model run by onnxruntime's CPU provider; forward is torch in, torch out.

    Args:
        path: ONNX file from ``python -m seg.export``.
        threads: onnxruntime intra-op threads (None: its default).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        meta = self.session.get_inputs()[0]
        self.input_name = meta.name
        batch, _, height, width = meta.shape  # symbolic axes come back as strings
        self.batch_one = batch == 1
        self.static_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_size is not None and tuple(x.shape[-2:]) != self.static_size:
            h, w = self.static_size
            raise OnnxModelError(
                f"{self.path} was exported for {h}x{w} inputs only, got {x.shape[-2]}x{x.shape[-1]} (after padding); "
                f"export with --dynamic, or predict with --mode slide and a {h}x{w} window")
        images = x.detach().float().cpu().numpy()
        chunks = [images[i:i + 1] for i in range(len(images))] if self.batch_one else [images]
        logits = np.concatenate([self.session.run(None, {self.input_name: chunk})[0] for chunk in chunks])
        return torch.from_numpy(logits).to(x.device)
