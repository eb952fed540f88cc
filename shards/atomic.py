"""Atomic file writes: temp file in the same folder, fsync, rename. A crash leaves the old file."""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from shards.errors import FileSystemError, UserError, os_error_message
from shards.format import MANIFEST


def _read_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it, which is
    not thread-safe); else read at import, before any thread of ours writes files."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _reason(e: OSError) -> str:
    return os_error_message(e).rsplit(": ", 1)[-1]


TEMP_NAME_KEPT = 200  # bytes of a file's name kept in its temp file's name (".NAME.XXXXXXXX.tmp")


def _is_dir(path: Path, option: str) -> bool:
    """path.is_dir(), with an unusable path (a name over 255 bytes, a link loop) as a UserError."""
    try:
        return path.is_dir()
    except OSError as e:
        raise FileSystemError(f"{option + ' ' if option else ''}{path}: {_reason(e)}", e.errno) from None


def check_output_file(path: str | Path, option: str, *, inputs=()) -> None:
    """Before a long computation whose result goes to `path`: refuse a path that atomic_open could
    not write anyway (a folder in its place, a file where one of its folders should be), one of
    the command's `inputs` (it would be replaced), and a file in a shard folder (which holds only
    the files its manifest lists)."""
    path = Path(path)
    if _is_dir(path, option):
        raise UserError(f"{option} {path}: is a folder, not a file")
    for given in inputs:
        if path.exists() and Path(given).exists() and os.path.samefile(path, given):
            raise UserError(f"{option} {path}: is this command's input {given}; choose another file")
    if (path.parent / MANIFEST).exists():
        raise UserError(f"{option} {path}: inside the shard folder {path.parent}; choose a file outside it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {path}: a part of the path is a file, not a folder ({parent})")
            break


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb"):
    """Yield a file object; on clean exit it replaces `path` atomically, on error it is removed.

    The file gets the permissions a plain `open` would give it (0666 less the umask), not the
    temp file's private 0600: shard folders and runs are often shared. A path that cannot be
    written (a folder in its place, a file where a parent folder should be, no permission) is a
    one-line UserError naming `path`, not the temp file."""
    path = Path(path)
    if _is_dir(path, ""):
        raise FileSystemError(f"{path}: is a folder, not a file", errno.EISDIR)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the temp name within the 255 bytes a name may have, whatever the length of path.name
        kept = os.fsencode(path.name)[:TEMP_NAME_KEPT].decode(errors="ignore")  # (a cut multi-byte character goes)
        fd, tmp = tempfile.mkstemp(prefix=f".{kept}.", suffix=".tmp", dir=path.parent)
    except FileExistsError:  # mkdir: a file where a parent folder should be
        raise FileSystemError(f"{path}: a part of the path is a file, not a folder", errno.ENOTDIR) from None
    except OSError as e:
        raise FileSystemError(f"{path}: {_reason(e)}", e.errno) from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:  # a full disk shows here for buffered writes
                raise FileSystemError(f"{path}: {_reason(e)}", e.errno) from None
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise FileSystemError(f"{path}: {_reason(e)}", e.errno) from None
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        try:
            f.write(data)
        except OSError as e:
            raise FileSystemError(f"{path}: {_reason(e)}", e.errno) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
