"""External sources of the DALI graphs (run inside DALI's spawned worker processes).

Pure numpy: a source object is pickled into every worker, so it carries only paths and a few
numbers; the per-sample index, the tar mmaps and the neighbour tables (.npy pairs) are opened
lazily on first use inside each worker.

Each call makes one whole batch (DALI's batch mode): the per-parameter arrays go to DALI stacked,
one array per output, and small JPEGs as one padded array (`jpeg_batch`), so the main process,
which feeds DALI, handles a few arrays a batch instead of several per sample (it was about 66 us
a sample on a 2-core CPU, in the thread that also launches the training step). `sample(idx)` is
the per-sample function behind it.

Every source is an endless stream: DALI's batch index never resets (the loaders never call
`pipe.reset()`), so stream sample `idx` = batch index x local batch + position in the batch, and
the source maps `start + idx` to (epoch, position) through the rank's share. DALI therefore keeps prefetching across epoch boundaries, and a loader that starts
mid-epoch starts the stream there (nothing before it is read or decoded).

Neighbour tables change between epochs while the stream runs: the loader publishes, per epoch, a
small pointer file `epoch-XXXXXXXX` in the stream's folder naming the table folder to use. A
worker that reaches an epoch whose pointer is not there yet waits for it (the loader publishes it
when that epoch starts, after `set_table`); the pointer folder disappearing means the loader
closed the stream.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from dali_pipelines.augment import RngBank, ViewSpec, center_crop_roi, draw_views
from dali_pipelines.epochs import PAD_ID, epoch_share, steps_per_epoch
from shards.dataset import TarMaps
from shards.format import SAMPLES
from shards.processes import exit_with_parent, leave_stops_to_parent

ANCHOR_STREAM, POSITIVE_STREAM = 0, 1
NOT_A_JPEG = "its stored bytes are not a JPEG (damaged data)"  # ShardReader's error, found again by the loader
POLL_S = 0.005


class ShardReader:
    """JPEG bytes, label and size of any sample id: the shard folder's `samples.npy` (mmapped) and
    its tars (mmapped), opened lazily and dropped on pickle, so each worker maps its own."""

    def __init__(self, dataset):
        self.samples_path = str(Path(dataset.root) / SAMPLES)
        self._maps = TarMaps(dataset.tar_paths)
        self._index = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_index"] = None
        state.pop("_cols", None)
        state["_pickled_by"] = os.getpid()
        return state

    def __setstate__(self, state):
        parent = state.pop("_pickled_by", None)
        self.__dict__.update(state)
        # in a DALI worker: never outlive the loader's process, and leave stopping to it
        if parent is not None and parent != os.getpid() and exit_with_parent(parent):
            leave_stops_to_parent()

    def _open(self):
        index = np.load(self.samples_path, mmap_mode="r", allow_pickle=False)
        # strided views of the mmap: no copy per worker
        self._cols = {name: index[name] for name in ("shard", "offset", "size", "label", "width", "height")}
        self._index = index

    def jpeg(self, sid: int) -> np.ndarray:
        """A zero-copy uint8 view of the stored JPEG; ValueError when its bytes do not start like a
        JPEG (the shard writer stores nothing else: the data was damaged since). DALI's CPU decoder
        can crash the process on such bytes (a segfault, seen with all-zero data in batches of 64 and
        more), so they never reach it; the loader names the sample and `clim-fast verify`."""
        if self._index is None:
            self._open()
        c = self._cols
        data = np.frombuffer(self._maps[int(c["shard"][sid])], dtype=np.uint8, count=int(c["size"][sid]),
                             offset=int(c["offset"][sid]))
        if data[0] != 0xFF or data[1] != 0xD8:
            raise ValueError(f"sample {sid}: {NOT_A_JPEG}")
        return data

    def label(self, sid: int) -> int:
        if self._index is None:
            self._open()
        return int(self._cols["label"][sid])

    def size_of(self, sid: int) -> tuple[int, int]:
        if self._index is None:
            self._open()
        return int(self._cols["width"][sid]), int(self._cols["height"][sid])


def epoch_pointer(folder: str | Path, epoch: int) -> Path:
    return Path(folder) / f"epoch-{int(epoch):08d}"


def publish_table(folder: str | Path, epoch: int, table_folder: str) -> None:
    """Tell the stream's workers which table folder `epoch` uses (atomic: write, then rename)."""
    target = epoch_pointer(folder, epoch)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(table_folder)
    os.replace(tmp, target)


class TableBook:
    """Worker side of the per-epoch tables: positives/counts of the table published for an epoch,
    mmapped once per table folder."""

    def __init__(self, pointers_dir: str):
        self.pointers_dir = pointers_dir
        self._epoch, self._table, self._open = None, None, {}

    def __getstate__(self):
        return {"pointers_dir": self.pointers_dir}

    def __setstate__(self, state):
        self.__init__(state["pointers_dir"])

    def table(self, epoch: int, wait: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        if self._epoch != epoch:
            pointer = epoch_pointer(self.pointers_dir, epoch)
            parent = os.getppid()
            while not pointer.exists():  # the loader publishes it when `epoch` starts
                if not wait:
                    return None
                if not os.path.isdir(self.pointers_dir) or os.getppid() != parent:
                    raise RuntimeError(f"{self.pointers_dir}: the loader was closed")
                time.sleep(POLL_S)
            folder = pointer.read_text()
            if folder not in self._open:
                if len(self._open) >= 2:  # at most the old and the new table of a swap
                    self._open.clear()
                self._open[folder] = (np.load(Path(folder) / "positives.npy", mmap_mode="r"),
                                      np.load(Path(folder) / "counts.npy", mmap_mode="r"))
            self._epoch, self._table = epoch, self._open[folder]
        return self._table


def draw_positive(rng: np.random.Generator, positives: np.ndarray, counts: np.ndarray, anchor_id: int) -> int:
    """One positive drawn uniformly from the anchor's table row."""
    return int(positives[anchor_id, rng.integers(int(counts[anchor_id]))])


def batch_range(batch_index: int, local_batch: int) -> range:
    return range(batch_index * local_batch, (batch_index + 1) * local_batch)


PAD_SLACK = 16 * 1024  # bytes of padding a JPEG may cost on average before a list is cheaper

# What each source hands DALI per sample, column by column (name, dtype), written once: the graphs
# build their external source from it (`ops.source_columns`). A JPEG column goes as two in a batch:
# its bytes and their lengths (`batch_columns`, `jpeg_batch`).
class JPEG:
    """The dtype of a JPEG column (a class: it pickles by name, so `is` holds in the workers)."""


ANCHOR_COLUMNS = (("jpeg", JPEG), ("params", np.float32), ("flips", np.int32), ("meta", np.int64))  # meta: id, label
POSITIVE_COLUMNS = (("pos_jpeg", JPEG), ("pos_params", np.float32), ("pos_flips", np.int32), ("pos_id", np.int64))
CENTER_COLUMNS = (("jpeg", JPEG), ("roi", np.float32), ("meta", np.int64))


def batch_columns(columns) -> tuple[tuple[str, type], ...]:
    """A source's columns as its batches have them: each JPEG column as bytes (uint8) and lengths
    (int32, named `<column>_length`)."""
    out = []
    for name, dtype in columns:
        out += [(name, np.uint8), (f"{name}_length", np.int32)] if dtype is JPEG else [(name, dtype)]
    return tuple(out)


def jpeg_batch(jpegs: list[np.ndarray]) -> tuple:
    """A batch of JPEG byte strings as DALI takes them cheapest, and their lengths (int32 [B, 1];
    the graph cuts each sample to its length, `ops.jpeg_bytes`).

    DALI's feeding costs the main process microseconds per list element (6-17 us a JPEG: more than
    the rest of a 32 px batch), but one array a batch costs one memcpy. So the batch goes as one
    zero-padded uint8 [B, longest] array when the padding averages at most `PAD_SLACK` bytes a
    JPEG (small images), else as the list (ImageNet's sizes spread too far to pad)."""
    lengths = np.array([[len(j)] for j in jpegs], np.int32)
    longest = int(lengths.max())
    if longest * len(jpegs) - int(lengths.sum()) > PAD_SLACK * len(jpegs):
        return list(jpegs), lengths
    padded = np.zeros((len(jpegs), longest), np.uint8)
    for row, jpeg in zip(padded, jpegs):
        row[:len(jpeg)] = jpeg
    return padded, lengths


def stack_batch(samples: list[tuple], columns) -> tuple:
    """Per-sample tuples laid out as `columns` -> the batch's outputs (`batch_columns`): each JPEG
    column becomes two (`jpeg_batch`), every other column one stacked array of its dtype."""
    out = []
    for (_, dtype), column in zip(columns, zip(*samples), strict=True):
        out += jpeg_batch(column) if dtype is JPEG else (np.stack(column).astype(dtype, copy=False),)
    return tuple(out)


class AugmentSource:
    """Anchor (and, with a table, positive) JPEG bytes plus the parameters of every view.

    Outputs per sample (`sample`, laid out as `columns`): anchor jpeg, params [Va, 9], flips [Va],
    meta (id, label); with positive views also the positive's jpeg, params, flips and pos_id [1].
    A batch (`__call__`) has each jpeg followed by its length (`stack_batch`).
    Every draw is seeded by (seed, epoch, anchor id, stream).

    Sample `idx` of the stream is position `(start + idx) % share_len` of epoch
    `(start + idx) // share_len`, where `share_len` = steps per epoch x the rank's batch.
    """

    def __init__(self, reader: ShardReader, *, num_samples: int, global_batch: int, rank: int, world_size: int,
                 seed: int, start: int, anchor_views: tuple[ViewSpec, ...],
                 positive_views: tuple[ViewSpec, ...] = (), tables: TableBook | None = None):
        if positive_views and tables is None:
            raise ValueError("positive views need neighbour tables")
        self.reader = reader
        self.num_samples, self.global_batch = num_samples, global_batch
        self.local_batch = global_batch // world_size
        self.rank, self.world_size, self.seed, self.start = rank, world_size, seed, start
        self.share_len = steps_per_epoch(num_samples, global_batch) * self.local_batch
        self.anchor_views, self.positive_views, self.tables = anchor_views, positive_views, tables
        self.columns = ANCHOR_COLUMNS + (POSITIVE_COLUMNS if positive_views else ())
        self._share, self._share_epoch, self._rngs = None, None, None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_share"] = state["_share_epoch"] = state["_rngs"] = None
        return state

    def share(self, epoch: int) -> np.ndarray:
        if self._share_epoch != epoch:
            self._share = epoch_share(self.num_samples, self.global_batch, self.rank, self.world_size,
                                      self.seed, epoch)
            self._share_epoch = epoch
            self._rngs = [RngBank(self.seed, epoch, self._share, stream)
                          for stream in (ANCHOR_STREAM, POSITIVE_STREAM)[:1 + bool(self.positive_views)]]
        return self._share

    def rng(self, epoch: int, pos: int, stream: int) -> np.random.Generator:
        """`sample_rng(seed, epoch, share[pos], stream)`, from this epoch's bank (valid until the
        next call)."""
        self.share(epoch)
        return self._rngs[stream].rng(pos)

    def locate(self, idx: int) -> tuple[int, int]:
        """(epoch, position in the rank's share) of stream sample `idx`."""
        return divmod(self.start + idx, self.share_len)

    def anchor(self, epoch: int, pos: int) -> int:
        return int(self.share(epoch)[pos])

    def positive(self, epoch: int, pos: int, sid: int) -> tuple[int, np.random.Generator]:
        positives, counts = self.tables.table(epoch)
        rng = self.rng(epoch, pos, POSITIVE_STREAM)
        return draw_positive(rng, positives, counts, sid), rng

    def sample_ids(self, lo: int, hi: int) -> list[int]:
        """Anchor and positive ids of stream samples lo..hi-1 (error messages; never waits)."""
        out = []
        for idx in range(lo, hi):
            epoch, pos = self.locate(idx)
            sid = self.anchor(epoch, pos)
            out.append(sid)
            table = self.tables.table(epoch, wait=False) if self.positive_views else None
            if table is not None:
                out.append(draw_positive(self.rng(epoch, pos, POSITIVE_STREAM), *table, sid))
        return out

    def __call__(self, batch_index: int):
        """Batch `batch_index` of the stream: per jpeg its batch and lengths, parameters stacked."""
        return stack_batch([self.sample(idx) for idx in batch_range(batch_index, self.local_batch)], self.columns)

    def sample(self, idx: int):
        """Stream sample `idx`: the outputs listed in the class docstring."""
        epoch, pos = self.locate(idx)
        sid = self.anchor(epoch, pos)
        reader = self.reader
        params, flips = draw_views(self.rng(epoch, pos, ANCHOR_STREAM), *reader.size_of(sid), self.anchor_views)
        out = (reader.jpeg(sid), params, flips, np.array([sid, reader.label(sid)], np.int64))
        if self.positive_views:
            pid, rng = self.positive(epoch, pos, sid)
            pparams, pflips = draw_views(rng, *reader.size_of(pid), self.positive_views)
            out += (reader.jpeg(pid), pparams, pflips, np.array([pid], np.int64))
        return out


class IdListSource:
    """A fixed id list (an `eval_share`) read over and over: jpeg, centre-crop ROI [4], meta (id or
    PAD_ID, label) per sample (`CENTER_COLUMNS`); a batch has the jpeg's lengths after it. Padding
    slots repeat sample 0 (dropped on the torch side)."""

    columns = CENTER_COLUMNS

    def __init__(self, reader: ShardReader, ids: np.ndarray, image_size: int, local_batch: int):
        self.reader = reader
        self.ids = np.asarray(ids, np.int64)
        self.image_size, self.local_batch = image_size, local_batch

    def sample_ids(self, lo: int, hi: int) -> list[int]:
        return [int(self.ids[idx % len(self.ids)]) for idx in range(lo, hi)]

    def __call__(self, batch_index: int):
        return stack_batch([self.sample(idx) for idx in batch_range(batch_index, self.local_batch)], self.columns)

    def sample(self, idx: int):
        sid = int(self.ids[idx % len(self.ids)])
        reader = self.reader
        meta = np.array([sid, reader.label(sid)] if sid != PAD_ID else [PAD_ID, -1], np.int64)
        sid = max(sid, 0)
        return reader.jpeg(sid), center_crop_roi(*reader.size_of(sid), self.image_size), meta
