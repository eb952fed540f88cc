"""Progress of one long pass (training, a feature pass) on stderr.

In a terminal: a live rich bar (description, bar, done/total, elapsed, ETA). Piped or redirected:
a plain line at most every `every_s` seconds (done/total, rate, ETA) and one at the end, so a
batch job's log shows where a pass stands without a line a step.
"""

from __future__ import annotations

import sys
import time


def fmt_seconds(s: float | None) -> str:
    if s is None or s != s or s < 0:
        return "?"
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class PassProgress:
    def __init__(self, description: str, total: int, done: int = 0, *, live: bool | None = None, stream=None,
                 every_s: float = 30.0):
        self.description, self.total, self.done = description, int(total), int(done)
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.every_s = every_s
        self.start, self._start_done, self._last_line = time.time(), self.done, time.time()
        self._rich = self._task = None
        if self.live:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=Console(file=self.stream))
            self._task = self._rich.add_task(description, total=total, completed=done)
            self._rich.start()

    def advance_to(self, done: int) -> None:
        self.done = int(done)
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done)
        elif time.time() - self._last_line >= self.every_s:
            self._line()

    def advance(self, n: int = 1) -> None:
        self.advance_to(self.done + n)

    def describe(self, description: str) -> None:
        self.description = description
        if self._rich is not None:
            self._rich.update(self._task, description=description)

    def eta(self) -> float | None:
        rate = self.rate()
        return (self.total - self.done) / rate if rate else None

    def rate(self) -> float | None:
        elapsed = time.time() - self.start
        return (self.done - self._start_done) / elapsed if elapsed > 0 and self.done > self._start_done else None

    def _line(self) -> None:
        self._last_line = time.time()
        rate = self.rate()
        print(f"{self.description}: {self.done:,}/{self.total:,} ({rate or 0:,.1f}/s, "
              f"{fmt_seconds(time.time() - self.start)} elapsed, ETA {fmt_seconds(self.eta())})",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif self.done != self._start_done:
            self._line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
