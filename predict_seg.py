"""Predict masks for your own images, folders and videos with a trained checkpoint (or its ONNX export).

  python predict_seg.py --checkpoint RUN/best.pt photos/ extra.jpg 'more/**/*.png' clip.mp4 --out masks/

Per image, under --out and mirroring each input's relative path: <name>.png (8-bit class indices at
the image's own size, as eval_seg.py --save-dir writes), <name>_color.png and <name>_overlay.jpg.
Per video: <name>_overlay.mp4 (same size and frame rate) and, with --save-frames, every frame's
files in <name>/. Inference settings, classes and palette come from the checkpoint (or the ONNX
file's metadata); the flags below override the settings.

Exit status: 0 when every input was predicted; 2 when some were skipped (each named in a warning
line and counted in the summary); 1 on a user error (missing input, empty folder, bad checkpoint),
in which case nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import torch

from seg.checkpoint import CheckpointError
from seg.cli import HelpFormatter
from seg.config import ConfigError
from seg.data.base import DatasetError, read_image
from seg.inputs import Input, InputError, Skipped, collect_inputs
from seg.outputs import OVERLAY_ALPHA, VideoOverlayWriter, write_prediction
from seg.predictor import Predictor
from seg.progress import Progress
from seg.runtime import OnnxModelError

USER_ERRORS = (InputError, ConfigError, CheckpointError, FileNotFoundError, OnnxModelError)
DEFAULT_FPS = 25.0  # for containers that do not record a frame rate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python predict_seg.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (searched recursively; images and videos by extension), glob "
                        "patterns (quote them; ** recurses) and video files (anything cv2.VideoCapture opens)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint written by train_seg.py (e.g. RUN/best.pt)")
    p.add_argument("--onnx", type=Path, help="run this model from `python -m seg.export` with onnxruntime (CPU) "
                   "instead of PyTorch; settings, classes and palette come from its metadata")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; must not be a file)")
    p.add_argument("--mode", choices=["whole", "slide"], help="whole image or sliding window (default: the "
                   "checkpoint's eval.mode; slide uses its eval.crop_size, else the training crop)")
    p.add_argument("--scales", type=float, nargs="+", help="multi-scale inference, e.g. 0.75 1.0 1.25 "
                   "(default: the checkpoint's eval.scales)")
    p.add_argument("--flip", action="store_true", help="also average with the horizontally flipped image")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch / onnxruntime (default: theirs)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda[:N]; "
                   "ignored with --onnx, which runs on the CPU")
    p.add_argument("--batch", type=int, default=1, help="images (or video frames) per forward; only "
                   "equal-sized images share one (default 1)")
    p.add_argument("--overlay-alpha", type=float, default=OVERLAY_ALPHA,
                   help=f"weight of the image in overlays, 0..1 (default {OVERLAY_ALPHA})")
    p.add_argument("--save-frames", action="store_true", help="for videos, also write every frame's "
                   "class-index, colour and overlay images into <name>/")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if (args.checkpoint is None) == (args.onnx is None):
        raise ConfigError("give exactly one of --checkpoint and --onnx")
    if args.batch < 1 or (args.threads is not None and args.threads < 1):
        raise ConfigError("--batch and --threads must be >= 1")
    if not 0.0 <= args.overlay_alpha <= 1.0:
        raise ConfigError(f"--overlay-alpha must be within 0..1, got {args.overlay_alpha}")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file, not a folder")


def build_predictor(args: argparse.Namespace) -> Predictor:
    settings = dict(mode=args.mode, scales=args.scales, flip=True if args.flip else None)
    if args.onnx is not None:
        return Predictor.from_onnx(args.onnx, threads=args.threads, **settings)
    if args.threads:
        torch.set_num_threads(args.threads)
    return Predictor.from_checkpoint(args.checkpoint, device=args.device, **settings)


def predict_images(predictor: Predictor, items: list[Input], args: argparse.Namespace,
                   skipped: list[Skipped]) -> int:
    """Write every image's outputs, ``--batch`` at a time; unreadable ones go to ``skipped``."""
    progress = Progress(len(items), "images")
    done = 0
    for start in range(0, len(items), args.batch):
        chunk, images = [], []
        for item in items[start:start + args.batch]:
            try:
                images.append(read_image(item.path))
                chunk.append(item)
            except DatasetError as err:
                skipped.append(progress.skip(item.path, str(err)))
        for item, image, mask in zip(chunk, images, predictor.predict_batch(images)):
            write_prediction(args.out / item.out, image, mask, predictor.palette, args.overlay_alpha)
        done += len(chunk)
        progress.update(len(items[start:start + args.batch]))
    progress.close()
    return done


def predict_video(predictor: Predictor, item: Input, args: argparse.Namespace, skipped: list[Skipped]) -> int:
    """Write ``<name>_overlay.mp4`` (and per-frame files with --save-frames); return the frame count."""
    capture = cv2.VideoCapture(str(item.path))
    if not capture.isOpened():
        skipped.append(Progress.warn(item.path, "OpenCV cannot open it as a video"))
        return 0
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    writer = VideoOverlayWriter(args.out / f"{item.out}_overlay.mp4", fps, size, predictor.palette, args.overlay_alpha)
    progress = Progress(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), f"frames of {item.path.name}")
    try:
        while True:
            frames = []
            while len(frames) < args.batch and (grabbed := capture.read())[0]:
                frames.append(cv2.cvtColor(grabbed[1], cv2.COLOR_BGR2RGB))
            if not frames:
                break
            for frame, mask in zip(frames, predictor.predict_batch(frames)):
                if args.save_frames:
                    base = args.out / item.out / f"{item.out.name}_{writer.frames:06d}"
                    write_prediction(base, frame, mask, predictor.palette, args.overlay_alpha)
                writer.write(frame, mask)
            progress.update(len(frames))
    except BaseException:
        writer.close(keep=False)
        raise
    finally:
        capture.release()
        progress.close()
    writer.close(keep=writer.frames > 0)
    if not writer.frames:
        skipped.append(Progress.warn(item.path, "no frame could be decoded"))
    return writer.frames


def summary(images: int, frames: int, skipped: list[Skipped], seconds: float, out: Path) -> str:
    done = f"{images} image(s)" + (f" and {frames} video frame(s)" if frames else "")
    lines = [f"predicted {done} in {seconds:.1f} s; outputs in {out}"]
    if skipped:
        lines.append(f"skipped {len(skipped)}:")
        lines += [f"  {s.path}: {s.reason}" for s in skipped]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        check_args(args)
        items, skipped = collect_inputs(args.inputs)
        predictor = build_predictor(args)
    except USER_ERRORS as err:  # nothing has been written yet
        print(f"error: {err}", file=sys.stderr)
        return 1
    for entry in skipped:
        Progress.warn(entry.path, entry.reason)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        images = predict_images(predictor, [i for i in items if not i.is_video], args, skipped)
        frames = sum(predict_video(predictor, item, args, skipped) for item in items if item.is_video)
    except OnnxModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(images, frames, skipped, time.perf_counter() - start, args.out))
    return 2 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
