"""torchrun environment, rank helpers and all-reduce helpers.

Everything here is a no-op in a plain single-process run, so the training and evaluation
loops call these helpers unconditionally instead of branching on ``world_size``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from seg.config import ConfigError

LOG_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the (possibly one-process) job: the one way to ask for the rank.

    Entry points get it from :func:`init_distributed`; code that is not handed one (the loops, the
    tracker, progress bars) asks :func:`current`.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """The device ``name`` ("auto", "cpu", "cuda", "cuda:1", ...) means here.

    "auto" is the process's own GPU under torchrun (``info``), else CUDA when there is a GPU, else
    the CPU. Asking for CUDA on a machine without it is a one-line ConfigError.
    """
    if name == "auto":
        if info is not None:
            return info.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this machine has no CUDA GPU; use cpu")
    return torch.device(name)


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise describe a single process.

    torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and MASTER_ADDR / MASTER_PORT). NCCL is
    used when CUDA is available, gloo otherwise, so the same entry point runs on CPU.
    ``timeout_s`` bounds every collective (``train.dist_timeout_s``): past it gloo raises and
    NCCL's watchdog aborts the process, so a rank whose peer died or hangs ends instead of waiting.
    """
    if "RANK" not in os.environ:
        return current()
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
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                                store=attempt_store(rank, world_size, timeout))
    return DistInfo(rank, local_rank, world_size, device, is_main=rank == 0)


@contextmanager
def process_group(timeout_s: float | None = None) -> Iterator[DistInfo]:
    """:func:`init_distributed` for the block, then :func:`cleanup`, however the block ends."""
    info = init_distributed(timeout_s)
    try:
        yield info
    finally:
        cleanup()


def attempt_store(rank: int, world_size: int, timeout: timedelta | None) -> dist.Store | None:
    """A store private to this torchrun attempt, or None where PyTorch's own is safe.

    torchrun's workers share its agent's TCPStore, which outlives a restart: a restarted group can
    read the addresses that its dead predecessor published and fail to connect (pytorch/pytorch#135712;
    seen here with gloo on torch 2.14). On one node all workers restart together, so the restart
    count names the attempt alike on every rank. Several nodes need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    instead (``seg.runs.start.check_restartable``), which gives each attempt a new store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    kwargs = {} if timeout is None else {"timeout": timeout}
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, **kwargs))
    return dist.PrefixStore(f"seg/attempt_{restart_count()}", store)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def current() -> DistInfo:
    """This process as the process group sees it (one process when there is none)."""
    if not is_distributed():
        return DistInfo(rank=0, local_rank=0, world_size=1, device=resolve_device("auto"), is_main=True)
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistInfo(rank, local_rank, dist.get_world_size(), device, is_main=rank == 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (picklable objects); ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


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


def restart_count() -> int:
    """How often torchrun has restarted this group after a failure (0 on the first attempt or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def max_restarts() -> int:
    """torchrun's ``--max-restarts`` (0 without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))


# gloo reports a dead peer or a timed-out collective as a plain RuntimeError whose text names its
# transport; NCCL and the c10d store raise torch.distributed.DistError
_GLOO_ERROR = re.compile(r"gloo|Connection closed by peer|Connection reset by peer")


def is_peer_failure(err: BaseException) -> bool:
    """True when ``err`` says a collective lost a peer (killed, hung past the timeout), not a bug here."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and bool(_GLOO_ERROR.search(str(err))))


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def setup_logging(log_file: str | Path | None = None) -> None:
    """Log INFO on rank 0 and WARNING elsewhere to stderr; rank 0 also writes ``log_file``.

    Reads RANK from the environment when the process group is not up yet, so it can run
    first thing in ``main``.
    """
    rank = current().rank if is_distributed() else int(os.environ.get("RANK", 0))
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
