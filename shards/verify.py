"""Re-check a shard folder against its manifest: counts, checksums, tar members, index files."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np

from shards.dataset import ShardDataset
from shards.format import SAMPLES, SOURCES, index_name, sample_key
from shards.manifest import dataset_id

_CHUNK = 1 << 22


def _sha256_file(path: Path) -> str | None:
    """The file's sha256, or None when it is missing (reported as a checksum mismatch)."""
    h = hashlib.sha256()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def verify_shards(root: str | Path, *, progress: bool = False) -> dict:
    """{"ok", "problems", ...}; a folder too broken to open at all raises UserError instead."""
    ds = ShardDataset(root)
    manifest, index = ds.manifest, np.asarray(ds.index)
    width = int(manifest.get("key_width", 9))
    problems: list[str] = []

    # (the shard counts adding up to num_samples is checked by load_manifest, which refuses otherwise)
    for name, entry in ((SAMPLES, manifest.get("samples")), (SOURCES, manifest.get("sources"))):
        digest = _sha256_file(ds.root / name)
        if digest is None:
            problems.append(f"{ds.root / name}: missing")
        elif entry and digest != entry["sha256"]:
            problems.append(f"{ds.root / name}: sha256 differs from the manifest")
    try:
        # one line per sample, split on "\n" only: a file name may hold other line-break characters
        # (U+2028, U+0085, ...) that str.splitlines would split on
        with open(ds.root / SOURCES, encoding="utf-8", newline="") as f:
            sources = f.read().split("\n")
        if sources[-1] == "":
            sources.pop()
    except FileNotFoundError:  # reported above
        sources = None
    except UnicodeDecodeError:
        sources = None
        problems.append(f"{ds.root / SOURCES}: not UTF-8 text")
    if sources is not None:
        if len(sources) != ds.num_samples:
            problems.append(f"{ds.root / SOURCES}: {len(sources)} lines, expected {ds.num_samples}")
        elif dataset_id(sources, index["label"].tolist(), index["size"].tolist()) != ds.dataset_id:
            problems.append(f"{ds.root}: dataset id recomputed from {SOURCES} and {SAMPLES} differs "
                            f"from the manifest's {ds.dataset_id}")

    with _bar(progress, len(manifest["shards"])) as advance:
        for number, (shard, tar_path, idx_path) in enumerate(zip(manifest["shards"], ds.tar_paths, ds.idx_paths)):
            problems += _verify_shard(ds, number, shard, tar_path, idx_path, index, width)
            advance()
    return {"ok": not problems, "problems": problems, "root": str(ds.root), "dataset_id": ds.dataset_id,
            "num_samples": ds.num_samples, "num_shards": len(ds.tar_paths),
            "bytes": sum(s["bytes"] for s in manifest["shards"])}


def _verify_shard(ds: ShardDataset, number: int, shard: dict, tar_path: Path, idx_path: Path,
                  index: np.ndarray, width: int) -> list[str]:
    problems = []
    if _sha256_file(tar_path) != shard["sha256"]:
        problems.append(f"{tar_path}: sha256 differs from the manifest")
    if idx_path.name != index_name(number) or _sha256_file(idx_path) != shard["index_sha256"]:
        problems.append(f"{idx_path}: sha256 differs from the manifest")
    first, count = shard["first_id"], shard["count"]
    rows = index[first:first + count]
    if len(rows) != count or (rows["shard"] != number).any():
        return problems + [f"{ds.root / SAMPLES}: rows {first}..{first + count - 1} do not point at {tar_path.name}"]
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as e:
        return problems + [f"{tar_path}: unreadable tar ({e})"]
    if len(members) != 2 * count:
        return problems + [f"{tar_path}: {len(members)} members, expected {2 * count} (jpg + cls per sample)"]
    with open(tar_path, "rb") as f:
        for k, row in enumerate(rows):
            key = sample_key(first + k, width)
            jpg, cls = members[2 * k], members[2 * k + 1]
            if jpg != (f"{key}.jpg", int(row["offset"]), int(row["size"])):
                problems.append(f"{tar_path}: member {jpg[0]} at {jpg[1]} ({jpg[2]} bytes) disagrees with "
                                f"{SAMPLES} row {first + k}")
                break
            f.seek(cls[1])
            if cls[0] != f"{key}.cls" or f.read(cls[2]) != str(int(row["label"])).encode():
                problems.append(f"{tar_path}: {key}.cls does not hold label {int(row['label'])}")
                break
    return problems


class _bar:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(console=Console(stderr=True))
        self.progress.__enter__()
        task = self.progress.add_task("verifying shards", total=self.total)
        return lambda: self.progress.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
