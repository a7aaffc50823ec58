"""Distributed helpers, and mIoU over 2 gloo ranks equal to one process on an odd-sized dataset."""

import json
import logging
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from children import free_port
from seg.data import ContiguousSampler
from seg.data.palette import IGNORE_INDEX
from seg.evaluation.metrics import ConfusionMatrix
from seg.engine.trainer import share_cpu_paths
from seg.kernels import calibrate
from seg.utils import distributed as sd

NUM_CLASSES = 5
NUM_SAMPLES = 7  # odd on purpose: a padding sampler would count one sample twice
WORLD_SIZE = 2
CPU_PATHS = [{"a": True, "b": False}, {"a": False, "c": True}]  # each rank's own kernel-or-ops choices


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(NUM_CLASSES - 1, (NUM_SAMPLES, 12, 12), generator=g)  # class 4 absent
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.5, target,
                       torch.randint(NUM_CLASSES - 1, target.shape, generator=g))
    target[torch.rand(target.shape, generator=g) < 0.1] = IGNORE_INDEX
    return TensorDataset(pred, target)


def _evaluate(loader: DataLoader) -> ConfusionMatrix:
    cm = ConfusionMatrix(NUM_CLASSES)
    for pred, target in loader:
        cm.update(pred, target)
    cm.all_reduce()
    return cm


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    info = sd.init_distributed()
    try:
        ds = _dataset()
        exact = _evaluate(DataLoader(ds, batch_size=2, sampler=ContiguousSampler(ds, info.rank, info.world_size)))
        padded = _evaluate(DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, shuffle=False)))
        # each rank timed its own CA paths; after sharing, all run rank 0's, then rank 1's for shapes rank 0 lacks
        calibrate._choices.clear()
        calibrate.adopt(CPU_PATHS[info.rank])
        share_cpu_paths()
        with open(f"{out_path}.paths{info.rank}", "w") as f:
            json.dump(sorted(calibrate.choices().items()), f)
        if sd.current().is_main:
            with open(out_path, "w") as f:
                json.dump({"info": [info.rank, info.world_size, info.is_main, str(info.device)],
                           "exact": exact.compute(), "padded": padded.compute()}, f)
        sd.barrier()
    finally:
        sd.cleanup()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = tmp_path / "rank0.json"
    # forked, as DataLoader workers are: spawned ranks would spend seconds re-importing torch and seg
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD_SIZE, join=True, start_method="fork")
    got = json.loads(out.read_text())
    single = _evaluate(DataLoader(_dataset(), batch_size=3)).compute()
    assert got["info"] == [0, WORLD_SIZE, True, "cpu"]
    shared = [["a", True], ["b", False], ["c", True]]
    assert [json.loads((tmp_path / f"rank0.json.paths{r}").read_text()) for r in range(WORLD_SIZE)] == [shared] * 2
    assert got["exact"]["confusion"] == single["confusion"]
    assert got["exact"]["miou"] == single["miou"]
    assert math.isnan(got["exact"]["iou"][4]) and math.isnan(single["iou"][4])
    # The check is sharp: DistributedSampler pads 7 samples to 8 and the count goes wrong.
    padded_total = sum(map(sum, got["padded"]["confusion"]))
    assert padded_total > sum(map(sum, single["confusion"]))


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    info = sd.init_distributed()
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert sd.current() == info
    sd.barrier()
    t = torch.tensor([1, 2])
    assert sd.all_reduce_sum(t) is t and t.tolist() == [1, 2]
    assert sd.gather_objects({"a": 1}) == [{"a": 1}]


@pytest.fixture
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("_restore_root_logger")
def test_setup_logging_levels_by_rank(tmp_path, monkeypatch):
    log_file = tmp_path / "logs" / "train.log"
    monkeypatch.setenv("RANK", "1")
    sd.setup_logging(log_file)
    assert logging.getLogger().level == logging.WARNING and not log_file.exists()
    monkeypatch.setenv("RANK", "0")
    sd.setup_logging(log_file)
    logging.getLogger("seg.test").info("hello from rank 0")
    assert logging.getLogger().level == logging.INFO
    assert "hello from rank 0" in log_file.read_text()
