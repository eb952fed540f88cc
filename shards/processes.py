"""Worker processes that never outlive the process that started them (even after its kill -9):
the shard writer's checking pool, DALI's external-source workers."""

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


def exit_with_parent(parent_pid: int) -> None:
    """In a child of `parent_pid`: be killed when it exits; exit now if it already has. Anywhere
    else (not a direct child): nothing."""
    if os.getppid() != parent_pid:
        return
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died between the check and the line above
        os._exit(1)
