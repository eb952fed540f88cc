"""Per-sample external sources of the DALI graphs (run inside DALI's spawned worker processes).

Pure numpy + the shard reader: a source object is pickled into every worker, so it carries only
paths and small arrays; the shard mmaps and the neighbour table (an .npy pair, mmapped) are
opened lazily on first use inside each worker. `__call__(sample_info)` maps the position in the
epoch to a sample id through the rank's share and raises StopIteration at the share's end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dali_pipelines.augment import ViewSpec, center_crop_roi, draw_views, sample_rng
from dali_pipelines.epochs import PAD_ID, epoch_share

ANCHOR_STREAM, POSITIVE_STREAM = 0, 1


class _ShardReader:
    """Lazily opened shards; dropped on pickle so each worker maps its own."""

    def __init__(self, shards_dir: str | Path):
        self.shards_dir = str(shards_dir)
        self._ds = None

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._lazy_fields():
            state[name] = None
        return state

    def _lazy_fields(self) -> tuple[str, ...]:
        return ("_ds",)

    @property
    def dataset(self):
        if self._ds is None:
            from shards import ShardDataset

            self._ds = ShardDataset(self.shards_dir)
        return self._ds

    def size_of(self, sample_id: int) -> tuple[int, int]:
        row = self.dataset.index[sample_id]
        return int(row["width"]), int(row["height"])


class AugmentSource(_ShardReader):
    """Anchor (and, with a table, positive) JPEG bytes plus the parameters of every view.

    Outputs per sample: anchor jpeg uint8[n], anchor params float32[Va, 9], anchor flips int32[Va],
    meta int64[2] (id, label); with positive views also positive jpeg, params, flips and
    pos_id int64[1]. Every draw is seeded by (seed, epoch, anchor id, stream).
    """

    def __init__(self, shards_dir, *, num_samples: int, global_batch: int, rank: int, world_size: int,
                 seed: int, start_epoch: int, anchor_views: tuple[ViewSpec, ...],
                 positive_views: tuple[ViewSpec, ...] = (), table_dir: str | None = None):
        super().__init__(shards_dir)
        if positive_views and table_dir is None:
            raise ValueError("positive views need a neighbour table")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed, self.start_epoch = rank, world_size, seed, start_epoch
        self.anchor_views, self.positive_views, self.table_dir = anchor_views, positive_views, table_dir
        self._share, self._share_epoch, self._table = None, None, None

    def _lazy_fields(self):
        return ("_ds", "_share", "_share_epoch", "_table")

    def share(self, epoch: int) -> np.ndarray:
        if self._share_epoch != epoch:
            self._share = epoch_share(self.num_samples, self.global_batch, self.rank, self.world_size,
                                      self.seed, epoch)
            self._share_epoch = epoch
        return self._share

    def table(self) -> tuple[np.ndarray, np.ndarray]:
        if self._table is None:
            folder = Path(self.table_dir)
            self._table = (np.load(folder / "positives.npy", mmap_mode="r"),
                           np.load(folder / "counts.npy", mmap_mode="r"))
        return self._table

    def draw_positive(self, rng: np.random.Generator, anchor_id: int) -> int:
        positives, counts = self.table()
        return int(positives[anchor_id, rng.integers(int(counts[anchor_id]))])

    def __call__(self, sample_info):
        epoch = self.start_epoch + sample_info.epoch_idx
        share = self.share(epoch)
        if sample_info.idx_in_epoch >= len(share):
            raise StopIteration
        sid = int(share[sample_info.idx_in_epoch])
        ds = self.dataset
        params, flips = draw_views(sample_rng(self.seed, epoch, sid, ANCHOR_STREAM), *self.size_of(sid),
                                   self.anchor_views)
        out = (ds.jpeg(sid), params, flips, np.array([sid, ds.labels[sid]], np.int64))
        if self.positive_views:
            rng = sample_rng(self.seed, epoch, sid, POSITIVE_STREAM)
            pid = self.draw_positive(rng, sid)
            pparams, pflips = draw_views(rng, *self.size_of(pid), self.positive_views)
            out += (ds.jpeg(pid), pparams, pflips, np.array([pid], np.int64))
        return out


class IdListSource(_ShardReader):
    """A fixed id list (an `eval_share`): jpeg uint8[n], centre-crop ROI float32[4], meta int64[2]
    (id or PAD_ID, label). Padding slots repeat sample 0 (dropped on the torch side)."""

    def __init__(self, shards_dir, ids: np.ndarray, image_size: int):
        super().__init__(shards_dir)
        self.ids = np.asarray(ids, np.int64)
        self.image_size = image_size

    def __call__(self, sample_info):
        if sample_info.idx_in_epoch >= len(self.ids):
            raise StopIteration
        sid = int(self.ids[sample_info.idx_in_epoch])
        ds = self.dataset
        meta = np.array([sid, ds.labels[sid]] if sid != PAD_ID else [PAD_ID, -1], np.int64)
        sid = max(sid, 0)
        return ds.jpeg(sid), center_crop_roi(*self.size_of(sid), self.image_size), meta
