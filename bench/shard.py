"""Benchmark `clim-fast shard` against the plain way of making DALI-readable WebDataset shards.

Side by side in one run, same input, same shuffle, same maxcount:
  baseline: a single-process `webdataset.ShardWriter` loop (read bytes, write), then `wds2idx` on
            every tar (the DALI-documented way to get index files);
  ours:     `shards.write_shards` with --workers processes (validates every image, re-encodes odd
            ones, writes the DALI index while writing, per-sample index, manifest, checksums).
Both read files from the page cache (the input was just generated or is read once up front).

    python bench/shard.py --size small [--json out.json]         # ~2000 JPEGs, CPU machine
    python bench/shard.py --size full --json out.json              # 20000 ImageNet-sized JPEGs
    python bench/shard.py --src /data/imagenet/train_subset        # your own folder
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from photos import make_photo_folder  # noqa: E402
from shards import write_shards  # noqa: E402
from shards.scan import find_sources  # noqa: E402
from clim_fast.machine import machine_info  # noqa: E402

# (classes, images per class, JPEG long side range). Full size is about ImageNet's JPEG sizes.
SIZES = {"small": (10, 200, (160, 320)), "full": (10, 2000, (300, 500))}


def baseline(src: Path, out: Path, maxcount: int, seed: int) -> tuple[int, float]:
    """Returns (images, seconds spent in wds2idx)."""
    import webdataset as wds
    import wds2idx

    sources = find_sources(src)
    order = np.random.default_rng(seed).permutation(len(sources))
    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for sample_id, i in enumerate(order):
            data = (src / sources.paths[i]).read_bytes()
            sink.write({"__key__": f"{sample_id:09d}", "jpg": data, "cls": str(int(sources.labels[i]))})
    t0 = time.perf_counter()
    for tar in sorted(out.glob("*.tar")):
        subprocess.run([sys.executable, wds2idx.__file__, str(tar), str(tar.with_suffix(".idx"))],
                       check=True, capture_output=True)
    return len(order), time.perf_counter() - t0


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--src", type=Path, help="an image folder (class sub-folders) instead of generated images")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--maxcount", type=int, default=500)
    parser.add_argument("--work-dir", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-shard-", dir=args.work_dir))
    try:
        src = args.src
        if src is None:
            classes, per_class, sides = SIZES[args.size]
            print(f"generating {classes * per_class} JPEGs ({sides[0]}-{sides[1]} px) ...", flush=True)
            src = make_photo_folder(work / "src", classes=classes, per_class=per_class, side_range=sides)
        input_bytes = folder_size(src)  # also pulls the input into the page cache for both runs

        (n_base, t_index), t_base = timed(lambda: baseline(src, work / "baseline", args.maxcount, seed=0))
        summary, t_ours = timed(lambda: write_shards(src, work / "ours", maxcount=args.maxcount,
                                                     workers=args.workers, seed=0))
        n_ours = summary["source_files"]
        _, t_one = timed(lambda: write_shards(src, work / "ours-1", maxcount=args.maxcount, workers=1, seed=0))
        result = {
            "benchmark": "shard",
            "machine": machine_info(),
            "size": "custom" if args.src else args.size,
            "images": n_ours,
            "mean_jpeg_kb": round(input_bytes / max(n_ours, 1) / 1e3, 1),
            "maxcount": args.maxcount,
            "workers": args.workers,
            "baseline": {"what": "webdataset.ShardWriter loop + wds2idx per tar", "seconds": round(t_base, 3),
                         "wds2idx_seconds": round(t_index, 3), "images_per_s": round(n_base / t_base, 1)},
            "ours": {"what": f"shards.write_shards(workers={args.workers})", "seconds": round(t_ours, 3),
                     "images_per_s": round(n_ours / t_ours, 1), "skipped": summary["skipped"],
                     "reencoded": summary["reencoded"]},
            "ours_1_worker": {"seconds": round(t_one, 3), "images_per_s": round(n_ours / t_one, 1)},
            "ratio": round((n_ours / t_ours) / (n_base / t_base), 2),
            "ratio_1_worker": round((n_ours / t_one) / (n_base / t_base), 2),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}")
    print(f"input: {result['images']} JPEGs, mean {result['mean_jpeg_kb']} KB, maxcount {args.maxcount}")
    rows = (("baseline (ShardWriter + wds2idx)", result["baseline"]),
            (f"ours (workers={args.workers})", result["ours"]), ("ours (workers=1)", result["ours_1_worker"]))
    for label, row in rows:
        print(f"{label + ':':<34}{row['images_per_s']:10,.0f} images/s ({row['seconds']:.2f} s)")
    print(f"ratio ours/baseline: {result['ratio']:.2f}x (workers={args.workers}), "
          f"{result['ratio_1_worker']:.2f}x (workers=1)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
