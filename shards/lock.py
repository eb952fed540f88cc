"""One writer per folder: an advisory `fcntl.flock` on FOLDER/.lock, held for a `with` block.

    from shards.lock import folder_lock
    with folder_lock(out, "shard run"):      # or folder_lock(run_dir, "training run")
        ...                                  # nobody else holds OUT until the block ends

A second process asking for the same folder gets a one-line UserError naming the holder (pid,
host and command line, read from the lock file). The kernel drops the lock when the holding
process exits however it exits (kill -9 included), so a crash never leaves a stale lock. A clean
exit removes `.lock`; after a crash the file stays, unlocked and harmless.

Notes for callers: take it in one process only (for multi-rank training, the launcher or rank 0),
before looking at what the folder holds; flock locks follow the open file, so forked children
share the holder's lock and a second `folder_lock` on the same folder in the same process is
refused like any other. Works on local file systems and on NFSv4 (Linux emulates flock there).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from shards.errors import UserError, os_error_message

LOCK_NAME = ".lock"


def _command_line() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            parts = [p.decode(errors="replace") for p in f.read().split(b"\0") if p]
    except OSError:
        parts = [sys.executable, *sys.argv]
    text = " ".join(parts)
    return text if len(text) <= 200 else text[:197] + "..."


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


@contextmanager
def folder_lock(folder: str | Path, what: str = "run"):
    """Hold FOLDER/.lock exclusively for the block (FOLDER is created if missing); yields its path.

    `what` names the kind of run in messages ("`clim-fast train` run"). Raises UserError when
    another process holds the folder, or when the folder cannot be created or written.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder}: exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
    except UserError:
        raise
    except OSError as e:
        raise UserError(os_error_message(e, folder)) from None
    fd = _acquire(folder, path, what)
    try:
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line()})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (info + "\n").encode(), 0)
        except OSError:
            pass  # the lock holds without the note
        yield path
    finally:
        try:
            os.unlink(path)  # while still holding it: a waiting opener then sees a stale inode and retries
        except OSError:
            pass
        os.close(fd)  # releases the lock


def _acquire(folder: Path, path: Path, what: str) -> int:
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(os_error_message(e, path)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(os_error_message(e, path)) from None
            raise UserError(f"{folder}: another {what} is using this folder ({_holder(path)}); "
                            "wait for it to finish or stop it first") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file as we locked it: lock the new one
