"""Worker processes that never outlive the process that started them (even after its kill -9):
the shard writer's checking pool, DALI's external-source workers; and DALI's workers leave stopping
on SIGINT / SIGTERM to the process they serve."""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def set_parent_death_signal(sig: int) -> bool:
    """Linux: have the kernel send `sig` to this process when its parent exits (PR_SET_PDEATHSIG).
    False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_with_parent(parent_pid: int) -> bool:
    """In a child of `parent_pid`: be killed when it exits; exit now if it already has. Anywhere
    else (not a direct child): nothing (False)."""
    if os.getppid() != parent_pid:
        return False
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died between the check and the line above
        os._exit(1)
    return True


def leave_stops_to_parent() -> None:
    """In a worker serving a process that stops cleanly on a signal (training finishes its steps and
    saves, which takes more batches): a terminal's Ctrl-C reaches the whole process group and a
    scheduler's SIGTERM every process, and a worker that died of it would fail the parent's next
    batch. Both are ignored: the worker ends when its parent closes it (the loaders end DALI's
    workers with SIGKILL, `dali_pipelines.loader`) or dies (`exit_with_parent`)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to set
        pass
