"""The one timing harness of every benchmark: interleaved runs, an A/A control, min / median / max.

A shared machine slows down in spells. Timing the variants in turn within every repeat (in a
rotating order, so no variant always follows the same neighbour) makes a spell hit them all
alike, and a second copy of the baseline timed in the same loop (the A/A control) shows how far
noise alone moves a ratio: a run whose A/A is off 1.00 by more than the tolerance is not a result.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable

AA_TOLERANCE = 0.02  # |A/A - 1| above this: the run was too noisy to quote


def interleaved(runners: dict[str, Callable[[], object]], repeats: int, warmup: int = 0,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each runner, ``repeats`` each, after ``warmup`` untimed calls each.

    ``sync`` waits for the device (e.g. ``torch.cuda.synchronize``) before and after each timed call.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            sync()
            start = time.perf_counter()
            runners[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def cpu_name() -> str:
    """The CPU's model name as lscpu shows it: a CPU timing means little without it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median of ``name`` over median of ``base``."""
    return statistics.median(times[name]) / statistics.median(times[base])


def noise_warning(label: str, aa: float, tolerance: float = AA_TOLERANCE) -> str | None:
    """A warning line when the A/A ratio ``aa`` is off 1.00 by more than ``tolerance``, else None."""
    if abs(aa - 1.0) <= tolerance:
        return None
    return (f"warning: {label} A/A is {aa:.3f}x, off 1.00 by more than {tolerance:.0%}: the machine was too "
            "noisy for this run to mean anything; do not quote it")


def spread(seconds: list[float]) -> str:
    """``min / median / max`` in milliseconds."""
    return " / ".join(f"{v * 1e3:.1f}" for v in (min(seconds), statistics.median(seconds), max(seconds)))
