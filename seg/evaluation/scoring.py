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
from seg.data import build_dataset, build_eval_transform, make_synthetic
from seg.data.synthetic import holds_synthetic
from seg.data.base import DatasetError, SegmentationDataset
from seg.data.loaders import build_loader
from seg.evaluation.loop import evaluate


def prepare_synthetic(cfg: Config, create: bool = True) -> None:
    """Generate the synthetic set ``cfg`` describes, when ``data.name`` is synthetic and its root holds
    another one (or, with ``create``, none); a matching set is kept as is (:func:`seg.data.make_synthetic`).

    Training, evaluation and the ablation all call this, so a checkpoint is scored on the very set
    its run validated on, even after a config with other sizes regenerated the same root. Evaluation
    passes ``create=False``: a root that holds nothing is a mistyped path, for the reader to report.
    """
    data = cfg.data
    if data.name != "synthetic" or not (create or holds_synthetic(data.root)):
        return
    try:
        make_synthetic(data.root, n_train=data.synthetic_train_images, n_val=data.synthetic_val_images,
                       size=data.synthetic_image_size, seed=0)
    except OSError as err:
        raise DatasetError(f"data.root={data.root}: cannot write the synthetic dataset there "
                           f"({err.strerror}: {err.filename}); choose a writable data.root") from None


def val_dataset(cfg: Config) -> SegmentationDataset:
    """The split ``cfg`` scores on (``data.val_split``), checked against the model's class count."""
    prepare_synthetic(cfg, create=False)
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
