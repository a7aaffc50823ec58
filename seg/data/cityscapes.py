"""Cityscapes fine annotations, evaluated on the 19 trainIds.

The labelId -> trainId table is built from ``cityscapesscripts.helpers.labels`` (the official
source) rather than copied, so it cannot drift from the benchmark's definition.
"""

from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS

from seg.data.base import MAX_LISTED, DatasetError, SegmentationDataset, SplitMissing, TransformFn, read_gray_png
from seg.data.palette import IGNORE_INDEX

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
TARGETS = ("auto", "labelIds", "labelTrainIds")
# one line, as every user error is (the full description: docs/datasets.md)
CITYSCAPES_LAYOUT = ("<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png with labels in "
                     "<root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png (or _gtFine_labelTrainIds.png, "
                     "written by datasets/prepare_cityscapes.py)")


def _train_labels() -> list:
    evaluated = [label for label in CITYSCAPES_LABELS if label.trainId not in (-1, IGNORE_INDEX)]
    return sorted(evaluated, key=lambda label: label.trainId)


def build_train_id_lut() -> np.ndarray:
    """256-entry uint8 table: labelId -> trainId, 255 for every id that is not evaluated.

    The license plate's id is -1, which no uint8 PNG holds, so it needs no entry.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in _train_labels():
        lut[label.id] = label.trainId
    return lut


TRAIN_ID_LUT = build_train_id_lut()
CITYSCAPES_CLASSES = tuple(label.name for label in _train_labels())
CITYSCAPES_PALETTE = np.array([label.color for label in _train_labels()], dtype=np.uint8)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map an HxW uint8 labelIds array to trainIds (255 = ignore)."""
    return cv2.LUT(label_ids, TRAIN_ID_LUT)


class Cityscapes(SegmentationDataset):
    """Cityscapes gtFine with 19 classes.

    Args:
        root: folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``train``, ``val`` or ``test``.
        transform: optional ``transform(image, mask) -> (image, mask)``.
        target: ``labelIds`` maps raw ids through :data:`TRAIN_ID_LUT`; ``labelTrainIds`` reads the
            prepared PNGs; ``auto`` reads a prepared PNG where one exists and maps labelIds otherwise.
        strict: refuse images without annotations; False leaves them out and lists them in
            ``problems`` (``datasets/check_dataset.py`` reads the rest).
    """

    classes = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE

    def __init__(self, root: str | Path, split: str = "train", transform: TransformFn | None = None,
                 target: str = "auto", strict: bool = True) -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.root, self.split = Path(root), split
        image_dir = self.root / "leftImg8bit" / split
        images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not image_dir.is_dir():
            raise SplitMissing(f"Cityscapes folder {image_dir} not found", CITYSCAPES_LAYOUT)
        if not images:
            raise DatasetError(f"no *{IMAGE_SUFFIX} files under {image_dir}; expected {CITYSCAPES_LAYOUT}")
        if not (self.root / "gtFine" / split).is_dir():
            raise SplitMissing(f"split {split!r} has no labels: {self.root / 'gtFine' / split} not found",
                               CITYSCAPES_LAYOUT)
        samples, missing = [], []
        for image in images:
            stem = self.root / "gtFine" / split / image.parent.name / image.name[: -len(IMAGE_SUFFIX)]
            train_ids, label_ids = Path(f"{stem}{TRAIN_IDS_SUFFIX}"), Path(f"{stem}{LABEL_IDS_SUFFIX}")
            wanted = label_ids if target == "labelIds" else train_ids
            if target == "auto" and not train_ids.is_file():
                wanted = label_ids
            if wanted.is_file():
                samples.append((image, wanted))
            else:
                missing.append(str(wanted))
        if missing and strict:
            raise DatasetError(f"{len(missing)} annotation(s) missing under {self.root / 'gtFine' / split}, "
                               f"e.g. {missing[:MAX_LISTED]}; expected {CITYSCAPES_LAYOUT}")
        super().__init__(samples, transform, [f"annotation {path} is missing" for path in missing])

    def load_mask(self, index: int) -> np.ndarray:
        path = self.samples[index][1]
        mask = read_gray_png(path)
        return label_ids_to_train_ids(mask) if path.name.endswith(LABEL_IDS_SUFFIX) else mask
