"""CamVid in the SegNet tutorial layout: 11 classes, label 11 (void) becomes 255."""

from pathlib import Path

import cv2
import numpy as np

from seg.data.base import MAX_LISTED, DatasetError, SegmentationDataset, SplitMissing, TransformFn, read_gray_png
from seg.data.palette import IGNORE_INDEX

CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist")
# SegNet tutorial colours, in class order.
CAMVID_PALETTE = np.array([
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)], dtype=np.uint8)
CAMVID_VOID = 11
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# one line, as every user error is (the full description: docs/datasets.md)
CAMVID_LAYOUT = ("<root>/<split>/*.png|*.jpg images with 8-bit labels (0..10, 11 = void) of the same stem in "
                 "<root>/<split>annot/*.png")

_VOID_TO_IGNORE = np.arange(256, dtype=np.uint8)
_VOID_TO_IGNORE[CAMVID_VOID] = IGNORE_INDEX


def _stems(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise SplitMissing(f"CamVid folder {folder} not found", CAMVID_LAYOUT)
    return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in suffixes}


class CamVid(SegmentationDataset):
    """CamVid (SegNet version). Images may be PNG or JPEG; image and label are matched by file stem.

    Args:
        root: folder holding ``<split>/`` and ``<split>annot/``.
        split: ``train``, ``val`` or ``test``.
        transform: optional ``transform(image, mask) -> (image, mask)``.
        strict: refuse an image without a label or a label without an image; False leaves them out
            and lists them in ``problems`` (``datasets/check_dataset.py`` reads the rest).
    """

    classes = CAMVID_CLASSES
    palette = CAMVID_PALETTE

    def __init__(self, root: str | Path, split: str = "train", transform: TransformFn | None = None,
                 strict: bool = True) -> None:
        self.root, self.split = Path(root), split
        images = _stems(self.root / split, IMAGE_SUFFIXES)
        labels = _stems(self.root / f"{split}annot", (".png",))
        if not images:
            raise DatasetError(f"no images in {self.root / split}; expected {CAMVID_LAYOUT}")
        problems = []
        for have, lack, what in ((images, labels, "label"), (labels, images, "image")):
            orphans = sorted(set(have) - set(lack))
            if orphans and strict:
                raise DatasetError(f"{len(orphans)} file(s) in {self.root} have no matching {what} "
                                   f"(matched by stem), e.g. {[str(have[s]) for s in orphans[:MAX_LISTED]]}")
            problems += [f"{have[s]} has no matching {what} (matched by stem)" for s in orphans]
        super().__init__([(images[s], labels[s]) for s in sorted(images.keys() & labels.keys())], transform,
                         problems)

    def load_mask(self, index: int) -> np.ndarray:
        return cv2.LUT(read_gray_png(self.samples[index][1]), _VOID_TO_IGNORE)
