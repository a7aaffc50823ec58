"""Datasets, augmentation pipelines and loaders.

Datasets take ``(root, split, transform=None)`` and yield (HxWx3 uint8 RGB, HxW uint8 mask with
255 = ignore), or ``transform(image, mask)`` when a transform is given. Each exposes ``classes``,
``palette`` and ``num_classes``.
"""

from seg.data.base import DatasetError, SegmentationDataset
from seg.data.camvid import CamVid
from seg.data.cityscapes import Cityscapes, label_ids_to_train_ids
from seg.data.loaders import ContiguousSampler, DATASETS, build_dataset, build_loader
from seg.data.palette import IGNORE_INDEX, colorize, voc_palette
from seg.data.synthetic import SyntheticSegmentation, make_synthetic
from seg.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, PairTransform, build_eval_transform,
                                 build_train_transform)
from seg.data.voc import VOCSegmentation

__all__ = [
    "CamVid", "Cityscapes", "ContiguousSampler", "DATASETS", "DatasetError", "IGNORE_INDEX", "IMAGENET_MEAN",
    "IMAGENET_STD", "PairTransform", "SegmentationDataset", "SyntheticSegmentation", "VOCSegmentation",
    "build_dataset", "build_eval_transform", "build_loader", "build_train_transform", "colorize",
    "label_ids_to_train_ids", "make_synthetic", "voc_palette",
]
