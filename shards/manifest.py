"""manifest.json: what a shard folder holds, written last so its presence means "complete"."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shards.errors import UserError
from shards.atomic import atomic_write_text
from shards.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST


def dataset_id(paths: list[str], labels: list[int], sizes: list[int]) -> str:
    """Hash of the sample list in id order: source path, label and stored size of every sample."""
    h = hashlib.sha256(f"{FORMAT_NAME} v{FORMAT_VERSION}\n".encode())
    for path, label, size in zip(paths, labels, sizes):
        h.update(f"{path}\t{label}\t{size}\n".encode())
    return h.hexdigest()[:16]


def write_manifest(root: Path, manifest: dict) -> None:
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def load_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"{root}: no such shard folder")
    if not path.is_file():
        raise UserError(f"{root}: not a complete shard folder (no {MANIFEST}; "
                        "an interrupted `clim-fast shard` finishes with --resume)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: not a clim-fast shard manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: shard format version {manifest.get('format_version')}, "
                        f"this clim-fast reads version {FORMAT_VERSION}; re-run `clim-fast shard`")
    for key in ("dataset_id", "num_samples", "classes", "shards"):
        if key not in manifest:
            raise UserError(f"{path}: manifest lacks {key!r}")
    check_manifest_paths(manifest, path)
    return manifest


def is_plain_name(name) -> bool:
    """A file name that stays inside its folder: no separators, no '..', not absolute, not empty."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not Path(name).is_absolute())


def check_manifest_paths(manifest: dict, where) -> None:
    """Every file a manifest names must be a plain file name inside the shard folder: a crafted
    manifest cannot make a reader open (or mmap) a file elsewhere."""
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise UserError(f"{where}: 'shards' is not a list")
    for number, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise UserError(f"{where}: shards[{number}] is not an object")
        for key in ("name", "index"):
            if key not in shard:
                raise UserError(f"{where}: shards[{number}] lacks {key!r}")
            if not is_plain_name(shard[key]):
                raise UserError(f"{where}: shards[{number}].{key} is {shard[key]!r}; shard files must be plain "
                                "file names inside the shard folder")
        for key in ("first_id", "count", "bytes"):
            if not isinstance(shard.get(key), int) or isinstance(shard.get(key), bool) or shard[key] < 0:
                raise UserError(f"{where}: shards[{number}].{key} is {shard.get(key)!r}, not a count")
    for key in ("samples", "sources"):
        entry = manifest.get(key)
        if entry is None:
            continue
        name = entry.get("file") if isinstance(entry, dict) else None
        if not is_plain_name(name):
            raise UserError(f"{where}: {key}.file is {name!r}; it must be a plain file name inside the shard folder")
