"""manifest.json: what a shard folder holds, written last so its presence means "complete"."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shards.errors import UserError
from shards.atomic import atomic_write_text
from shards.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST, MIN_KEY_WIDTH


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
        raise UserError(f"{root}: not a folder; a shard folder is the one that holds {MANIFEST}" if root.exists()
                        else f"{root}: no such shard folder")
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
    check_manifest_values(manifest, path)
    return manifest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_manifest_values(manifest: dict, where) -> None:
    """Types and consistency of what readers use, so an edited or damaged manifest is a one-line
    error naming it (not a TypeError deep inside a reader, nor samples silently read wrong):
    counts are non-negative integers, the shards' id ranges tile 0..N-1 in order, classes map
    names to distinct indices below num_classes, checksums are strings."""
    if not isinstance(manifest["dataset_id"], str) or not manifest["dataset_id"]:
        raise UserError(f"{where}: dataset_id is {manifest['dataset_id']!r}, not a dataset id string")
    n = manifest["num_samples"]
    if not _is_count(n):
        raise UserError(f"{where}: num_samples is {n!r}, not a count")
    classes = manifest["classes"]
    if not isinstance(classes, dict) or not classes:
        raise UserError(f"{where}: classes is {_short(classes)}, not a mapping of class names to indices")
    for name, index in classes.items():
        if not _is_count(index):
            raise UserError(f"{where}: classes[{name!r}] is {index!r}, not a class index")
    if len(set(classes.values())) != len(classes):
        raise UserError(f"{where}: classes gives two class names the same index")
    num_classes = manifest.get("num_classes", max(classes.values()) + 1)
    if not _is_count(num_classes) or num_classes <= max(classes.values()):
        raise UserError(f"{where}: num_classes is {num_classes!r}, but the class indices go up to "
                        f"{max(classes.values())}")
    width = manifest.get("key_width", MIN_KEY_WIDTH)
    if not _is_count(width) or not 1 <= width <= 32:
        raise UserError(f"{where}: key_width is {width!r}, not a key width")
    expected_first = 0
    for number, shard in enumerate(manifest["shards"]):
        for key in ("sha256", "index_sha256"):
            if not isinstance(shard.get(key), str):
                raise UserError(f"{where}: shards[{number}].{key} is {shard.get(key)!r}, not a checksum")
        if shard["first_id"] != expected_first:
            raise UserError(f"{where}: shards[{number}].first_id is {shard['first_id']}, expected {expected_first} "
                            "(the shards hold consecutive sample ids)")
        expected_first += shard["count"]
    if expected_first != n:
        raise UserError(f"{where}: the shards hold {expected_first} samples, but num_samples is {n}")
    for key in ("samples", "sources"):
        entry = manifest.get(key)
        if entry is not None and not isinstance(entry.get("sha256"), str):
            raise UserError(f"{where}: {key}.sha256 is {entry.get('sha256')!r}, not a checksum")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
