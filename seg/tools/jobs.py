"""Run commands as concurrent child processes, at most N at a time, each with its own log file.

Used by ``seg.tools.ablation --jobs N`` to train several runs at once (on one GPU, over several, or on
CPU cores split between them). A child that fails does not stop the others; the caller gets every
exit code. When the parent is stopped (Ctrl-C, a kill of its process group), no child outlives it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2


@dataclass
class Job:
    """One command; ``log`` receives its stdout and stderr; ``env`` is added to the parent's environment."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    returncode: int | None = None


def run_jobs(jobs: list[Job], max_parallel: int) -> list[Job]:
    """Run ``jobs`` with at most ``max_parallel`` alive at once; returns them with ``returncode`` set."""
    pending, running = list(jobs), []
    try:
        while pending or running:
            while pending and len(running) < max_parallel:
                job = pending.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                with open(job.log, "ab") as out:
                    proc = subprocess.Popen(job.argv, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **job.env})
                running.append((job, proc))
                log.info("started %s (pid %d, log %s)", job.name, proc.pid, job.log)
            time.sleep(POLL_SECONDS)
            for job, proc in list(running):
                if proc.poll() is not None:
                    job.returncode = proc.returncode
                    running.remove((job, proc))
                    log.log(logging.INFO if proc.returncode == 0 else logging.WARNING,
                            "%s ended with exit code %d", job.name, proc.returncode)
    finally:
        for _, proc in running:  # interrupted: children must not train on unsupervised
            proc.terminate()
        for _, proc in running:
            proc.wait()
    return jobs
