"""Deciding a start once, for every entry point and every rank: fresh, resumed, or refused.

:func:`plan_start` turns a command line (``--out``, ``--config``, overrides, ``--resume``,
``--overwrite``) and the torchrun environment into a :class:`StartPlan`: the run directory, the
config, and how to start. ``train_seg.py`` and ``seg.tools.ablation`` both build one, and
:func:`seg.engine.trainer.run_training` carries it out through :func:`decide_start`.

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
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Union

import torch

from seg.config import Config, ConfigError, load_config
from seg.data.base import DatasetError
from seg.runs.rundir import LAST, check_start, locked, resume_config
from seg.utils.distributed import DistInfo, max_restarts, restart_count

log = logging.getLogger(__name__)
# True: last.pt must exist; "auto": resume it if it exists; False: a fresh start
Resume = Union[bool, Literal["auto"]]


@dataclass(frozen=True)
class StartPlan:
    """How a training run starts.

    Args:
        run_dir: the run directory.
        config: the config to train: the run's stored one (with what the command typed on top)
            when the start continues a run, else the experiment file's.
        resume: True continues ``run_dir/last.pt``; "auto" continues it if there is one, else starts
            afresh; False starts afresh.
        overwrite: a fresh start may discard the run ``run_dir`` holds.
    """

    run_dir: Path
    config: Config
    resume: Resume = False
    overwrite: bool = False


def plan_start(out: Path | None, config_file: Path | None, overrides: list[str], resume: Resume = False,
               overwrite: bool = False, default_config: Path | None = None) -> StartPlan:
    """The plan for one command line: ``--out`` (or a new ``runs/<config>-<time>``), the config a
    continued run stored or ``config_file`` (default ``default_config``), and the start mode after
    any torchrun restart (:func:`resume_mode`). Reads files but writes nothing."""
    check_restartable()
    resume, overwrite = resume_mode(resume, overwrite)
    experiment = config_file or default_config
    run_dir = resolve_run_dir(out, experiment.stem if experiment else "run", resume)
    # a resume continues the stored config: only what this command typed may differ from it
    config = (resume_config(run_dir, config_file, overrides) if continues_run(run_dir, resume)
              else load_config(experiment, overrides))
    return StartPlan(run_dir, config, resume, overwrite)


def resolve_run_dir(out: Path | None, name: str, resume: Resume) -> Path:
    """``out``, or a new ``runs/<name>-<time>``; what a directory may hold is checked in seg.runs.rundir."""
    if out is not None:
        return out
    if resume:
        flag = "--resume auto" if resume == "auto" else "--resume"
        raise ConfigError(f"{flag} needs --out RUN_DIR pointing at the run to continue")
    if max_restarts():  # a restarted group would otherwise start a new, time-stamped directory
        raise ConfigError("torchrun --max-restarts needs --out RUN_DIR, so that a restarted group finds "
                          "the run it continues")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


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

    One node is safe (``seg.utils.distributed.attempt_store``); on several, restart counts differ between
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


def decide_start(stack: ExitStack, plan: StartPlan, dist: DistInfo) -> dict | None:
    """Rank 0 locks the plan's run directory for as long as ``stack`` lives and checks the start;
    every rank returns its outcome (``last.pt`` to resume, None to start fresh) or raises its refusal."""
    run_dir, cfg, resume, overwrite = plan.run_dir, plan.config, plan.resume, plan.overwrite
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


def with_resume_hint(err: BaseException, plan: StartPlan | None) -> BaseException:
    """``err``, ending with the resume command where a bad data file stopped a run that has a
    ``last.pt`` to go on from: fixing the file and resuming then loses only the iterations since it.

    Not under ``--overwrite``, where a ``last.pt`` may be the run the command was to discard.
    """
    if not isinstance(err, DatasetError) or plan is None or plan.overwrite or not (plan.run_dir / LAST).is_file():
        return err
    return DatasetError(f"{err}; once the data is fixed, --resume --out {plan.run_dir} continues from "
                        f"{plan.run_dir / LAST}")


@contextmanager
def started(plan: StartPlan, dist: DistInfo) -> Iterator[dict | None]:
    """Decide the start (:func:`decide_start`) and hold the run directory's lock inside the block;
    yields ``last.pt`` to resume from, or None for a fresh start."""
    with ExitStack() as stack:
        yield decide_start(stack, plan, dist)
