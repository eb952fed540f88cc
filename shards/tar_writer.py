"""A minimal deterministic tar writer that knows every payload's offset as it writes.

Fixed header fields (mtime 0, uid/gid 0, empty user/group names, mode 0644) make the bytes a
function of the contents only; the running sha256 avoids re-reading the tar for the manifest.
"""

from __future__ import annotations

import hashlib
import tarfile
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tar pads the archive to whole records, as GNU tar does


def member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


class TarWriter:
    def __init__(self, f: BinaryIO):
        self._f = f
        self.position = 0
        self._sha = hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._sha.update(data)
        self.position += len(data)

    def add(self, name: str, data: bytes) -> int:
        """Append one regular file; return the offset of its data."""
        self._write(member_header(name, len(data)))
        offset = self.position
        self._write(data)
        pad = -len(data) % BLOCK
        if pad:
            self._write(bytes(pad))
        return offset

    def finish(self) -> tuple[int, str]:
        """End-of-archive blocks and record padding; returns (size in bytes, sha256 hex)."""
        end = 2 * BLOCK
        end += -(self.position + end) % RECORD
        self._write(bytes(end))
        return self.position, self._sha.hexdigest()
