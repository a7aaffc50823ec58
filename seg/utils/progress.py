"""Progress for command-line tools: a tqdm bar on a terminal, plain timed lines in logs and CI."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from seg.inference.inputs import Skipped
from seg.utils.distributed import current

PLAIN_EVERY_S = 10.0  # how often a line is printed when stderr is not a terminal


def show_progress_bar() -> bool:
    """A live bar only on rank 0 and on a terminal: redirected to a file, its ``\\r`` updates are noise."""
    return current().is_main and sys.stderr.isatty()


class Progress:
    """Counts ``total`` items of ``unit``, showing the rate and the time left.

    Args:
        total: items expected (0 when unknown: no ETA).
        unit: what is counted, e.g. "images".
    """

    def __init__(self, total: int, unit: str) -> None:
        self.total, self.unit, self.done = total, unit, 0
        self.start = self.last_line = time.perf_counter()
        self.bar = tqdm(total=total or None, unit=" " + unit.split()[0], desc=unit, file=sys.stderr,
                        dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.perf_counter()
        if now - self.last_line >= PLAIN_EVERY_S:
            self.last_line = now
            print(self._line(now), file=sys.stderr, flush=True)

    def _line(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        eta = f", ETA {(self.total - self.done) / rate:.0f} s" if self.total and rate > 0 else ""
        of = f"/{self.total}" if self.total else ""
        return f"{self.done}{of} {self.unit}, {rate:.2f}/s{eta}"

    def skip(self, path: Path, reason: str) -> Skipped:
        """Warn that ``path`` is skipped, without breaking the bar; return the record."""
        if self.bar is not None:
            self.bar.clear()
        return self.warn(path, reason)

    @staticmethod
    def warn(path: Path, reason: str) -> Skipped:
        """One warning line on stderr naming the skipped ``path``; return the record."""
        skipped = Skipped(path, reason)
        print(f"warning: skipped {skipped}", file=sys.stderr, flush=True)
        return skipped

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done:
            print(self._line(time.perf_counter()), file=sys.stderr, flush=True)
