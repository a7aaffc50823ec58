"""Deciding a start once, for every rank: fresh, resumed, or refused.

torchrun ``--max-restarts`` restarts a failed group with the same command line, so a restart must
continue the run its first attempt began: ``TORCHELASTIC_RESTART_COUNT > 0`` turns the start into
``--resume auto`` (resume from ``last.pt`` if there is one, else start fresh).

Rank 0 alone takes the run directory's lock, checks the start and reads ``last.pt``; it broadcasts
the outcome, so all ranks resume from the same bytes (even where a network filesystem shows other
nodes a stale file) or raise the same refusal and exit together, never one waiting for another.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Literal, Union

import torch

from seg.config import Config, ConfigError
from seg.distributed import DistInfo, max_restarts, restart_count
from seg.rundir import LAST, check_start, locked

log = logging.getLogger(__name__)
# True: last.pt must exist; "auto": resume it if it exists; False: a fresh start
Resume = Union[bool, Literal["auto"]]


def resume_mode(resume: Resume, overwrite: bool, restarts: int | None = None) -> tuple[Resume, bool]:
    """``(resume, overwrite)`` for this attempt: after ``restarts`` torchrun restarts (default: this
    process's count) a start continues its own run.

    ``--overwrite`` is dropped on a restart: the first attempt already discarded the old run, and
    repeating it would discard the progress of this one.
    """
    if (restart_count() if restarts is None else restarts) > 0 and resume is not True:
        return "auto", False
    return resume, overwrite


def check_restartable() -> None:
    """Refuse torchrun restarts on several nodes that share the agent's store across attempts.

    One node is safe (``seg.distributed.attempt_store``); on several, restart counts differ between
    nodes, so only a new store per attempt keeps a restarted group from reading stale addresses.
    """
    if (max_restarts() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and os.environ.get("GROUP_WORLD_SIZE", "1") != "1"):
        raise ConfigError("torchrun --max-restarts on several nodes needs --rdzv-backend c10d and "
                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment on every node; otherwise "
                          "a restarted group may read the addresses of the one it replaces (pytorch/pytorch#135712)")


def continues_run(run_dir: Path, resume: Resume) -> bool:
    """Whether this start continues the run in ``run_dir`` (and so takes its stored config)."""
    return resume is True or (resume == "auto" and (run_dir / LAST).is_file())


def decide_start(stack: ExitStack, run_dir: Path, cfg: Config, dist: DistInfo, resume: Resume,
                 overwrite: bool) -> dict | None:
    """Rank 0 locks ``run_dir`` for as long as ``stack`` lives and checks the start; every rank
    returns its outcome (``last.pt`` to resume, None to start fresh) or raises its refusal."""
    if dist.distributed:
        # a node restarted only because another node's worker failed keeps a restart count of 0
        counts: list = [None] * dist.world_size
        torch.distributed.all_gather_object(counts, restart_count())
        resume, overwrite = resume_mode(resume, overwrite, max(counts))
    if resume == "auto":
        log.info("--resume auto (or a torchrun restart): resuming %s if there is one", run_dir / LAST)
    outcome: tuple[BaseException | None, dict | None] = (None, None)
    if dist.is_main:
        try:
            stack.enter_context(locked(run_dir))
            outcome = (None, check_start(run_dir, cfg, continues_run(run_dir, resume), overwrite,
                                         world_size=dist.world_size))
        except Exception as err:  # any failure: the other ranks must not wait for a rank 0 that quit
            outcome = (err, None)
    if dist.distributed:
        box = [outcome]
        torch.distributed.broadcast_object_list(box, src=0)
        outcome = box[0]
    refusal, resumed = outcome
    if refusal is not None:
        raise refusal
    return resumed
