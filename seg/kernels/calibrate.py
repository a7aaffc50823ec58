"""Choose, by measurement, whether the C++ CPU kernels or PyTorch's ops run each CA block shape.

The kernels were tuned on one CPU and are slower than PyTorch's ops on some others, so the first
time a block sees a shape (at a thread count), both paths are timed on copies of its input a few
times, interleaved, and the faster is kept for the rest of the process, as cuDNN's benchmark mode
does for convolutions. Both paths compute the same function within the existing tolerances, so
the choice changes only speed. ``SEG_CPU_KERNELS``: ``auto`` (default) calibrates, ``1`` always
runs the kernels, ``0`` never builds or runs them.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Hashable, Mapping

import torch

log = logging.getLogger(__name__)
MODE = os.environ.get("SEG_CPU_KERNELS", "auto").lower()  # "auto", "1" (always) or "0" (never)
REPEATS = 3  # per path; interleaved, so a slow spell of the machine hits both alike
TIMER: Callable[[], float] = time.perf_counter  # replaced by a fake clock in tests
_choices: dict[Hashable, bool] = {}  # key -> True when the kernel path was faster


def prefers_kernel(key: Hashable, kernel: Callable[[torch.Tensor], object], ops: Callable[[torch.Tensor], object],
                   x: torch.Tensor) -> bool:
    """Whether the block keyed ``key`` (its kind and shapes) should run ``kernel`` rather than ``ops`` on ``x``.

    Decided once per key and thread count; calibrating runs each path ``REPEATS`` times on a copy
    of ``x`` (both paths may write into their input).
    """
    if MODE in ("1", "always"):
        return True
    key = (key, torch.get_num_threads())
    if key not in _choices:
        best = {True: float("inf"), False: float("inf")}
        for _ in range(REPEATS):
            for use_kernel, path in ((True, kernel), (False, ops)):
                copy = x.clone()
                start = TIMER()
                path(copy)
                best[use_kernel] = min(best[use_kernel], TIMER() - start)
        _choices[key] = best[True] <= best[False]
        log.debug("CPU kernels for %s: %.3f ms, PyTorch ops %.3f ms: %s", key, best[True] * 1e3, best[False] * 1e3,
                  "kernels" if _choices[key] else "PyTorch ops")
    return _choices[key]


def choices() -> dict[Hashable, bool]:
    """Every decision so far: ``{(block key, threads): kernels chosen}``."""
    return dict(_choices)


def summary() -> str:
    """One line saying how many calibrated block shapes run the kernels, e.g. for a benchmark table."""
    if MODE in ("1", "always"):
        return "CPU kernels: always on (SEG_CPU_KERNELS=1)"
    by_kind: dict[str, list[bool]] = {}
    for (key, _threads), chosen in _choices.items():
        by_kind.setdefault(str(key[0]), []).append(chosen)
    parts = [f"{sum(v)} of {len(v)} {kind} shapes" for kind, v in sorted(by_kind.items())]
    return "CPU kernels chosen for " + (", ".join(parts) if parts else "no shape yet")


def adopt(decisions: Mapping[Hashable, bool]) -> None:
    """Take ``decisions`` (as :func:`choices` returns them) as this process's own, replacing any it made.

    A resumed run adopts those its checkpoint saved, so its validations run the paths the run
    before the stop chose, not what this process's timing would choose: where the two paths are
    about as fast, two processes can choose differently, and the paths differ in the last bits.
    """
    _choices.update({key: bool(chosen) for key, chosen in decisions.items()})


def reset() -> None:
    """Forget every decision (the next call of each shape calibrates again)."""
    _choices.clear()
