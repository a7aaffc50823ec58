"""Dataset factory and DataLoader construction (single process or DDP).

Evaluation under DDP uses :class:`ContiguousSampler`, which gives each rank a contiguous slice
and pads nothing, so summing per-rank confusion matrices counts every image exactly once
(``DistributedSampler`` repeats samples to even out the ranks, which would bias the metric).
Ranks may then hold different numbers of batches; the metric all-reduce happens after the loop.
"""

import re
from pathlib import Path
from typing import Iterator

import cv2
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from seg.data.base import DatasetError, SegmentationDataset, TransformFn
from seg.data.camvid import CamVid
from seg.data.cityscapes import Cityscapes
from seg.data.sampling import ResumableSampler, SeededDataset, seeded_generator
from seg.data.synthetic import SyntheticSegmentation
from seg.data.voc import VOCSegmentation

DATASETS: dict[str, type[SegmentationDataset]] = {
    "voc": VOCSegmentation,
    "cityscapes": Cityscapes,
    "camvid": CamVid,
    "synthetic": SyntheticSegmentation,
}


def build_dataset(name: str, root: str | Path, split: str, transform: TransformFn | None = None,
                  strict: bool = True) -> SegmentationDataset:
    """Instantiate a dataset by name: one of ``voc``, ``cityscapes``, ``camvid``, ``synthetic``.
    ``strict=False`` lists missing and orphan files in ``dataset.problems`` instead of refusing them."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name](root, split, transform, strict=strict)


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


WORKER_ERROR = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


class SegLoader(DataLoader):
    """A DataLoader whose dataset errors read the same with or without worker processes.

    A worker's exception reaches the main process as the same type holding "Caught ... in
    DataLoader worker process N", the worker's traceback and, on its last line, the message. For
    a :class:`DatasetError` (the user's data, not a bug) only that last line is kept.
    """

    def __iter__(self) -> Iterator:
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DatasetError as err:
                error = unwrap_worker_error(err)
            else:
                yield batch
                continue
            # The workers are shut down now, and the error is raised outside the except clause, so
            # that it holds no reference (as __context__, through the traceback's frames) to them.
            # Left to the iterator's __del__, they lingered until a garbage collection, which then
            # waited 5 s for them to join.
            _shut_down(batches)
            self._iterator = None  # kept for persistent workers; the next epoch must start new ones
            raise error

    def close(self) -> None:
        """Stop the persistent workers now, not when the loader is collected.

        A run that ends in an error leaves the loaders in reference cycles (through the traceback's
        frames): their workers then lived until a later garbage collection, which waited 5 s for
        them to join. That stalled whatever ran next in the process (a test, the next run of a
        sweep), though not a script's exit.
        """
        iterator, self._iterator = self._iterator, None
        _shut_down(iterator)


def _shut_down(iterator: object) -> None:
    # torch has no public call for this; _shutdown_workers is what the iterator's __del__ calls
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def unwrap_worker_error(err: DatasetError) -> DatasetError:
    """``err`` without the worker traceback that DataLoader wraps around it."""
    text = str(err)
    if not WORKER_ERROR.match(text):
        return err
    # the traceback ends with "seg.data.base.DatasetError: <message>", which may span lines
    prefix = f"\n{type(err).__module__}.{type(err).__qualname__}: "
    start = text.rfind(prefix)
    return type(err)(text[start + len(prefix):].rstrip() if start >= 0 else text.rstrip().splitlines()[-1])


def _init_worker(worker_id: int) -> None:
    # OpenCV's own thread pool would oversubscribe the cores that the other workers use.
    cv2.setNumThreads(0)


def build_loader(dataset: Dataset, batch_size: int, train: bool, num_workers: int = 0,
                 distributed: bool = False, seed: int = 0) -> SegLoader:
    """DataLoader for training (shuffled, drop_last, resumable) or evaluation (in order, nothing dropped).

    Training drops the last incomplete batch because batch-norm in DeepLab's pooling branch needs
    at least two samples. It always samples through :class:`ResumableSampler` (a
    ``DistributedSampler``; one replica when not distributed) and seeds each sample's augmentation
    from (seed, epoch, rank, position), so workers never repeat each other and a resumed run sees
    exactly the batches it would have seen; iterate it with :func:`endless_batches`. Evaluation
    uses :class:`ContiguousSampler`. Full-size evaluation images of different sizes need ``batch_size=1``.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if train:
        sampler, dataset = ResumableSampler(dataset, world, rank, seed=seed), SeededDataset(dataset)
    else:
        sampler = ContiguousSampler(dataset, rank, world)
    return SegLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=train,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        worker_init_fn=_init_worker if num_workers > 0 else None, generator=seeded_generator(seed),
    )
