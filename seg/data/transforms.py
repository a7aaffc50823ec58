"""Albumentations (2.x) pipelines for training and evaluation.

A pipeline is called as ``transform(image, mask)`` on an HxWx3 uint8 RGB image and an HxW uint8
mask, and returns (3xHxW float32 normalised tensor, HxW int64 tensor). Masks are only ever
resampled with nearest-neighbour interpolation and padded with the ignore index, so no pipeline
can invent a label value.
"""

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from seg.data.palette import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PairTransform:
    """Wraps an ``A.Compose`` so datasets can call ``transform(image, mask) -> (image, mask)``."""

    def __init__(self, compose: A.Compose) -> None:
        self.compose = compose

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.compose(image=image, mask=mask)
        return out["image"], out["mask"].long()

    def set_random_seed(self, seed: int | None) -> None:
        """Reseed the augmentations; DataLoader workers call this so they do not repeat each other."""
        self.compose.set_random_seed(seed)

    def __repr__(self) -> str:
        return f"PairTransform({self.compose!r})"


def _finish(mean: tuple[float, ...], std: tuple[float, ...]) -> list:
    return [A.Normalize(mean=mean, std=std), ToTensorV2()]


def build_train_transform(crop_size: int | tuple[int, int], scale: tuple[float, float] = (0.5, 2.0),
                          hflip: bool = True, jitter: bool = False,
                          mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                          seed: int | None = None) -> PairTransform:
    """Random rescale, pad to the crop (image 0, mask 255), random crop, flip, optional colour jitter.

    Args:
        crop_size: output side, or (height, width).
        scale: range of the random rescale factor; (1, 1) disables it.
        hflip: random horizontal flip with probability 0.5.
        jitter: photometric jitter (brightness, contrast, saturation, small hue shift).
        mean, std: normalisation in 0..1 units.
        seed: seed of the augmentation stream (None: fresh entropy).
    """
    height, width = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    steps = []
    if tuple(scale) != (1.0, 1.0):
        steps.append(A.RandomScale(scale_limit=(scale[0] - 1.0, scale[1] - 1.0), interpolation=cv2.INTER_LINEAR,
                                   mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    steps += [
        A.PadIfNeeded(min_height=height, min_width=width, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                      fill=0, fill_mask=IGNORE_INDEX),
        A.RandomCrop(height=height, width=width),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if jitter:
        steps.append(A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8))
    return PairTransform(A.Compose(steps + _finish(mean, std), seed=seed))


def build_eval_transform(mean: tuple[float, ...] = IMAGENET_MEAN,
                         std: tuple[float, ...] = IMAGENET_STD) -> PairTransform:
    """Normalise and convert only; the full image is kept (inference handles sizes)."""
    return PairTransform(A.Compose(_finish(mean, std)))
