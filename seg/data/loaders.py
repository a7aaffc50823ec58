"""Dataset factory and DataLoader construction (single process or DDP).

Evaluation under DDP uses :class:`ContiguousSampler`, which gives each rank a contiguous slice
and pads nothing, so summing per-rank confusion matrices counts every image exactly once
(``DistributedSampler`` repeats samples to even out the ranks, which would bias the metric).
Ranks may then hold different numbers of batches; the metric all-reduce happens after the loop.
"""

from pathlib import Path
from typing import Iterator

import cv2
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from seg.data.base import SegmentationDataset, TransformFn
from seg.data.camvid import CamVid
from seg.data.cityscapes import Cityscapes
from seg.data.synthetic import SyntheticSegmentation
from seg.data.voc import VOCSegmentation

DATASETS: dict[str, type[SegmentationDataset]] = {
    "voc": VOCSegmentation,
    "cityscapes": Cityscapes,
    "camvid": CamVid,
    "synthetic": SyntheticSegmentation,
}


def build_dataset(name: str, root: str | Path, split: str,
                  transform: TransformFn | None = None) -> SegmentationDataset:
    """Instantiate a dataset by name: one of ``voc``, ``cityscapes``, ``camvid``, ``synthetic``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name](root, split, transform)


class ContiguousSampler(Sampler[int]):
    """Rank ``rank`` of ``world_size`` gets one contiguous slice of the indices, without padding."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        size = len(dataset)
        self.start = size * rank // world_size
        self.stop = size * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _innermost_transform(dataset: Dataset):
    while not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):  # Subset and friends
        dataset = dataset.dataset
    return getattr(dataset, "transform", None)


def _seed_transform(dataset: Dataset, seed: int) -> None:
    transform = _innermost_transform(dataset)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def _init_worker(worker_id: int) -> None:
    # OpenCV's own thread pool would oversubscribe the cores that the other workers use.
    cv2.setNumThreads(0)
    info = torch.utils.data.get_worker_info()
    # Forked workers inherit identical albumentations generators; reseed from torch's per-worker seed.
    _seed_transform(info.dataset, info.seed % 2**32)


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int = 0,
                 distributed: bool = False, seed: int = 0) -> DataLoader:
    """DataLoader for training (shuffled, drop_last) or evaluation (in order, nothing dropped).

    Training drops the last incomplete batch because batch-norm in DeepLab's pooling branch needs
    at least two samples. Under DDP (``torch.distributed`` initialised), training uses
    ``DistributedSampler``; call ``set_epoch(loader, epoch)`` each epoch. Evaluation uses
    :class:`ContiguousSampler`. Full-size evaluation images of different sizes need ``batch_size=1``.
    Augmentations are seeded from ``seed`` (and the rank), so runs repeat.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    generator = torch.Generator().manual_seed(seed + rank)
    if distributed:
        sampler = (DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True) if train
                   else ContiguousSampler(dataset, rank, world))
    else:
        sampler = None
    if num_workers == 0:
        _seed_transform(dataset, seed + rank)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), drop_last=train,
        persistent_workers=num_workers > 0, worker_init_fn=_init_worker if num_workers > 0 else None,
        generator=generator,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a DDP training loader for ``epoch`` (no-op for other samplers)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
