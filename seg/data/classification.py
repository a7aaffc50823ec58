"""Classification sets for encoder pretraining: the ImageFolder layout, and a synthetic one.

``root/<split>/<class>/<image>`` (ImageNet's usual layout, torchvision's ``ImageFolder``); classes
are the sorted folder names. Images are read by :func:`seg.data.base.read_image` (OpenCV, one clear
line for a bad file) and augmented by timm's ImageNet transforms: random-resized crop and flip
for training, resize + centre crop for evaluation, the CA paper's recipe. timm's transforms work
on PIL images and draw from Python's and torch's RNGs, so :class:`SeededTimmTransform` seeds both
per sample, which makes a resumed run see exactly the crops it would have seen.

:func:`make_synthetic_classes` draws the synthetic segmentation set's objects one per image
(outline and texture tell the class, never colour), so pretraining on it teaches features the
synthetic segmentation task uses, with nothing downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import cv2
import numpy as np
import timm.data
import torch
from PIL import Image
from torch.utils.data import Dataset

from seg.data.base import DatasetError, read_image
from seg.data.synthetic import SYNTHETIC_CLASSES, background, finish_image, paint_object
from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EVAL_CROP_PCT = 0.875  # resize to size / 0.875, centre-crop size: 256 -> 224 at ImageNet's scale
SYNTHETIC_OBJECTS = SYNTHETIC_CLASSES[1:]  # disc, square, triangle, cross
SPEC_FILE = "synthetic_classes.json"
FORMAT_VERSION = 1


class SeededTimmTransform:
    """A timm (torchvision) transform with albumentations' ``set_random_seed``, applied to RGB arrays."""

    def __init__(self, transform) -> None:
        self.transform, self.seed = transform, None

    def set_random_seed(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        picture = Image.fromarray(image)
        if self.seed is None:
            return self.transform(picture)
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(self.seed)
            torch.manual_seed(self.seed)
            try:
                return self.transform(picture)
            finally:
                random.setstate(state)


def build_classification_transform(size: int, train: bool,
                                   crop_scale: tuple[float, float] = (0.08, 1.0)) -> SeededTimmTransform:
    """timm's ImageNet transform at ``size``: random-resized crop (area fraction in ``crop_scale``) + flip
    (train), or resize + centre crop."""
    if train:
        transform = timm.data.create_transform(size, is_training=True, scale=tuple(crop_scale), hflip=0.5,
                                               color_jitter=None, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    else:
        transform = timm.data.create_transform(size, is_training=False, crop_pct=EVAL_CROP_PCT,
                                               mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return SeededTimmTransform(transform)


class ImageFolderClasses(Dataset):
    """``root/split/<class>/<image>`` as (image, class index) samples.

    Args:
        root: the set's folder.
        split: the subfolder, e.g. "train" or "val".
        transform: called on each HxWx3 uint8 RGB image; None returns the array.
    """

    def __init__(self, root: str | Path, split: str, transform=None) -> None:
        folder = Path(root) / split
        if not folder.is_dir():
            raise DatasetError(f"{folder} is not a folder; expected an ImageFolder layout, {root}/{split}/<class>/<image>")
        self.classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir()))
        self.samples = [(path, index) for index, name in enumerate(self.classes)
                        for path in sorted((folder / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise DatasetError(f"{folder} holds no images in class folders ({', '.join(IMAGE_SUFFIXES)}); "
                               f"expected {folder}/<class>/<image>")
        self.transform = transform

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = read_image(path)
        return (image if self.transform is None else self.transform(image)), label

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def render_object(rng: np.random.Generator, size: int, kind: int) -> np.ndarray:
    """One HxWx3 uint8 RGB image: a cluttered background and one textured object of class ``kind`` (1..4)."""
    image = background(rng, size)
    paint_object(image, kind, rng)
    return finish_image(image, rng)


def make_synthetic_classes(root: str | Path, n_train: int = 400, n_val: int = 80, size: int = 64,
                           seed: int = 0) -> Path:
    """Generate (or reuse) the synthetic classification set under ``root`` in the ImageFolder layout.

    Deterministic for a given (n_train, n_val, size, seed); classes are balanced.
    """
    root = Path(root)
    spec = {"version": FORMAT_VERSION, "n_train": n_train, "n_val": n_val, "size": size, "seed": seed}
    spec_file = root / SPEC_FILE
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return root
    spec_file.unlink(missing_ok=True)  # an interrupted run must not look complete
    for stream, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        rng = np.random.default_rng([seed, stream])
        for name in SYNTHETIC_OBJECTS:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            kind = 1 + i % len(SYNTHETIC_OBJECTS)
            image = render_object(rng, size, kind)
            cv2.imwrite(str(root / split / SYNTHETIC_OBJECTS[kind - 1] / f"{i:05d}.png"),
                        cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    spec_file.write_text(json.dumps(spec))
    return root
