"""Loader timing for ``python -m seg.tools.bench --scope pipeline``: what one DataLoader worker does
per training image (decode + augment + to-tensor, one process, one thread), without a model.

Inputs: VOC-sized (500x375 JPEG) and Cityscapes-sized (2048x1024 PNG) temporary images, and a real
CamVid root's train split when one is given. Against each dataset "plain" runs bare OpenCV reads and
the same albumentations ops, to show what the dataset layer adds; a second plain is the A/A control.
One call is one pass over the dataset's images, timed in turn by :mod:`seg.tools.timing`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from seg.data.camvid import CamVid
from seg.data.cityscapes import Cityscapes
from seg.data.palette import save_index_png
from seg.data.transforms import build_train_transform
from seg.data.voc import VOCSegmentation
from seg.tools.timing import interleaved

PIPELINE, PLAIN, AA = "pipeline", "plain", "plain A/A"


def photo_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Photo-like content (smooth colour + mild noise) so the codecs work as hard as on real data."""
    image = cv2.resize(rng.uniform(0, 255, (6, 8, 3)).astype(np.float32), (width, height))
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    labels = cv2.resize(rng.integers(0, 19, (6, 8), dtype=np.uint8), (width, height),
                        interpolation=cv2.INTER_NEAREST)
    return image, labels


def make_voc_like(root: Path, count: int = 16, size: tuple[int, int] = (500, 375)) -> VOCSegmentation:
    """A VOC 2012 layout of ``count`` JPEG images (``size`` = width, height) under ``root``."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image, labels = photo_scene(rng, *size)
        cv2.imwrite(str(voc / "JPEGImages" / f"{i}.jpg"), image)
        save_index_png(voc / "SegmentationClass" / f"{i}.png", labels)
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(map(str, range(count))))
    return VOCSegmentation(root, "train")


def make_cityscapes_like(root: Path, count: int = 4, size: tuple[int, int] = (2048, 1024)) -> Cityscapes:
    """A Cityscapes layout of ``count`` PNG images (``size`` = width, height) under ``root``."""
    images, labels_dir = root / "leftImg8bit/train/city", root / "gtFine/train/city"
    images.mkdir(parents=True)
    labels_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image, labels = photo_scene(rng, *size)
        cv2.imwrite(str(images / f"city_{i}_leftImg8bit.png"), image)
        cv2.imwrite(str(labels_dir / f"city_{i}_gtFine_labelIds.png"), labels + 7)
    return Cityscapes(root, "train")


def _passes(dataset, transform) -> dict[str, Callable[[], None]]:
    """One pass over ``dataset`` through its own loading, and through bare decode + the same ops."""
    def pipeline():
        for i in range(len(dataset)):
            dataset[i]

    def plain():
        for image_path, mask_path in dataset.samples:
            image = cv2.imread(str(image_path), cv2.IMREAD_COLOR_RGB)
            mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
            transform.compose(image=image, mask=mask)

    dataset.transform = transform
    return {PIPELINE: pipeline, PLAIN: plain, AA: plain}


def pipeline_times(crop: int = 512, repeats: int = 15, camvid: Path | None = None,
                   sizes: dict[str, tuple[int, int]] | None = None) -> dict[str, dict]:
    """Per input: ``{"images": n, "seconds": {PIPELINE | PLAIN | AA: [s per pass, ...]}}``.

    ``sizes`` overrides the temporary images' (width, height) per input, for quick checks.
    """
    sizes = {"voc": (500, 375), "cityscapes": (2048, 1024), **(sizes or {})}
    cv2.setNumThreads(0)  # as in a DataLoader worker: one core per worker
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    transform = build_train_transform(crop, seed=0)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            w, h = sizes["voc"]
            sets = {f"VOC-sized {w}x{h} jpg": make_voc_like(Path(tmp) / "voc", size=sizes["voc"])}
            w, h = sizes["cityscapes"]
            sets[f"Cityscapes-sized {w}x{h} png"] = make_cityscapes_like(Path(tmp) / "cs", size=sizes["cityscapes"])
            if camvid is not None:
                sets[f"CamVid png ({camvid})"] = CamVid(camvid, "train")
            for name, dataset in sets.items():
                results[name] = {"images": len(dataset),
                                 "seconds": interleaved(_passes(dataset, transform), repeats, warmup=1)}
    finally:
        torch.set_num_threads(previous)
    return results
