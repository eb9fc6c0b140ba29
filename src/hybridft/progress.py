"""Progress of a long loop: a tqdm bar on a terminal or in a notebook, whole lines in a log file.

A bar is redrawn in place with carriage returns. Written to a file (`hybridft run > log 2>&1`, nohup, a batch
scheduler) that makes one endless line, thousands of redraws long, and the next `[hybridft]` message is glued onto
its end. So where stderr is not a terminal, `progress_bar` prints a plain line at most once a minute instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

LINE_EVERY_S = 60.0
"""Seconds between two lines in a log file: a 10-minute stage writes about ten."""


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "step") -> Any:
    """An object with tqdm's `update(n)`, `set_postfix(**values)`, `close()`, `n` and `with` support.

    Args:
        total: the count the loop reaches (steps, batches, or bytes with `unit="B"`).
        desc: what is running, e.g. "student" or "teacher outputs".
        enabled: False shows nothing (the `progress` setting; off on all but the main process).
        unit: what is counted, singular ("step", "batch"), or "B" for bytes (shown as a share of the file's size).
    """
    if enabled and not _interactive(sys.stderr):
        return LineProgress(total, desc, unit=unit)
    from tqdm.auto import tqdm

    if unit == "B":
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                    dynamic_ncols=True)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


def _interactive(stream: TextIO) -> bool:
    """A terminal, or a Jupyter kernel (whose streams are no terminal, but draw tqdm's widget)."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class LineProgress:
    """tqdm's interface as whole lines on stderr, at most one per `every` seconds:
    `[hybridft] student: 630 of 3,222 steps (20%), 1 min 3 s, loss=0.4100`."""

    def __init__(self, total: int, desc: str, unit: str = "step", every: Optional[float] = None,
                 file: Optional[TextIO] = None, clock: Any = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.every = LINE_EVERY_S if every is None else every
        self.file, self.clock = file, clock
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.start = self.last = clock()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            print(self.line(now), file=self.file or sys.stderr, flush=True)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = values

    def line(self, now: float) -> str:
        share = f"{100 * self.n / self.total:.0f}%" if self.total else ""
        if self.unit == "B":
            done = f"{share or self.n} of {_size(self.total)} read"
        else:
            noun = self.unit if self.total == 1 else _plural(self.unit)
            done = f"{self.n:,} of {self.total:,} {noun}" + (f" ({share})" if share else "")
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        return f"[hybridft] {self.desc}: {done}, {_duration(now - self.start)}{extra}"

    def close(self) -> None:
        pass

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("ch", "sh", "s", "x")) else "s")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
