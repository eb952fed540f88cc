"""The pretraining graph and loader: anchor query/key views, and with a neighbour table the
positive's views.

Per sample the external source hands over the anchor's JPEG and view parameters and, when a table
is set, a positive drawn uniformly from the anchor's table row with its own parameters. Each JPEG
is decoded once; all its views are cut from that one decode.
"""

from __future__ import annotations

import shutil
from typing import Callable

import numpy as np
import torch
from nvidia.dali import pipeline_def

from dali_pipelines.augment import MOCO_SCALE, ViewSpec, moco_views
from dali_pipelines.external import AugmentSource, TableBook, epoch_pointer, publish_table
from dali_pipelines.loader import BatchStream, EpochLoader, Scratch
from dali_pipelines.names import anchor_view_names, positive_view_names
from dali_pipelines.ops import augmented_view, output, source_columns, source_image


@pipeline_def(enable_conditionals=True)
def augment_graph(source, anchor_views, positive_views, settings):
    """Outputs: one per anchor view, `meta` (id, label); then one per positive view and `pos_id`.
    `settings` (`loader.Settings`): where each stage runs, the output dtype, parallel workers. On
    the GPU every output is a GPU tensor (the small int64 ones are copied by DALI)."""
    c = source_columns(source, settings)
    image = source_image(c, "jpeg", settings)
    result = [augmented_view(image, c["params"], c["flips"], v, spec, settings.dali_dtype)
              for v, spec in enumerate(anchor_views)]
    result.append(c["meta"])
    if positive_views:
        pimage = source_image(c, "pos_jpeg", settings)
        result += [augmented_view(pimage, c["pos_params"], c["pos_flips"], v, spec, settings.dali_dtype)
                   for v, spec in enumerate(positive_views)]
        result.append(c["pos_id"])
    return tuple(output(node, settings) for node in result)


class PretrainLoader(EpochLoader):
    """MoCo v2 / CLIM batches for one rank. `batch_size` is the global batch.

    Yields dicts of NCHW tensors on `device`: `q`, `k`, `id`, `label`; with a neighbour table also
    `pos`, `k_pos`, `pos_id`, and for each multi-resolution size S `q_r{S}`, `pos_r{S}`.

        loader.set_table(t)            # NeighbourTable or None, used from the next set_epoch
        loader.set_epoch(e, start_step=0)
        for batch in loader: ...       # len(loader) - start_step batches of epoch e
        loader.close()

    The pipeline persists: reading epochs in order streams on without a rebuild (DALI prefetches
    into the next epoch while this one is read), and so does a table swap, provided the loader
    knows in advance: `table_changes(e)` (None = never) says `set_table` may be called before
    epoch e, so the stream waits at the start of e for that epoch's table instead of reading on
    with the current one. The graph is rebuilt only when positives appear or disappear, on a jump
    or a resume mid-epoch (which starts the stream at that step: nothing before it is decoded), or
    when a table arrives for an epoch that was already read ahead with the previous one.

    Batches are a pure function of (shards, seed, epoch, rank, world_size, table, sizes):
    independent of worker count, prefetch, persistence and start_step.
    """

    def __init__(self, dataset, *, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1,
                 device=torch.device("cpu"), seed: int = 0, workers: int = 2, threads: int = 2,
                 multires_sizes=(), table=None, dtype: torch.dtype = torch.float32,
                 crop_min_scale: float = MOCO_SCALE[0], table_changes: Callable[[int], bool] | None = None,
                 hw_decoder_load: float = 0.65, cpu_decode: bool = False, cpu_views: bool = False):
        super().__init__(dataset, batch_size=batch_size, image_size=image_size, rank=rank, world_size=world_size,
                         device=device, seed=seed, workers=workers, threads=threads, dtype=dtype,
                         hw_decoder_load=hw_decoder_load, cpu_decode=cpu_decode, cpu_views=cpu_views)
        self.multires_sizes = tuple(int(s) for s in multires_sizes)
        self.crop_min_scale = float(crop_min_scale)
        self.table_changes = table_changes
        self._scratch = Scratch()
        self._table, self._table_folder, self._table_folders, self._tables_written = None, None, [], 0
        self._pending = _UNSET
        self._published: dict[int, str] = {}
        self._pointers = None
        self._streams_built = 0
        self._check_table(table)
        self._install_table(table)

    # -- the loop's API -----------------------------------------------------------------------------
    def set_table(self, table) -> None:
        """Use `table` (a NeighbourTable, or None for plain MoCo v2) from the next `set_epoch`."""
        self._check_table(table)
        self._pending = table

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        super().set_epoch(epoch, start_step)
        if self._pending is not _UNSET:
            self._install_table(self._pending)
            self._pending = _UNSET

    def __iter__(self):
        epoch, step = self.epoch, self.start_step
        if step >= self.steps:
            return
        stream = self._stream_at(epoch, step)
        for _ in range(step, self.steps):
            batch = stream.next(self._limit())
            yield self.settings.finish(batch)

    def close(self) -> None:
        self._drop_stream()
        self._scratch.remove()

    # -- tables ---------------------------------------------------------------------------------------
    def _check_table(self, table) -> None:
        if table is None:
            return
        where = table.meta.get("path", "neighbour table")
        table.check_consistent(where)
        table.check_matches(self.dataset.dataset_id, self.num_samples, where)

    def _install_table(self, table) -> None:
        """Hand a checked table (`set_table`, the constructor) to the workers' folders."""
        if table is self._table:
            return
        folder = None
        if table is not None:  # written before it is installed: a failed write leaves the last table in use
            folder = self._scratch.path / f"table-{self._tables_written}"
            self._tables_written += 1
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / "positives.npy", np.ascontiguousarray(table.positives, dtype=np.int32))
            np.save(folder / "counts.npy", np.ascontiguousarray(table.counts, dtype=np.int32))
            self._table_folders.append(folder)
            while len(self._table_folders) > 2:  # workers that still map one keep their view (POSIX)
                shutil.rmtree(self._table_folders.pop(0), ignore_errors=True)
        self._table, self._table_folder = table, None if folder is None else str(folder)

    def _publish(self, epoch: int) -> None:
        if epoch not in self._published:
            publish_table(self._pointers, epoch, self._table_folder)
            self._published[epoch] = self._table_folder
            for old in [e for e in self._published if e < epoch - 2]:  # the stream never goes back
                del self._published[old]
                epoch_pointer(self._pointers, old).unlink(missing_ok=True)

    def _limit(self) -> int | None:
        """Steps below this may be fed: the end of the last epoch whose table is published."""
        if self._table is None:
            return None
        return (max(self._published) + 1) * self.steps

    # -- the stream ------------------------------------------------------------------------------------
    def views(self) -> tuple[tuple[ViewSpec, ...], tuple[ViewSpec, ...]]:
        if self._table is None:
            return moco_views(self.image_size, min_scale=self.crop_min_scale), ()
        views = moco_views(self.image_size, self.multires_sizes, self.crop_min_scale)
        return views, views

    def _stream_at(self, epoch: int, step: int) -> BatchStream:
        target = epoch * self.steps + step
        positives = self._table is not None
        stream = self._stream
        keep = (stream is not None and not stream.broken and stream.built_for == positives
                and stream.next_step == target
                and stream.depth >= min(2, self.steps - step)  # a stream resumed at an epoch's last step ran at 1
                and (not positives or self._published.get(epoch, self._table_folder) == self._table_folder))
        if not keep:
            self._drop_stream()
            stream = self._stream = self._build(epoch, step)
        if positives:
            self._publish(epoch)
            if self.table_changes is None or not self.table_changes(epoch + 1):
                self._publish(epoch + 1)
        return stream

    def _build(self, epoch: int, step: int) -> BatchStream:
        anchor_views, positive_views = self.views()
        tables = None
        if positive_views:
            self._pointers = self._scratch.path / f"stream-{self._streams_built}"
            self._pointers.mkdir(parents=True)
            self._published = {}
            tables = TableBook(str(self._pointers))
        self._streams_built += 1
        source = AugmentSource(self._reader, num_samples=self.num_samples, global_batch=self.global_batch,
                               rank=self.rank, world_size=self.world_size, seed=self.seed,
                               start=(epoch * self.steps + step) * self.local_batch, anchor_views=anchor_views,
                               positive_views=positive_views, tables=tables)
        s = self.settings
        # the first feed prefetches `depth` steps: with positives they must lie in this epoch
        depth = 2 if not positive_views or self.steps - step >= 2 else 1
        pipe = augment_graph(source, anchor_views, positive_views, s, **s.pipeline_kwargs(self.local_batch, depth))
        sizes = [v.size for v in anchor_views[2:]]  # views 0 and 1 are q and k at image_size
        names = anchor_view_names(sizes) + ["meta"]
        if positive_views:
            names += positive_view_names(sizes) + ["pos_id"]
            self._publish(epoch)  # before the first feed
        return BatchStream(pipe, names, s, first_step=epoch * self.steps + step, depth=depth, source=source,
                           local_batch=self.local_batch, dataset=self.dataset, built_for=bool(positive_views))

    def _drop_stream(self) -> None:
        if self._pointers is not None:  # first, so that workers waiting for a table there give up
            shutil.rmtree(self._pointers, ignore_errors=True)
            self._pointers = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._published = {}


class _Unset:
    pass


_UNSET = _Unset()
