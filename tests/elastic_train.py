"""Test helper (not a test): ``train_seg.py`` as a torchrun worker that a fault can kill or stop.

``ELASTIC_FAULT=RANK:ATTEMPT:N:ACTION`` makes rank RANK, in torchrun attempt ATTEMPT
(TORCHELASTIC_RESTART_COUNT), SIGKILL (``kill``) or SIGSTOP (``stop``) itself when it enters its
Nth validation. The fault wraps ``seg.engine.trainer.evaluate``, which every rank calls, so production
code has no test hooks. ``ELASTIC_PIDS=DIR`` makes each rank write its pid to ``DIR/rank{R}.pid``
and, just before a fault fires, the time to ``DIR/fault.time``.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch

import seg.engine.trainer
import train_seg
from seg.utils.atomic import write_atomic


def install_fault(spec: str, pids: Path | None) -> None:
    rank, attempt, nth, action = spec.split(":")
    if int(os.environ["RANK"]) != int(rank) or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) != int(attempt):
        return
    real, calls = seg.engine.trainer.evaluate, 0

    def evaluate(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == int(nth):
            if pids is not None:
                write_atomic(pids / "fault.time", str(time.time()).encode())
            os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
        return real(*args, **kwargs)

    seg.engine.trainer.evaluate = evaluate


def main() -> int:
    torch.set_num_threads(1)
    pids = Path(os.environ["ELASTIC_PIDS"]) if os.environ.get("ELASTIC_PIDS") else None
    if pids is not None:
        # whole or absent: the test polls for this file and reads it the moment it appears
        write_atomic(pids / f"rank{os.environ['RANK']}.pid", str(os.getpid()).encode())
    if os.environ.get("ELASTIC_FAULT"):
        install_fault(os.environ["ELASTIC_FAULT"], pids)
    return train_seg.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
