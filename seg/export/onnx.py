"""Export a checkpoint to ONNX, then check onnxruntime (CPU) against PyTorch on the same inputs.

Usage: ``python -m seg.export --checkpoint FILE --out model.onnx [--height H --width W] [--dynamic] [--opset N]``

The model is rebuilt from the config stored in the checkpoint, so no other file is needed.
Export uses the TorchScript-based exporter (``dynamo=False``): the dynamo exporter needs
``onnxscript``, which is not a dependency, and tracing handles these conv nets fully, including
symbolic H/W for ``--dynamic``. A file that fails the check is deleted, so a wrong graph never
lands where a deployment would pick it up.

The file describes itself: its metadata holds the model card of :mod:`seg.export.runtime` (mean, std,
RGB order, the stride inputs must be padded to, class names, palette, inference settings), which
``predict_seg.py --onnx`` and ``seg.Predictor.from_onnx`` read. A ``--dynamic`` graph pads H and W
up to that stride itself (zeros, the normalised mean, as :mod:`seg.inference.tta` pads) and crops the
logits back, so any input size gives logits of that size.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seg.config import Config, ConfigError
from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from seg.errors import USER_ERRORS, UserError, print_user_error
from seg.export.runtime import write_model_card
from seg.inference.predictor import model_card
from seg.kernels.fast import optimize_for_inference
from seg.modeling.models import model_from_checkpoint
from seg.runs.checkpoint import CheckpointError, checkpoint_config, load_checkpoint

DEFAULT_OPSET = 17
# fp32 tolerance: ORT folds BN into convs and reorders sums, so each of ~60 layers adds rounding of
# ~1e-7 relative; logits of O(1..10) then differ by ~1e-5. 1e-3 leaves 100x headroom, while real
# export bugs (baked-in shapes, wrong resize mode, a missing layer) move logits by O(0.1) or more.
MAX_ABS_DIFF = 1e-3
# Pixels whose top two logits lie within rounding noise may flip argmax; more than 0.1% flipping is a bug.
MIN_AGREEMENT = 0.999
CHECK_IMAGES = 2
CHECK_SEED = 0
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ExportError(UserError, RuntimeError):
    """An export that cannot be made or that fails the onnxruntime check."""


@dataclass
class ExportCheck:
    """PyTorch vs onnxruntime on the same images, worst case over every checked size."""

    max_abs_diff: float
    agreement: float  # fraction of pixels whose argmax class is the same
    sizes: list[tuple[int, int]]

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= MAX_ABS_DIFF and self.agreement >= MIN_AGREEMENT


def load_for_export(path: str | Path) -> tuple[nn.Module, Config]:
    """The model and config stored in checkpoint ``path``, in eval mode on the CPU, with CA's inference
    fast paths (which :func:`export_onnx` would give it anyway)."""
    ckpt = load_checkpoint(path)
    try:
        cfg = checkpoint_config(ckpt, path)
    except ConfigError as e:
        raise ExportError(f"{path}: stored config is invalid: {e}") from e
    return model_from_checkpoint(ckpt, cfg, torch.device("cpu")), cfg


class PadToStride(nn.Module):
    """``model`` on inputs of any size: H and W padded (bottom, right) to a multiple of ``stride``,
    logits cropped back. Traced, the padding is computed from the input's shape inside the graph."""

    def __init__(self, model: nn.Module, stride: int) -> None:
        super().__init__()
        self.model, self.stride = model, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = (self.stride - h % self.stride) % self.stride, (self.stride - w % self.stride) % self.stride
        x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.model(x)[..., :h, :w]


def model_stride(model: nn.Module) -> int:
    """The multiple that input H and W must be (the encoder's output stride)."""
    return int(model.encoder.output_stride)


def export_size(cfg: Config, stride: int, height: int | None, width: int | None) -> tuple[int, int]:
    """``(H, W)`` to export at: the given size, else the crop size rounded to a multiple of ``stride``."""
    if (height is None) != (width is None):
        raise ExportError("give both --height and --width, or neither")
    if height is None:
        side = max(stride, round(cfg.data.crop_size / stride) * stride)
        return side, side
    bad = [(name, v) for name, v in (("height", height), ("width", width)) if v <= 0 or v % stride]
    if bad:
        nearest = [max(stride, round(v / stride) * stride) for v in (height, width)]
        raise ExportError(f"{', '.join(f'{n} {v}' for n, v in bad)} not a multiple of the model's output stride "
                          f"{stride}; nearest valid size: --height {nearest[0]} --width {nearest[1]}")
    return height, width


def _in_channels(model: nn.Module) -> int:
    model = model.model if isinstance(model, PadToStride) else model
    return int(getattr(model.encoder, "_in_channels", 3))


def export_onnx(model: nn.Module, out: str | Path, height: int, width: int, dynamic: bool = False,
                opset: int = DEFAULT_OPSET) -> None:
    """Write ``model`` (eval mode) to ``out`` for (1, C, H, W) inputs; H/W symbolic if ``dynamic``.

    CA blocks are given their inference fast paths first (in place; same function), so ONNX records
    the lean graph: matmuls on the strips with BN folded, no Concat or Split.
    """
    optimize_for_inference(model)
    out = Path(out)
    if not out.parent.is_dir():
        raise ExportError(f"output folder does not exist: {out.parent} (for --out {out})")
    dummy = torch.randn(1, _in_channels(model), height, width)
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
            OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}} if dynamic else None
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter warns that it is deprecated in favour of dynamo; see the module docstring
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
        torch.onnx.export(model, (dummy,), str(out), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes)


def check_images(height: int, width: int, channels: int = 3, count: int = CHECK_IMAGES) -> np.ndarray:
    """Seeded uniform images in [0, 1], normalised like the eval transform: (count, C, H, W) float32."""
    rng = np.random.default_rng(CHECK_SEED)
    images = rng.random((count, channels, height, width), dtype=np.float32)
    if channels == len(IMAGENET_MEAN):
        mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
        images = (images - mean) / np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return np.ascontiguousarray(images, dtype=np.float32)


def run_onnx(path: str | Path, images: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime's CPU provider, one image at a time (static graphs have batch 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {INPUT_NAME: images[i:i + 1]})[0] for i in range(len(images))])


def verify_onnx(model: nn.Module, path: str | Path, sizes: list[tuple[int, int]]) -> ExportCheck:
    """Compare PyTorch and onnxruntime logits on seeded images at each ``(H, W)`` in ``sizes``."""
    worst, agree, total = 0.0, 0, 0
    channels = _in_channels(model)
    for height, width in sizes:
        images = check_images(height, width, channels)
        with torch.no_grad():
            expected = model(torch.from_numpy(images)).numpy()
        got = run_onnx(path, images)
        if got.shape != expected.shape:
            raise ExportError(f"{path}: onnxruntime gave shape {got.shape} at {height}x{width}, "
                              f"PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        total += expected.shape[0] * height * width
    return ExportCheck(worst, agree / total, list(sizes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg.export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint to export, e.g. RUN/best.pt")
    p.add_argument("--out", required=True, help="ONNX file to write (its folder must exist)")
    p.add_argument("--height", type=int, help="input height (default: config crop size, stride multiple)")
    p.add_argument("--width", type=int, help="input width (default: config crop size, stride multiple)")
    p.add_argument("--dynamic", action="store_true", help="symbolic batch, height and width (default: fixed)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the checkpoint's train.threads)")
    return p.parse_args(argv)


def export_checkpoint(args: argparse.Namespace) -> ExportCheck:
    """Load, export, verify; the file is deleted when the check fails."""
    out = Path(args.out)
    if out.is_dir():  # fail before the (slow) model build
        raise ExportError(f"--out {out} is a folder; expected the ONNX file to write, e.g. {out / 'model.onnx'}")
    if not out.parent.is_dir():
        raise ExportError(f"output folder does not exist: {out.parent} (for --out {out})")
    model, cfg = load_for_export(args.checkpoint)
    threads = args.threads or cfg.train.threads
    if threads:
        torch.set_num_threads(threads)
    stride = model_stride(model)
    height, width = export_size(cfg, stride, args.height, args.width)
    if args.dynamic:
        model = PadToStride(model, stride).eval()
    export_onnx(model, out, height, width, args.dynamic, args.opset)
    # a dynamic graph must also work at a size it was not traced at, and at one that is no stride multiple
    odd = [(height + 2 * stride, width + stride), (height + 3, width - 5)] if args.dynamic else []
    sizes = [(height, width)] + odd
    try:
        check = verify_onnx(model, out, sizes)
        if check.passed:
            write_model_card(out, {**model_card(cfg), "input_stride": stride, "pads_inside": args.dynamic})
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if not check.passed:
        out.unlink(missing_ok=True)
        raise ExportError(
            f"onnxruntime disagrees with PyTorch: max |diff| {check.max_abs_diff:.3g} (limit {MAX_ABS_DIFF:g}), "
            f"argmax agreement {check.agreement:.4%} (need >= {MIN_AGREEMENT:.1%}); deleted {out}")
    return check


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit status (0 ok, 2 on a user error, printed to stderr in one line)."""
    args = parse_args(argv)
    try:
        check = export_checkpoint(args)
    except USER_ERRORS as e:
        return print_user_error(e)
    sizes = ", ".join(f"{h}x{w}" for h, w in check.sizes)
    print(f"wrote {args.out} ({'dynamic' if args.dynamic else 'static'} H/W, opset {args.opset}); "
          f"checked at {sizes}: max |diff| {check.max_abs_diff:.3g}, argmax agreement {check.agreement:.4%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
