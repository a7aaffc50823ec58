"""Writing predictions: the class-index PNG, its colour rendering and an overlay, per image or per video.

``eval_seg.py --save-dir`` and ``predict_seg.py`` both write through :func:`write_prediction`, so
the files a scorer reads are made by one function. Every file is written atomically (temporary
file, then rename): a run killed mid-write leaves whole files only.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from seg.data.palette import colorize
from seg.utils.atomic import write_atomic

OVERLAY_ALPHA = 0.5  # image weight in the overlay: half image, half mask colours
JPEG_QUALITY = 95
VIDEO_FOURCC = "mp4v"  # the MPEG-4 codec every OpenCV build can write without extra libraries


def overlay(image: np.ndarray, colors: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``alpha * image + (1 - alpha) * colors`` as HxWx3 uint8 RGB; the image is resized to the mask first."""
    if image.shape != colors.shape:
        image = cv2.resize(image, (colors.shape[1], colors.shape[0]))
    return (alpha * image + (1 - alpha) * colors).astype(np.uint8)


def _encode(path: Path, image: np.ndarray, params: tuple[int, ...] = ()) -> None:
    ok, data = cv2.imencode(path.suffix, image, list(params))
    if not ok:
        raise OSError(f"OpenCV could not encode {path}")
    write_atomic(path, data.tobytes())


def write_prediction(base: str | Path, image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
                     alpha: float = OVERLAY_ALPHA) -> list[Path]:
    """Write ``<base>.png`` (8-bit class indices, the format scorers read), ``<base>_color.png`` and
    ``<base>_overlay.jpg``; return their paths.

    Args:
        base: output path without extension; its folder is created.
        image: HxWx3 uint8 RGB, the picture the labels belong to (resized to them if it differs).
        labels: HxW class indices (< 256).
        palette: (num_classes, 3) uint8 RGB colours.
        alpha: image weight in the overlay.
    """
    base = Path(base)
    colors = colorize(labels, palette)
    paths = [base.with_name(base.name + suffix) for suffix in (".png", "_color.png", "_overlay.jpg")]
    _encode(paths[0], np.ascontiguousarray(labels, dtype=np.uint8))
    _encode(paths[1], colors[..., ::-1])
    _encode(paths[2], overlay(image, colors, alpha)[..., ::-1], (cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY))
    return paths


class VideoOverlayWriter:
    """Writes overlay frames to ``path`` (MPEG-4); the file appears under its name only on :meth:`close`.

    Args:
        path: the ``.mp4`` to write; its folder is created.
        fps: frame rate, the source video's.
        size: (width, height) of every frame, the source video's.
        palette: class colours.
        alpha: image weight in the overlay.
    """

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int], palette: np.ndarray,
                 alpha: float = OVERLAY_ALPHA) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the suffix tells OpenCV the container, so the temporary name keeps it
        self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp{self.path.suffix}")
        self.palette, self.alpha, self.frames = palette, alpha, 0
        self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*VIDEO_FOURCC), fps, size)
        if not self.writer.isOpened():
            raise OSError(f"OpenCV cannot write {self.path} ({VIDEO_FOURCC} at {size[0]}x{size[1]}, {fps:g} fps)")

    def write(self, frame: np.ndarray, labels: np.ndarray) -> None:
        """Add one frame: ``frame`` HxWx3 uint8 RGB and its HxW class indices."""
        self.writer.write(np.ascontiguousarray(overlay(frame, colorize(labels, self.palette), self.alpha)[..., ::-1]))
        self.frames += 1

    def close(self, keep: bool = True) -> None:
        """Finish the file and move it into place (``keep``), or delete the partial one."""
        self.writer.release()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoOverlayWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(keep=exc_type is None)
