"""Pascal VOC 2012 semantic segmentation, including the SBD-augmented ``train_aug`` split."""

from pathlib import Path

from seg.data.base import (MAX_LISTED, DatasetError, SegmentationDataset, SplitMissing, TransformFn, list_ids,
                            missing_files)
from seg.data.palette import voc_palette

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
AUG_SPLIT = "train_aug"
# one line, as every user error is (the full description: docs/datasets.md)
VOC_LAYOUT = ("<root>/VOCdevkit/VOC2012/ (or <root> being that folder) holding JPEGImages/<id>.jpg, "
              "SegmentationClass/<id>.png (palette PNGs of class indices, 255 = void; SegmentationClassAug/ for "
              "train_aug, from datasets/prepare_voc_aug.py) and ImageSets/Segmentation/<split>.txt (one id per line)")


def find_voc_dir(root: str | Path) -> Path:
    """The VOC2012 folder under ``root`` (``root`` may be its parent, grandparent or the folder itself)."""
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(f"no VOC2012 folder with JPEGImages/ under {root}; expected {VOC_LAYOUT}")


class VOCSegmentation(SegmentationDataset):
    """Pascal VOC 2012 segmentation: 21 classes, palette PNG masks read as indices, 255 = void.

    Args:
        root: folder holding ``VOCdevkit/VOC2012`` (or the VOC2012 folder itself).
        split: name of a list in ``ImageSets/Segmentation`` (``train``, ``val``, ``trainval``, ``train_aug``);
            ``train_aug`` reads its masks from ``SegmentationClassAug``.
        transform: optional ``transform(image, mask) -> (image, mask)``.
        strict: refuse a list naming missing files; False leaves those samples out and lists them
            in ``problems`` (``datasets/check_dataset.py`` reads the rest).
    """

    classes = VOC_CLASSES
    palette = voc_palette(len(VOC_CLASSES))

    def __init__(self, root: str | Path, split: str = "train", transform: TransformFn | None = None,
                 strict: bool = True) -> None:
        self.root = find_voc_dir(root)
        self.split = split
        list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        ids = list_ids(list_file, VOC_LAYOUT)
        mask_dir = self.root / ("SegmentationClassAug" if split == AUG_SPLIT else "SegmentationClass")
        if not mask_dir.is_dir():  # VOC's test split ships its list and images, never its masks
            raise SplitMissing(f"split {split!r} has no masks: {mask_dir} not found", VOC_LAYOUT)
        samples = [(self.root / "JPEGImages" / f"{i}.jpg", mask_dir / f"{i}.png") for i in ids]
        missing = missing_files([p for pair in samples for p in pair])
        if missing and strict:
            raise DatasetError(f"{len(missing)} file(s) listed by {list_file} are missing, "
                               f"e.g. {[str(p) for p in missing[:MAX_LISTED]]}")
        gone = set(missing)
        samples = [pair for pair in samples if gone.isdisjoint(pair)]
        super().__init__(samples, transform, [f"{p} is missing (listed by {list_file})" for p in missing])
