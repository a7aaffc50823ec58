"""Shared reading and checking for the segmentation datasets.

Every dataset is a list of (image path, mask path) pairs plus a way to turn a mask file into
train labels. Items are checked as they are read (sizes, label range) because training silently
on a broken mask is far more expensive than two ``np.any`` calls per item.
"""

import io
import warnings
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from seg.data.palette import IGNORE_INDEX
from seg.errors import UserError

TransformFn = Callable[[np.ndarray, np.ndarray], tuple]
MAX_LISTED = 5  # how many offending files an error message names


class DatasetError(UserError, ValueError):
    """A dataset file or layout is not what the reader expects."""


class SplitMissing(DatasetError, FileNotFoundError):
    """A split that is not there: its folder or list is absent, or its labels are withheld (a test split).

    ``datasets/check_dataset.py`` notes it (``absent``) rather than counting a problem; training still
    stops on it, with the layout that was expected.
    """

    def __init__(self, absent: str, expected: str) -> None:
        super().__init__(f"{absent}; expected {expected}")
        self.absent, self.expected = absent, expected

    def __reduce__(self):  # pickled (from a worker process) by its two parts, not its message
        return type(self), (self.absent, self.expected)


JPEG_END = b"\xff\xd9"  # EOI marker
JPEG_TAIL = 4096  # bytes searched for it: trailers (padding, vendor data) are short
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's default limit, 89,478,485: ~256 MiB as 8-bit RGB
# PIL refuses to open even the header of a larger image, so no limit above this can be honoured
PIL_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


def read_complete(path: Path) -> bytes:
    """The bytes of an image file, refusing an empty one and a JPEG or PNG cut short.

    OpenCV decodes truncated files without an error (libjpeg only prints "Premature end of JPEG file",
    with no file name) and fills the missing rows with grey, which would train silently on them.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror}") from None
    if not data:
        raise DatasetError(f"{path} is empty (0 bytes); re-copy or re-export it, or remove it")
    tail = data[-JPEG_TAIL:]
    # Some cameras and editors append bytes after a JPEG's end marker. Inside the compressed data
    # 0xFF is always stuffed, so an end marker near the end means the image data is complete.
    truncated = ((data[:2] == b"\xff\xd8" and JPEG_END not in tail)
                 or (data[:8] == b"\x89PNG\r\n\x1a\n" and not data.rstrip(b"\0").endswith(PNG_END)))
    if truncated:
        raise DatasetError(f"{path} is truncated ({len(data)} bytes, no end marker); "
                           "re-copy or re-export it, or remove it from the dataset")
    return data


def open_checked(path: Path, what: str = "image", max_pixels: int = MAX_PIXELS) -> tuple[bytes, Image.Image]:
    """The file's bytes and the image in them opened lazily (PIL has read the header only).

    Every image and label read starts here, so a bad file gives one line naming it. The size is
    checked from the header before anything is decoded: a small file can declare 30000x30000, and
    decoding it would allocate gigabytes.
    """
    data = read_complete(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit follows, naming the file
        try:
            header = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise DatasetError(f"{what} {path} declares more than {PIL_MAX_PIXELS:,} pixels, over the limit of "
                               f"{max_pixels:,}") from None
        except (OSError, SyntaxError, ValueError):  # PIL's "cannot identify image file <BytesIO ...>" names no file
            raise DatasetError(f"cannot read {what} {path}: not an image file (no image format recognised in "
                               f"its {len(data)} bytes)") from None
    width, height = header.size
    if width * height > max_pixels:
        header.close()
        raise DatasetError(f"{what} {path} declares {width}x{height} = {width * height:,} pixels, over the limit "
                           f"of {max_pixels:,}")
    return data, header


def _decode_cv2(path: Path, what: str, flags: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    data, header = open_checked(path, what, max_pixels)
    header.close()
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as err:
        raise DatasetError(f"cannot read {what} {path}: OpenCV cannot decode it ({err.err})") from None
    if image is None:
        raise DatasetError(f"cannot read {what} {path}: OpenCV cannot decode it")
    return image


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB with OpenCV, after :func:`open_checked`."""
    return _decode_cv2(path, "image", cv2.IMREAD_COLOR_RGB, max_pixels)


def read_label_png(path: Path) -> np.ndarray:
    """Read a label PNG as an HxW uint8 array of class indices.

    Palette ("P") PNGs are decoded through PIL because OpenCV expands them to the palette's
    RGB colours, which would silently turn class indices into colours.
    """
    _, png = open_checked(path, "label")
    with png:
        if png.mode not in ("P", "L"):
            raise DatasetError(f"label {path} has PIL mode {png.mode!r}; expected a palette ('P') or "
                               "8-bit grayscale ('L') PNG holding class indices")
        try:
            return np.array(png)  # a writable copy: torch warns on read-only arrays
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for corrupt image data
            raise DatasetError(f"cannot read label {path}: {err}") from None


def read_gray_png(path: Path) -> np.ndarray:
    """Read an 8-bit single-channel label PNG (CamVid, Cityscapes) with OpenCV, the fast path."""
    mask = _decode_cv2(path, "label", cv2.IMREAD_UNCHANGED)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise DatasetError(f"label {path} is {mask.dtype} with shape {mask.shape}; expected an 8-bit "
                           "single-channel PNG of class ids")
    return mask


def list_ids(list_file: Path, layout: str) -> list[str]:
    """Read a split list (one id per line), explaining the expected layout when it is absent."""
    if not list_file.is_file():
        raise SplitMissing(f"split list {list_file} not found", layout)
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split list {list_file} is empty")
    return ids


def missing_files(paths: Sequence[Path]) -> list[Path]:
    """Those of ``paths`` that do not exist, in order (each folder is listed once: one stat per file
    is slow on network filesystems)."""
    listings: dict[Path, set[str]] = {}
    for folder in {path.parent for path in paths}:
        listings[folder] = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return [path for path in paths if path.name not in listings[path.parent]]


def check_label_range(mask: np.ndarray, num_classes: int, path: Path) -> None:
    """Raise when ``mask`` holds a value outside 0..num_classes-1 and the ignore index."""
    if mask.max(initial=0) < num_classes:
        return
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = np.unique(mask[bad])[:MAX_LISTED].tolist()
        raise DatasetError(f"label {path} holds values {values}; expected 0..{num_classes - 1} "
                           f"or {IGNORE_INDEX} (ignore)")


class SegmentationDataset(Dataset):
    """(image, mask) pairs; subclasses fill ``samples`` and set ``classes`` and ``palette``.

    Without a transform an item is (HxWx3 uint8 RGB array, HxW uint8 mask with 255 = ignore).
    With one, the item is whatever ``transform(image, mask)`` returns (tensors for ours).
    """

    classes: tuple[str, ...] = ()
    palette: np.ndarray = np.zeros((0, 3), dtype=np.uint8)

    def __init__(self, samples: list[tuple[Path, Path]], transform: TransformFn | None = None,
                 problems: Sequence[str] = ()) -> None:
        self.samples = samples
        self.transform = transform
        # what a lenient listing (``strict=False``) left out: one line per missing or orphan file
        self.problems = list(problems)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load_mask(self, index: int) -> np.ndarray:
        """Train labels of sample ``index`` (HxW uint8, 255 = ignore); overridden per dataset."""
        return read_label_png(self.samples[index][1])

    def __getitem__(self, index: int):
        image_path, mask_path = self.samples[index]
        image = read_image(image_path)
        mask = self.load_mask(index)
        if image.shape[:2] != mask.shape:
            raise DatasetError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its mask "
                               f"{mask_path} is {mask.shape[1]}x{mask.shape[0]}; expected equal sizes")
        check_label_range(mask, self.num_classes, mask_path)
        if self.transform is None:
            return image, mask
        return self.transform(image, mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {self.num_classes} classes)"
