"""The one exception type users see as a one-line message instead of a traceback."""

from __future__ import annotations

import errno
from contextlib import contextmanager


class UserError(Exception):
    """Bad input or invocation: the message names the file or option at fault.

    The CLI prints `error: <message>` and exits with status 2.
    """


class FileSystemError(UserError, OSError):
    """A file-system failure on a path the user chose (a folder where a file goes, a full disk, no
    permission): a one-line UserError for the CLI, and still an OSError for code that handles those."""

    def __init__(self, message: str, errno_: int | None = None):
        OSError.__init__(self, errno_, message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return type(self), (self.message, self.errno)


def os_error_message(e: OSError, where=None) -> str:
    """`PATH: what went wrong` for an OSError, in one line (PermissionError, NotADirectoryError, ...)."""
    path = e.filename if e.filename is not None else where
    reason = e.strerror or str(e) or type(e).__name__
    hints = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
             errno.ENOTDIR: "a part of the path is a file, not a folder", errno.ENOSPC: "no space left on the device",
             errno.EROFS: "read-only file system", errno.EISDIR: "is a folder, not a file"}
    reason = hints.get(e.errno, reason)
    if e.filename2 is not None:
        return f"{path} -> {e.filename2}: {reason}"
    return f"{path}: {reason}" if path is not None else reason


@contextmanager
def os_errors_as_user_errors(where=None):
    """Turn a file-system OSError raised inside the block into a one-line UserError naming the path."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        raise UserError(os_error_message(e, where)) from None
