"""The pretraining graph: anchor query/key views, and with a neighbour table the positive's views.

Per sample the external source hands over the anchor's JPEG and view parameters and, when a table
is set, a positive drawn uniformly from the anchor's table row with its own parameters. Each JPEG
is decoded once; all its views are cut from that one decode.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from dali_pipelines.augment import MOCO_SCALE, ViewSpec, moco_views
from dali_pipelines.epochs import check_batch, steps_per_epoch
from dali_pipelines.loader import DaliLoader, split_meta
from dali_pipelines.ops import augmented_view, decode
from dali_pipelines.external import AugmentSource

_SOURCE_DTYPES = [types.UINT8, types.FLOAT, types.INT32, types.INT64]


@pipeline_def(enable_conditionals=True)
def augment_graph(source, anchor_views, positive_views, gpu, dali_dtype, parallel):
    """Outputs: one per anchor view, `meta` (id, label); then one per positive view and `pos_id`."""
    outs = fn.external_source(source=source, num_outputs=4 * (1 + bool(positive_views)), batch=False,
                              parallel=parallel, dtype=_SOURCE_DTYPES * (1 + bool(positive_views)))
    jpeg, params, flips, meta = outs[:4]
    image = decode(jpeg, gpu)
    result = [augmented_view(image, params, flips, v, spec, dali_dtype) for v, spec in enumerate(anchor_views)]
    result.append(meta)
    if positive_views:
        pjpeg, pparams, pflips, pos_id = outs[4:]
        pimage = decode(pjpeg, gpu)
        result += [augmented_view(pimage, pparams, pflips, v, spec, dali_dtype)
                   for v, spec in enumerate(positive_views)]
        result.append(pos_id)
    return tuple(result)


def anchor_names(image_size: int, views: tuple[ViewSpec, ...]) -> list[str]:
    return ["q", "k"] + [f"q_r{v.size}" for v in views[2:]]


def positive_names(image_size: int, views: tuple[ViewSpec, ...]) -> list[str]:
    return ["pos", "k_pos"] + [f"pos_r{v.size}" for v in views[2:]]


class PretrainLoader(DaliLoader):
    """MoCo v2 / CLIM batches for one rank. `batch_size` is the global batch.

    Yields dicts of NCHW tensors on `device`: `q`, `k`, `id`, `label`; with a neighbour table also
    `pos`, `k_pos`, `pos_id`, and for each multi-resolution size S `q_r{S}`, `pos_r{S}`.
    `set_epoch(e)` picks the epoch (any e: a jump rebuilds the pipeline); `set_table(t)` takes
    effect at the next `set_epoch`. Batches are a pure function of (shards, seed, epoch, rank,
    world_size, table, sizes): independent of worker count, rebuilds and restarts.
    """

    def __init__(self, shards_dir, *, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1,
                 device=torch.device("cpu"), seed: int = 0, workers: int = 2, threads: int = 2,
                 multires_sizes=(), table=None, dtype: torch.dtype = torch.float32,
                 crop_min_scale: float = MOCO_SCALE[0]):
        super().__init__(shards_dir, batch_size=batch_size, rank=rank, world_size=world_size, device=device,
                         workers=workers, threads=threads, dtype=dtype)
        self.local_batch = check_batch(self.num_samples, self.global_batch, self.world_size)
        self.image_size, self.seed = int(image_size), int(seed)
        self.multires_sizes = tuple(int(s) for s in multires_sizes)
        self.crop_min_scale = float(crop_min_scale)
        self._table, self._table_dir, self._table_version = None, None, 0
        self._pending = _UNSET
        self._install_table(table)

    def _steps(self) -> int:
        return steps_per_epoch(self.num_samples, self.global_batch)

    @property
    def table(self):
        return self._table

    def set_table(self, table) -> None:
        """Use `table` (a NeighbourTable, or None for plain MoCo v2) from the next `set_epoch`."""
        self._check_table(table)
        self._pending = table

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self._pending is not _UNSET:
            self._install_table(self._pending)
            self._pending = _UNSET

    def _check_table(self, table) -> None:
        if table is None:
            return
        where = table.meta.get("path", "neighbour table")
        table.check_consistent(where)
        table.check_matches(self.dataset.dataset_id, self.num_samples, where)

    def _install_table(self, table) -> None:
        self._check_table(table)
        self._table = table
        self._table_version += 1
        if self._table_dir is not None:  # workers that still map it keep their view (POSIX unlink)
            shutil.rmtree(self._table_dir, ignore_errors=True)
        self._table_dir = None
        if table is not None:
            folder = self.scratch_dir() / f"table-{self._table_version}"
            folder.mkdir(parents=True)
            np.save(folder / "positives.npy", np.ascontiguousarray(table.positives, dtype=np.int32))
            np.save(folder / "counts.npy", np.ascontiguousarray(table.counts, dtype=np.int32))
            self._table_dir = str(folder)

    def _config_key(self):
        return self._table_version

    def views(self) -> tuple[tuple[ViewSpec, ...], tuple[ViewSpec, ...]]:
        if self._table is None:
            return moco_views(self.image_size, min_scale=self.crop_min_scale), ()
        views = moco_views(self.image_size, self.multires_sizes, self.crop_min_scale)
        return views, views

    def _build(self, start_epoch: int):
        anchor_views, positive_views = self.views()
        source = AugmentSource(self.shards_dir, num_samples=self.num_samples, global_batch=self.global_batch,
                               rank=self.rank, world_size=self.world_size, seed=self.seed,
                               start_epoch=start_epoch, anchor_views=anchor_views,
                               positive_views=positive_views, table_dir=self._table_dir)
        pipe = augment_graph(source, anchor_views, positive_views, self.device_id is not None, self.dali_dtype,
                             self.workers > 0, **self.pipeline_kwargs(self.local_batch))
        names = anchor_names(self.image_size, anchor_views) + ["meta"]
        if positive_views:
            names += positive_names(self.image_size, positive_views) + ["pos_id"]
        return pipe, names

    def _batch(self, named: dict) -> dict:
        named = split_meta(named)
        if "pos_id" in named:
            named["pos_id"] = named["pos_id"].reshape(-1)
        if self.dtype == torch.bfloat16:
            for key, value in named.items():
                if value.is_floating_point():
                    named[key] = value.to(torch.bfloat16)
        return named


class _Unset:
    pass


_UNSET = _Unset()
