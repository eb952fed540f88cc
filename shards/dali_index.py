"""DALI `wds2idx` index files (format v1.2), produced from the offsets known while writing.

`v1.2 <samples>` then one line per sample: `<ext> <data offset> <size> <member name>` for each
of its members, in tar order, space separated. Identical to `wds2idx` output for our tars.
"""

from __future__ import annotations

INDEX_VERSION = "v1.2"


def index_line(members: list[tuple[str, int, int, str]]) -> str:
    """members: (ext, data offset, size, member name) of one sample, in tar order."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members) + "\n"


def index_text(lines: list[str]) -> str:
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(lines)
