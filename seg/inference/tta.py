"""Whole-image, sliding-window and multi-scale + flip prediction for a segmentation model.

Inputs are batches of *normalised* images ``[N, 3, H, W]``; padding is added at the bottom and
right with zeros (the normalised mean), and cut off again before anything is returned. A
single view (one scale, no flip) keeps logits; several views average softmax probabilities,
resized to ``out_size`` (the label's resolution), as in DeepLab / mmseg test-time augmentation.

Memory: a 1024x2048 Cityscapes image has 19 x 2M logits (160 MB in float32), so the code
keeps at most one full-resolution per-class accumulator besides the model's current output,
and works in place where it can. ``predict_labels`` with one view takes the argmax of the
model's output directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("whole", "slide")
Size2 = int | tuple[int, int]


@dataclass(frozen=True)
class _Forward:
    """How to turn one (resized, maybe flipped) image batch into logits."""

    num_classes: int
    mode: str
    output_stride: int
    crop_size: tuple[int, int] | None
    stride: tuple[int, int] | None
    amp: str


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def predict(
    model: nn.Module,
    image: torch.Tensor,
    *,
    num_classes: int,
    mode: str = "whole",
    output_stride: int = 32,
    crop_size: Size2 | None = None,
    stride: Size2 | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: Size2 | None = None,
    amp: str = "none",
) -> torch.Tensor:
    """Class probabilities ``[N, num_classes, *out_size]`` (float32) for a normalised image batch.

    Args:
        model: returns logits ``[N, C, h, w]`` (or a tuple whose first item is that); it runs in
            eval mode under ``torch.no_grad`` and its train/eval mode is restored afterwards.
        image: normalised images ``[N, 3, H, W]``.
        num_classes: expected channel count of the model's output (checked).
        mode: "whole" runs the full image padded to a multiple of ``output_stride``;
            "slide" runs ``crop_size`` windows every ``stride`` pixels and averages overlapping logits.
        output_stride: H and W are padded up to a multiple of this (the model's total stride).
        crop_size: window (h, w) or side, required for "slide"; smaller images are padded up to it.
        stride: window step (h, w) or side for "slide"; default 2/3 of ``crop_size``.
        scales: resize factors (bilinear, align_corners=False) for test-time augmentation.
        flip: also run horizontally flipped copies.
        out_size: (H', W') of the result, e.g. the label's size; default the image's size.
        amp: "none" (float32), "bf16" or "fp16": autocast on the image's device. Off by default, so
            a checkpoint scores the same on any device unless the config asks otherwise.
    """
    result, is_probs = _infer(model, image, num_classes, mode, output_stride, crop_size, stride,
                              scales, flip, out_size, amp)
    return result if is_probs else _softmax_(result.float())


def predict_labels(
    model: nn.Module,
    image: torch.Tensor,
    *,
    num_classes: int,
    mode: str = "whole",
    output_stride: int = 32,
    crop_size: Size2 | None = None,
    stride: Size2 | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    out_size: Size2 | None = None,
    amp: str = "none",
) -> torch.Tensor:
    """Class indices ``[N, *out_size]`` (int64); same arguments as ``predict``.

    Cheaper than ``predict(...).argmax(1)``: one view is argmax-ed straight from the logits,
    several views share one in-place probability accumulator.
    """
    result, _ = _infer(model, image, num_classes, mode, output_stride, crop_size, stride,
                       scales, flip, out_size, amp)
    return result.argmax(1)


def _infer(model, image, num_classes, mode, output_stride, crop_size, stride, scales, flip,
           out_size, amp) -> tuple[torch.Tensor, bool]:
    """Logits for a single view (is_probs=False) or the mean softmax over views (True)."""
    fwd = _Forward(num_classes, mode, output_stride, *_window(mode, crop_size, stride), amp)
    _check(image, fwd, scales)
    out_hw = _pair(out_size, "out_size") if out_size is not None else tuple(image.shape[-2:])
    views = [(float(s), f) for s in scales for f in ((False, True) if flip else (False,))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if len(views) == 1:
                return _view_logits(model, image, *views[0], fwd, out_hw), False
            acc = None  # views[0] is never flipped, so it can become the accumulator as is
            for scale, flipped in views:
                probs = _softmax_(_view_logits(model, image, scale, flipped, fwd, out_hw).float())
                if acc is None:
                    acc = probs
                elif flipped:
                    _add_mirrored_(acc, probs)
                else:
                    acc.add_(probs)
            return acc.div_(len(views)), True
    finally:
        model.train(was_training)


def _view_logits(model, image, scale, flipped, fwd, out_hw) -> torch.Tensor:
    """Logits resized to out_hw; still mirrored when ``flipped`` (see ``_add_mirrored_``)."""
    x = image
    if scale != 1.0:
        h, w = image.shape[-2:]
        size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if flipped:
        x = x.flip(-1)
    logits = _forward_slide(model, x, fwd) if fwd.mode == "slide" else _forward_whole(model, x, fwd)
    if tuple(logits.shape[-2:]) != out_hw:
        logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
    return logits


def _forward_whole(model, x: torch.Tensor, fwd: _Forward) -> torch.Tensor:
    """Logits at x's size: pad bottom/right to a multiple of the output stride, run, crop back."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % fwd.output_stride, -w % fwd.output_stride
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    with torch.autocast(x.device.type, dtype=AMP_DTYPES.get(fwd.amp, torch.bfloat16), enabled=fwd.amp != "none"):
        out = model(x)
    if isinstance(out, (tuple, list)):  # (logits, aux) from models with an auxiliary head
        out = out[0]
    if out.ndim != 4 or out.shape[1] != fwd.num_classes:
        raise ValueError(
            f"predict: model returned shape {tuple(out.shape)}, expected [N, {fwd.num_classes}, h, w] "
            f"(num_classes={fwd.num_classes})"
        )
    if out.shape[-2:] != x.shape[-2:]:  # a model that predicts at reduced resolution
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    elif out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        out = out.clone()  # later steps work in place and must never write into the caller's image
    return out[..., :h, :w]


def _forward_slide(model, x: torch.Tensor, fwd: _Forward) -> torch.Tensor:
    """Average of window logits; every window is a full crop, so small images are padded first."""
    (crop_h, crop_w), (step_h, step_w) = fwd.crop_size, fwd.stride
    n, _, h, w = x.shape
    x = F.pad(x, (0, max(crop_w - w, 0), 0, max(crop_h - h, 0)))
    full_h, full_w = x.shape[-2:]
    total = torch.zeros((n, fwd.num_classes, full_h, full_w), dtype=torch.float32, device=x.device)
    count = torch.zeros((1, 1, full_h, full_w), dtype=torch.float32, device=x.device)
    for top in _starts(full_h, crop_h, step_h):
        for left in _starts(full_w, crop_w, step_w):
            window = (..., slice(top, top + crop_h), slice(left, left + crop_w))
            total[window] += _forward_whole(model, x[window], fwd)
            count[window] += 1
    return total.div_(count)[..., :h, :w]


def _starts(size: int, crop: int, step: int) -> list[int]:
    """Window offsets every ``step`` pixels, the last one flush with the far border."""
    return list(range(0, size - crop, step)) + [size - crop]


def _add_mirrored_(acc: torch.Tensor, mirrored: torch.Tensor) -> None:
    """acc += mirrored flipped back, one class at a time: flip copies, and a whole copy is 160 MB."""
    for c in range(acc.shape[1]):
        acc[:, c].add_(mirrored[:, c].flip(-1))


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 in place: no second full-resolution per-class tensor."""
    logits.sub_(logits.amax(1, keepdim=True)).exp_()
    return logits.div_(logits.sum(1, keepdim=True))


def _pair(value: Size2, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"predict: {name} must be a positive int or (h, w) pair, got {value!r}")
    return pair


def _window(mode: str, crop_size, stride) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    if mode != "slide":
        return None, None
    if crop_size is None:
        raise ValueError("predict: mode='slide' needs crop_size, e.g. crop_size=(512, 1024)")
    crop = _pair(crop_size, "crop_size")
    # 2/3 overlap is the usual Cityscapes choice (512x1024 crops, 341x683 steps)
    step = _pair(stride, "stride") if stride is not None else tuple(max(1, c * 2 // 3) for c in crop)
    if step[0] > crop[0] or step[1] > crop[1]:
        raise ValueError(f"predict: stride {step} larger than crop_size {crop} would leave pixels unseen")
    return crop, step


def _check(image: torch.Tensor, fwd: _Forward, scales: Sequence[float]) -> None:
    if image.ndim != 4 or not image.is_floating_point():
        raise ValueError(
            f"predict: image must be a float tensor [N, 3, H, W], got {image.dtype} {tuple(image.shape)}"
        )
    if fwd.mode not in MODES:
        raise ValueError(f"predict: mode must be one of {MODES}, got {fwd.mode!r}")
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"predict: scales must be a non-empty list of positive factors, got {scales!r}")
    if fwd.amp not in ("none", *AMP_DTYPES):
        raise ValueError(f"predict: amp must be 'none', 'bf16' or 'fp16', got {fwd.amp!r}")
    if fwd.output_stride < 1 or fwd.num_classes < 1:
        raise ValueError(
            f"predict: output_stride and num_classes must be >= 1, got {fwd.output_stride}, {fwd.num_classes}"
        )
