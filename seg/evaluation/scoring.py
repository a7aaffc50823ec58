"""Score a checkpoint on a labelled split: the evaluation path ``eval_seg.py`` and ``seg.tools.ablation`` share.

Training's validation runs the same loop (:func:`seg.evaluation.loop.evaluate`) with the same settings
(:func:`seg.config.inference_settings`), so a checkpoint scored here reproduces the validation
that chose it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from seg.config import Config, ConfigError, inference_settings
from seg.data import build_dataset, build_eval_transform
from seg.data.base import SegmentationDataset
from seg.data.loaders import build_loader
from seg.evaluation.loop import evaluate


def val_dataset(cfg: Config) -> SegmentationDataset:
    """The split ``cfg`` scores on (``data.val_split``), checked against the model's class count."""
    dataset = build_dataset(cfg.data.name, cfg.data.root, cfg.data.val_split, build_eval_transform())
    if dataset.num_classes != cfg.data.num_classes:
        raise ConfigError(f"the model predicts {cfg.data.num_classes} classes but {cfg.data.root} "
                          f"holds {dataset.num_classes}")
    return dataset


def score(model: nn.Module, dataset: SegmentationDataset, cfg: Config, device: torch.device, distributed: bool = False,
          on_batch: Callable | None = None) -> dict:
    """Metrics of ``model`` on ``dataset`` under ``cfg``'s inference settings (each rank a contiguous shard).

    ``on_batch(batch_index, images, targets, predictions)`` as in :func:`seg.evaluation.loop.evaluate`; a
    rank's batches walk its shard, ``seg.data.loaders.ContiguousSampler``, in order.
    """
    loader = build_loader(dataset, cfg.data.val_batch_size, train=False, num_workers=cfg.data.num_workers,
                          distributed=distributed)
    return evaluate(model, loader, cfg.data.num_classes, device=device, on_batch=on_batch, **inference_settings(cfg))
