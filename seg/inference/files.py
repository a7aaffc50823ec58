"""Predict a list of inputs to files: images batch by batch, videos frame by frame, each input's
outputs under one folder (what ``predict_seg.py`` writes; see :mod:`seg.inference.outputs` for the files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2

from seg.data.base import MAX_PIXELS, DatasetError, read_image
from seg.inference.inputs import Input, Skipped
from seg.inference.outputs import OVERLAY_ALPHA, VideoOverlayWriter, frame_base, output_claims, write_prediction
from seg.inference.predictor import Predictor
from seg.utils.progress import Progress

DEFAULT_FPS = 25.0  # for containers that do not record a frame rate


@dataclass
class Outputs:
    """Where and how the outputs are written."""

    folder: Path
    batch: int = 1  # images (or video frames) per forward; only equal-sized images share one
    overlay_alpha: float = OVERLAY_ALPHA
    save_frames: bool = False  # videos: also every frame's class-index, colour and overlay images
    max_pixels: int = MAX_PIXELS  # larger images (or video frames) are skipped, judged before decoding


def predict_images(predictor: Predictor, items: list[Input], to: Outputs, skipped: list[Skipped]) -> int:
    """Write every image's outputs, ``to.batch`` at a time; unreadable ones go to ``skipped``; return
    how many were written."""
    progress = Progress(len(items), "images")
    done = 0
    for start in range(0, len(items), to.batch):
        chunk, images = [], []
        for item in items[start:start + to.batch]:
            try:
                images.append(read_image(item.path, to.max_pixels))
                chunk.append(item)
            except DatasetError as err:
                skipped.append(progress.skip(item.path, str(err)))
        for item, image, mask in zip(chunk, images, predictor.predict_batch(images)):
            write_prediction(to.folder / item.out, image, mask, predictor.palette, to.overlay_alpha)
        done += len(chunk)
        progress.update(len(items[start:start + to.batch]))
    progress.close()
    return done


def predict_video(predictor: Predictor, item: Input, to: Outputs, skipped: list[Skipped]) -> int:
    """Write ``<name>_overlay.mp4`` (and per-frame files with ``to.save_frames``); return the frame count."""
    capture = cv2.VideoCapture(str(item.path))
    if not capture.isOpened():
        skipped.append(Progress.warn(item.path, "OpenCV cannot open it as a video"))
        return 0
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    if size[0] * size[1] > to.max_pixels:
        capture.release()
        skipped.append(Progress.warn(item.path, f"its {size[0]}x{size[1]} frames exceed the limit of "
                                                f"{to.max_pixels:,} pixels"))
        return 0
    (overlay_path,), _ = output_claims(item.out, is_video=True)
    writer = VideoOverlayWriter(to.folder / overlay_path, fps, size, predictor.palette, to.overlay_alpha)
    progress = Progress(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), f"frames of {item.path.name}")
    try:
        while True:
            frames = []
            while len(frames) < to.batch and (grabbed := capture.read())[0]:
                frames.append(cv2.cvtColor(grabbed[1], cv2.COLOR_BGR2RGB))
            if not frames:
                break
            for frame, mask in zip(frames, predictor.predict_batch(frames)):
                if to.save_frames:
                    base = to.folder / frame_base(item.out, writer.frames)
                    write_prediction(base, frame, mask, predictor.palette, to.overlay_alpha)
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
