"""Training batches that resume exactly: the order and every augmentation are a function of
(seed, epoch, position), not of how many workers ran or when the process restarted.

``DistributedSampler`` already makes the order a function of (seed, epoch). We add two things:
a start offset, so a resumed run skips what it already consumed, and a per-sample augmentation
seed, which the dataset wrapper installs in the albumentations pipeline before each sample.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from seg.data.base import DatasetError

SEED_STRIDE = 1_000_003  # a prime, so (epoch, rank, position) triples do not collide in practice


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` yielding ``(index, augmentation_seed)`` that can start mid-epoch.

    Args:
        dataset: the dataset to sample from.
        num_replicas: number of processes (1 when not distributed).
        rank: this process's rank.
        seed: base seed shared by all ranks (the order) and mixed into the augmentation seeds.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Begin the next iteration at sample ``start`` of ``epoch`` (both per this rank)."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        for position in range(self.start, len(indices)):
            aug_seed = ((self.seed * SEED_STRIDE + self.epoch) * SEED_STRIDE + self.rank) * SEED_STRIDE + position
            yield indices[position], aug_seed % 2**32

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededDataset(Dataset):
    """Wraps a dataset with a ``transform.set_random_seed``; items are keyed ``(index, seed)``."""

    def __init__(self, dataset: Dataset) -> None:
        if getattr(dataset, "transform", None) is None:
            raise ValueError(f"{dataset!r} has no transform to seed")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        self.dataset.transform.set_random_seed(seed)
        return self.dataset[index]


def endless_batches(loader: DataLoader, start_iteration: int) -> Iterator:
    """Batches forever from a loader over a :class:`ResumableSampler`, from ``start_iteration``.

    The loader must use ``drop_last=True``, so one epoch is ``len(sampler) // batch_size`` batches.
    A set smaller than one batch is refused here, when called, not at the first batch: a run calls
    this before it writes anything into its directory.
    """
    sampler: ResumableSampler = loader.sampler
    batches_per_epoch = sampler.num_samples // loader.batch_size
    if batches_per_epoch == 0:
        raise DatasetError(f"the training set has {len(sampler.dataset)} samples, fewer than one batch of "
                           f"{loader.batch_size} per process; lower data.batch_size")
    return _batches(loader, sampler, batches_per_epoch, start_iteration)


def _batches(loader: DataLoader, sampler: ResumableSampler, batches_per_epoch: int,
             start_iteration: int) -> Iterator:
    epoch, batch = divmod(start_iteration, batches_per_epoch)
    while True:
        sampler.set_position(epoch, batch * loader.batch_size)
        yield from loader
        epoch, batch = epoch + 1, 0


def seeded_generator(seed: int) -> torch.Generator:
    """A private generator for the DataLoader, so creating iterators never draws from the global RNG."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
