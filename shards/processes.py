"""Worker processes that never outlive the process that started them (even after its kill -9):
the shard writer's checking pool, DALI's external-source workers; and DALI's workers leave stopping
on SIGINT / SIGTERM to the process they serve."""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_GRACE_S = 30  # a stop takes 10-20 steps; a scheduler's SIGKILL follows its SIGTERM after 30 s (SLURM's KillWait)


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


def exit_with_parent(parent_pid: int) -> None:
    """In a child of `parent_pid`: be killed when it exits; exit now if it already has. Anywhere
    else (not a direct child): nothing."""
    if os.getppid() != parent_pid:
        return
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died between the check and the line above
        os._exit(1)


def leave_stops_to_parent(grace_s: int = STOP_GRACE_S) -> None:
    """In a worker serving a process that stops cleanly on a signal (training finishes its steps and
    saves, which takes more batches): a terminal's Ctrl-C reaches the whole process group and a
    scheduler's SIGTERM every process, and a worker that died of it would fail the parent's next
    batch. SIGINT is ignored; SIGTERM ends the worker only `grace_s` later (the loaders end their
    pools' workers with SIGKILL). The worker still dies with its parent (`exit_with_parent`)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda signum, frame: signal.alarm(grace_s))  # SIGALRM's default: exit
    except ValueError:  # not the main thread: signals are not ours to set
        pass
