"""What a user sees while the demo runs: one line per phase with elapsed time and an ETA.

In a terminal: a live rich progress display (one row per phase: bar, done/total, elapsed, ETA),
with log messages printed above it. Piped or redirected: plain lines, one when a phase starts,
at most one every `every_s` seconds while it advances (with the ETA), and one when it ends.
Training phases advance from the run's own log (RUN/log.jsonl, read with
clim_fast.training.metrics.read_log) in a background thread, so the training loop needs no hook.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from clim_fast.progress import fmt_seconds
from clim_fast.training.metrics import read_log


class Phase:
    """A handle on one phase: `advance_to(done, note)`; thread-safe enough for one writer."""

    def __init__(self, owner: "DemoProgress", name: str, total: int | None, task=None):
        self.owner, self.name, self.total, self.task = owner, name, total, task
        self.start, self.done, self.note = time.time(), 0, ""
        self._last_print = 0.0

    def eta(self) -> float | None:
        if not self.total or self.done <= 0:
            return None
        return (time.time() - self.start) * (self.total - self.done) / self.done

    def advance_to(self, done: int, note: str = "") -> None:
        done = min(int(done), self.total) if self.total else int(done)
        if done == self.done and note == self.note:
            return
        self.done, self.note = done, note
        self.owner._update(self)


class DemoProgress:
    """Phases of the demo. `live=None` picks rich when stderr is a terminal."""

    def __init__(self, live: bool | None = None, stream=None, every_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.every_s = every_s
        self._rich = None
        if self.live:
            try:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)
            except ImportError:  # rich is a dependency, but a plain line is always possible
                self.live = False
            else:
                self._rich = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                      TimeRemainingColumn(), console=Console(file=self.stream))
                self._rich.start()

    # -- messages ---------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self._rich is not None:
            self._rich.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    # -- phases -----------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str, total: int | None = None):
        task = self._rich.add_task(name, total=total) if self._rich is not None else None
        ph = Phase(self, name, total, task)
        if task is None:
            print(f"demo: {name} ...", file=self.stream, flush=True)
        try:
            yield ph
        finally:
            took = time.time() - ph.start
            if self._rich is not None:
                self._rich.update(task, completed=total if total else 1, total=total or 1,
                                  description=f"{name} ({fmt_seconds(took)})")
            else:
                print(f"demo: {name}: done in {fmt_seconds(took)}", file=self.stream, flush=True)

    def _update(self, ph: Phase) -> None:
        desc = f"{ph.name}: {ph.note}" if ph.note else ph.name
        if self._rich is not None:
            self._rich.update(ph.task, completed=ph.done, description=desc)
            return
        now = time.time()
        if now - ph._last_print < self.every_s and not (ph.total and ph.done >= ph.total):
            return
        ph._last_print = now
        of = f"{ph.done}/{ph.total}" if ph.total else str(ph.done)
        print(f"demo: {desc} [{of}, {fmt_seconds(now - ph.start)} elapsed, ETA {fmt_seconds(ph.eta())}]",
              file=self.stream, flush=True)

    @contextmanager
    def watch_training(self, ph: Phase, run_dir: str | Path, epochs: int, poll_s: float = 0.5):
        """Advance `ph` (total = steps) from RUN/log.jsonl while the body trains."""

        stop = threading.Event()

        def poll():
            while not stop.wait(poll_s):
                try:
                    rows = read_log(run_dir)
                except (OSError, ValueError):  # not there yet, or a line half written
                    continue
                steps = [r for r in rows if r.get("kind") == "step" and "iteration" in r]
                ends = [r for r in rows if r.get("kind") == "epoch"]
                done = max([int(r["iteration"]) for r in steps + ends if "iteration" in r] or [0])
                epoch = len(ends)
                loss = ends[-1].get("loss") if ends else (steps[-1].get("loss") if steps else None)
                note = f"epoch {min(epoch + 1, epochs)}/{epochs}" + (f", loss {loss:.3f}" if loss is not None else "")
                ph.advance_to(done, note)

        thread = threading.Thread(target=poll, name="demo-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
