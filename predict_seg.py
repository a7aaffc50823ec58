"""Predict masks for your own images, folders and videos with a trained checkpoint (or its ONNX export).

  python predict_seg.py --checkpoint RUN/best.pt photos/ extra.jpg 'more/**/*.png' clip.mp4 --out masks/

Per image, under --out and mirroring each input's relative path: <name>.png (8-bit class indices at
the image's own size, as eval_seg.py --save-dir writes), <name>_color.png and <name>_overlay.jpg.
Per video: <name>_overlay.mp4 (same size and frame rate) and, with --save-frames, every frame's
files in <name>/. Inference settings, classes and palette come from the checkpoint (or the ONNX
file's metadata); the flags below override the settings.

Exit status: 0 when every input was predicted; 2 when some were skipped (unreadable, empty,
truncated or too large images, and inputs whose outputs would overwrite an earlier input's: each
named in a warning line and counted in the summary); 2 on a user error (missing input, empty
folder, bad checkpoint or ONNX metadata, an --out that is a file, read-only, or inside an input
folder), printed as one ``error:`` line, in which case nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from seg.config import ConfigError
from seg.config.cli import HelpFormatter
from seg.data.base import MAX_PIXELS, PIL_MAX_PIXELS
from seg.errors import USER_ERRORS, print_user_error
from seg.export.runtime import OnnxModelError
from seg.inference.files import Outputs, predict_images, predict_video
from seg.inference.inputs import Skipped, collect_inputs
from seg.inference.outputs import OVERLAY_ALPHA, OutputError, check_out_folder, make_out_folder
from seg.inference.predictor import Predictor
from seg.utils.progress import Progress

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python predict_seg.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (searched recursively; images and videos by extension), glob "
                        "patterns (quote them; ** recurses) and video files (anything cv2.VideoCapture opens)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint written by train_seg.py (e.g. RUN/best.pt)")
    p.add_argument("--onnx", type=Path, help="run this model from `python -m seg.export` with onnxruntime (CPU) "
                   "instead of PyTorch; settings, classes and palette come from its metadata")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; not a file, and not where an "
                   "input would read the outputs back: inside an input folder or matched by an input pattern)")
    p.add_argument("--mode", choices=["whole", "slide"], help="whole image or sliding window (default: the "
                   "checkpoint's eval.mode; slide uses its eval.crop_size, else the training crop)")
    p.add_argument("--scales", type=float, nargs="+", help="multi-scale inference, e.g. 0.75 1.0 1.25 "
                   "(default: the checkpoint's eval.scales)")
    p.add_argument("--flip", action="store_true", help="also average with the horizontally flipped image")
    p.add_argument("--reference", action="store_true", help="run the paper's layers eagerly, not the fastest "
                   "verified inference path (CUDA: CA's Triton kernels and CUDA graphs; see docs/performance.md)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch / onnxruntime (default: theirs)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda[:N]; "
                   "ignored with --onnx, which runs on the CPU")
    p.add_argument("--batch", type=int, default=1, help="images (or video frames) per forward; only "
                   "equal-sized images share one (default 1)")
    p.add_argument("--overlay-alpha", type=float, default=OVERLAY_ALPHA,
                   help=f"weight of the image in overlays, 0..1 (default {OVERLAY_ALPHA})")
    p.add_argument("--save-frames", action="store_true", help="for videos, also write every frame's "
                   "class-index, colour and overlay images into <name>/")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"skip images (and videos) of more pixels, judged from the file's header before decoding, "
                        f"so a small file that claims a huge size cannot exhaust memory (default PIL's "
                        f"{MAX_PIXELS:,}; at most {PIL_MAX_PIXELS:,})")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if (args.checkpoint is None) == (args.onnx is None):
        raise ConfigError("give exactly one of --checkpoint and --onnx")
    if args.reference and args.onnx is not None:
        raise ConfigError("--reference applies to --checkpoint; an ONNX model runs on onnxruntime")
    if args.batch < 1 or (args.threads is not None and args.threads < 1):
        raise ConfigError("--batch and --threads must be >= 1")
    if not 0.0 <= args.overlay_alpha <= 1.0:
        raise ConfigError(f"--overlay-alpha must be within 0..1, got {args.overlay_alpha}")
    if not 0 < args.max_pixels <= PIL_MAX_PIXELS:
        raise ConfigError(f"--max-pixels must be within 1..{PIL_MAX_PIXELS:,} (PIL opens no larger image), "
                          f"got {args.max_pixels}")
    check_out_folder(args.out, "--out")


def build_predictor(args: argparse.Namespace) -> Predictor:
    settings = dict(mode=args.mode, scales=args.scales, flip=True if args.flip else None)
    if args.onnx is not None:
        return Predictor.from_onnx(args.onnx, threads=args.threads, **settings)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = ["eval.fast=false"] if args.reference else []
    return Predictor.from_checkpoint(args.checkpoint, device=args.device, overrides=overrides, **settings)


def summary(images: int, frames: int, skipped: list[Skipped], seconds: float, out: Path, path: str) -> str:
    done = f"{images} image(s)" + (f" and {frames} video frame(s)" if frames else "")
    lines = [f"predicted {done} in {seconds:.1f} s ({path} path); outputs in {out}"]
    if skipped:
        lines.append(f"skipped {len(skipped)}:")
        lines += [f"  {s}" for s in skipped]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        check_args(args)
        items, skipped = collect_inputs(args.inputs, args.out, args.save_frames)
        predictor = build_predictor(args)
        make_out_folder(args.out, "--out")  # the first thing written
    except USER_ERRORS as err:  # nothing has been written yet
        return print_user_error(err)
    for entry in skipped:
        Progress.warn(entry.path, entry.reason)
    try:
        to = Outputs(args.out, args.batch, args.overlay_alpha, args.save_frames, args.max_pixels)
        images = predict_images(predictor, [i for i in items if not i.is_video], to, skipped)
        frames = sum(predict_video(predictor, item, to, skipped) for item in items if item.is_video)
    except OnnxModelError as err:
        return print_user_error(err)
    except OSError as err:  # a full disk, or --out made read-only meanwhile
        return print_user_error(OutputError(f"cannot write under --out {args.out}: {err}"))
    print(summary(images, frames, skipped, time.perf_counter() - start, args.out, predictor.inference_path))
    return 2 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
