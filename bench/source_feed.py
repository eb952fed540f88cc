"""Main-thread CPU time of feeding DALI from the parallel external source, per sample, three ways
side by side in one run: the source called per sample (DALI's batch=False mode, the first
baseline), one call per batch with the parameters stacked but the JPEGs as a list (the second),
and one call per batch with small JPEGs as one zero-padded array plus their lengths (what
`dali_pipelines.external` does now). All run the same `AugmentSource` (moco_v2 views, and
clim_multires views with positives, on 28-36 px JPEGs) in a pipeline that only reads the
source's outputs, so the time is DALI's feeding in the main process: the thread that also
launches the training step.

    python bench/source_feed.py [--batch 128] [--workers 2] [--batches 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import numpy as np  # noqa: E402
from clim_fast.machine import machine_info  # noqa: E402
from loader import random_table  # noqa: E402  (bench/loader.py)


class PerSample:
    """The baseline: DALI calls the source once per sample (SampleInfo.idx_in_epoch)."""

    def __init__(self, source):
        self.source = source

    def __call__(self, sample_info):
        return self.source.sample(sample_info.idx_in_epoch)


class ListedJpegs:
    """The second baseline: a batch per call, but each JPEG column as a list (with its lengths)."""

    def __init__(self, source):
        self.source, self.columns = source, source.columns

    def __call__(self, batch_index):
        from dali_pipelines.external import JPEG, batch_range

        samples = [self.source.sample(idx) for idx in batch_range(batch_index, self.source.local_batch)]
        out = []
        for (_, dtype), column in zip(self.columns, zip(*samples)):
            out += [list(column), np.array([[len(j)] for j in column], np.int32)] if dtype is JPEG \
                else [np.stack(column)]
        return tuple(out)


class FixedTables:
    """One neighbour table for every epoch (picklable into the workers)."""

    def __init__(self, table):
        self.arrays = (table.positives, table.counts)

    def table(self, epoch, wait=True):
        return self.arrays


def feed_seconds(source, per_sample: bool, batch: int, workers: int, batches: int) -> float:
    """CPU seconds of the main thread per batch (time.thread_time: waiting for the workers does
    not count, so the figure is the feeding work itself whatever the number of cores)."""
    from nvidia.dali import fn, pipeline_def

    import nvidia.dali.types as types

    from dali_pipelines.external import JPEG, batch_columns

    # a per-sample call returns the sample's outputs, without the JPEG lengths a batch adds
    columns = source.columns if per_sample else batch_columns(source.columns)
    dtypes = [types.to_dali_type(np.uint8 if dtype is JPEG else dtype) for _, dtype in columns]
    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, py_num_workers=workers,
                  py_start_method="spawn", prefetch_queue_depth=2)
    def graph():
        return tuple(fn.external_source(source=PerSample(source) if per_sample else source,
                                        num_outputs=len(dtypes), batch=not per_sample, parallel=True,
                                        prefetch_queue_depth=2, dtype=dtypes))

    pipe = graph()
    pipe.build()
    try:
        for _ in range(3):  # workers up, buffers allocated
            pipe.run()
        start = time.thread_time()
        for _ in range(batches):
            pipe.run()
        return (time.thread_time() - start) / batches
    finally:
        del pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()

    from dali_pipelines.augment import moco_views
    from dali_pipelines.external import AugmentSource, ShardReader
    from photos import make_photo_folder
    from shards import ShardDataset, write_shards

    results = {"machine": machine_info(), "batch": args.batch, "workers": args.workers, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        make_photo_folder(Path(tmp) / "photos", classes=4, per_class=max(64, args.batch), seed=0, side_range=(28, 36))
        write_shards(Path(tmp) / "photos", Path(tmp) / "shards", maxcount=1000, workers=1, seed=0)
        ds = ShardDataset(Path(tmp) / "shards")
        table = random_table(ds, k=8)
        multires = moco_views(32, (27, 23, 18, 14))
        for name, views, positives in (("moco_v2", moco_views(32), ()), ("clim_multires", multires, multires)):
            source = AugmentSource(ShardReader(ds), num_samples=ds.num_samples, global_batch=args.batch, rank=0,
                                   world_size=1, seed=0, start=0, anchor_views=views, positive_views=positives,
                                   tables=FixedTables(table) if positives else None)
            per_sample = feed_seconds(source, True, args.batch, args.workers, args.batches)
            listed = feed_seconds(ListedJpegs(source), False, args.batch, args.workers, args.batches)
            padded = feed_seconds(source, False, args.batch, args.workers, args.batches)
            row = {"preset": name, "per_sample_call_us_per_sample": 1e6 * per_sample / args.batch,
                   "batch_call_listed_jpegs_us_per_sample": 1e6 * listed / args.batch,
                   "batch_call_padded_jpegs_us_per_sample": 1e6 * padded / args.batch,
                   "ratio_vs_per_sample": per_sample / padded, "ratio_vs_listed_jpegs": listed / padded}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(results["machine"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
