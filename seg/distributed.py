"""torchrun environment, rank helpers and all-reduce helpers.

Everything here is a no-op in a plain single-process run, so the training and evaluation
loops call these helpers unconditionally instead of branching on ``world_size``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

LOG_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the (possibly one-process) job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun; otherwise describe a single process.

    torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and MASTER_ADDR / MASTER_PORT). NCCL is
    used when CUDA is available, gloo otherwise, so the same entry point runs on CPU.
    """
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(rank=0, local_rank=0, world_size=1, device=device, is_main=True)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    world_size = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        # set_device before init so NCCL binds each rank to its own GPU
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, local_rank, world_size, device, is_main=rank == 0)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the process that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it; unchanged in a single process.

    NCCL only reduces CUDA tensors, so a CPU tensor takes a round trip through the GPU.
    """
    if not is_distributed():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        tensor.copy_(on_gpu)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def setup_logging(log_file: str | Path | None = None) -> None:
    """Log INFO on rank 0 and WARNING elsewhere to stderr; rank 0 also writes ``log_file``.

    Reads RANK from the environment when the process group is not up yet, so it can run
    first thing in ``main``.
    """
    rank = get_rank() if is_distributed() else int(os.environ.get("RANK", 0))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=LOG_FORMAT.format(rank=rank),
        handlers=handlers,
        force=True,  # replace handlers a library may have installed before us
    )
