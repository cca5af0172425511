"""Progress that reads well where it lands: a tqdm bar on a terminal, plain heartbeat lines in a log.

Long jobs (extract, sweep, download) mostly run under the recipe, SLURM or ``nohup``, where stderr is a
file: a tqdm bar there is one endless line of carriage returns, and no bar at all leaves hours of silence.
So on a terminal the bar is drawn; elsewhere a line such as
``extract wavlm_large fold1: 3400/7442 clips, 41.3 clips/s, ETA 1 min 38 s`` is written every
:data:`EVERY_S` seconds, and one when the work ends.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional

EVERY_S = 30.0
"""Seconds between heartbeat lines."""


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 07 s"``, ``"2 h 05 min"``."""
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Heartbeat:
    """The tqdm calls the package uses (``update``, ``close``), written as periodic lines on stderr."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every_s: Optional[float] = None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self.start_n = int(initial)
        self.every_s = EVERY_S if every_s is None else every_s
        self.started = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every_s:
            self.write()

    def write(self, final: bool = False) -> None:
        self.last = time.monotonic()
        elapsed = max(self.last - self.started, 1e-9)
        rate = (self.n - self.start_n) / elapsed
        if final:
            tail = f"done in {duration(elapsed)}"
        else:
            tail = f"ETA {duration((self.total - self.n) / rate)}" if rate > 0 else "ETA unknown"
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s, {rate:.1f} {self.unit}s/s, {tail}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.write(final=self.n >= self.total)


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar on a terminal, a :class:`Heartbeat` on a log, a disabled bar when not ``enabled``."""
    from tqdm import tqdm

    if enabled and not _on_terminal():
        return Heartbeat(total, desc, unit, initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)


def track(items: Iterable, total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> Iterator:
    """Iterate ``items`` with :func:`progress_bar` advancing one per item (from ``initial`` of ``total``)."""
    bar = progress_bar(total, desc, unit, enabled, initial)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
