"""DataLoader construction: batching, worker seeding, and the non-padding DDP eval sampler."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from seg.data import ContiguousSampler, build_dataset, build_loader, make_synthetic
from seg.data.sampling import ResumableSampler
from seg.data.transforms import build_eval_transform, build_train_transform


class _Same(torch.utils.data.Dataset):
    """One random image repeated: differences between items come only from augmentation."""

    def __init__(self, transform):
        rng = np.random.default_rng(0)
        self.image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        self.mask = rng.integers(0, 3, (40, 40), dtype=np.uint8)
        self.transform = transform

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return self.transform(self.image, self.mask)


def test_train_and_eval_loaders(tmp_path):
    root = make_synthetic(tmp_path, n_train=5, n_val=3, size=32)
    train = build_dataset("synthetic", root, "train", build_train_transform(24))
    loader = build_loader(train, batch_size=2, train=True, num_workers=0, seed=0)
    batches = list(loader)
    assert len(batches) == 2  # 5 samples, last partial batch dropped
    assert batches[0][0].shape == (2, 3, 24, 24) and batches[0][1].dtype == torch.int64
    val = build_dataset("synthetic", root, "val", build_eval_transform())
    assert sum(len(y) for _, y in build_loader(val, batch_size=2, train=False)) == 3


def test_workers_draw_different_augmentations():
    loader = build_loader(_Same(build_train_transform(24, seed=0)), batch_size=1, train=True, num_workers=2, seed=0)
    (first, _), (second, _) = [batch for _, batch in zip(range(2), loader)]  # one batch from each worker
    assert not torch.equal(first, second)


def test_every_sample_of_every_epoch_and_rank_draws_its_own_augmentation_seed():
    samplers = [ResumableSampler(range(10), num_replicas=2, rank=rank, seed=3) for rank in (0, 1)]
    seeds = []
    for epoch in (0, 1, 2):
        for sampler in samplers:
            sampler.set_position(epoch, 0)
            seeds += [seed for _, seed in sampler]
    assert len(seeds) == 3 * 10 and len(set(seeds)) == len(seeds)
    # and a resumed epoch draws exactly what the uninterrupted one drew from that position on
    sampler = samplers[1]
    sampler.set_position(2, 0)
    whole = list(sampler)
    sampler.set_position(2, 3)
    assert list(sampler) == whole[3:]


def test_contiguous_sampler_splits_without_padding():
    data = list(range(10))
    parts = [list(ContiguousSampler(data, rank, 3)) for rank in range(3)]
    assert sorted(i for part in parts for i in part) == data
    assert [len(p) for p in parts] == [3, 3, 4]


@pytest.mark.parametrize("n", [0, 1, 6, 7])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_contiguous_sampler_covers_each_index_once(n, world):
    shards = [list(ContiguousSampler(range(n), r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ContiguousSampler(range(n), r, world)) for r in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_distributed_samplers(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        data = list(range(7))
        train = build_loader(_Same(build_train_transform(24)), 2, train=True, distributed=True)
        assert isinstance(train.sampler, DistributedSampler)
        eval_loader = build_loader(data, 2, train=False, distributed=True)
        assert isinstance(eval_loader.sampler, ContiguousSampler)
        assert torch.cat(list(eval_loader)).tolist() == data
    finally:
        dist.destroy_process_group()


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="expected one of"):
        build_dataset("imagenet", tmp_path, "train")
