"""Writing predictions: the class-index PNG, its colour rendering and an overlay, per image or per video.

``eval_seg.py --save-dir`` and ``predict_seg.py`` both write through :func:`write_prediction`, so
the files a scorer reads are made by one function. Every file is written atomically (temporary
file, then rename): a run killed mid-write leaves whole files only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from seg.data.palette import colorize
from seg.errors import UserError
from seg.utils.atomic import write_atomic

OVERLAY_ALPHA = 0.5  # image weight in the overlay: half image, half mask colours
JPEG_QUALITY = 95
VIDEO_FOURCC = "mp4v"  # the MPEG-4 codec every OpenCV build can write without extra libraries
IMAGE_OUTPUTS = (".png", "_color.png", "_overlay.jpg")  # appended to <base>: class indices, colours, overlay
VIDEO_OUTPUT = "_overlay.mp4"


class OutputError(UserError, ValueError):
    """An output folder or file that cannot be written."""


def image_outputs(base: Path) -> list[Path]:
    """The files :func:`write_prediction` writes for ``base``, in its order."""
    return [base.with_name(base.name + suffix) for suffix in IMAGE_OUTPUTS]


def frame_base(base: Path, index: int) -> Path:
    """Where frame ``index`` of the video whose outputs go to ``base`` is written (folder ``base``)."""
    return base / f"{base.name}_{index:06d}"


def output_claims(base: Path, is_video: bool, save_frames: bool = False) -> tuple[list[Path], list[Path]]:
    """(files, folders) that an input's outputs take at ``base``: an image's three files; a video's
    overlay and, with ``save_frames``, the folder of its frames (whose count is known only later)."""
    if not is_video:
        return image_outputs(base), []
    return [base.with_name(base.name + VIDEO_OUTPUT)], [base] if save_frames else []


def check_out_folder(folder: Path, flag: str) -> None:
    """Refuse, before any work, an output ``folder`` that is an existing file."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder} is a file; expected a folder (it is created if missing)")


def make_out_folder(folder: Path, flag: str) -> None:
    """Create ``folder`` and check that it takes files, so a read-only one fails here in one line
    rather than at the first image's write."""
    check_out_folder(folder, flag)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise OutputError(f"{flag} {folder} is not a writable folder: {err.strerror or err}") from None


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
    paths = image_outputs(base)
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
