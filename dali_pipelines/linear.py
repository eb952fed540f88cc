"""Linear-evaluation loaders: train = RandomResizedCrop(0.08-1) + flip over the drop-last epoch
share; val = resize + centre crop over every sample once."""

from __future__ import annotations

import torch

from dali_pipelines.augment import LINEAR_SCALE, ViewSpec
from dali_pipelines.epochs import check_batch, steps_per_epoch
from dali_pipelines.center import CenterCropLoader
from dali_pipelines.loader import DaliLoader, split_meta
from dali_pipelines.pretrain import augment_graph
from dali_pipelines.external import AugmentSource


class _LinearTrainLoader(DaliLoader):
    def __init__(self, shards_dir, *, batch_size, image_size, rank, world_size, device, seed, workers, threads,
                 dtype):
        super().__init__(shards_dir, batch_size=batch_size, rank=rank, world_size=world_size, device=device,
                         workers=workers, threads=threads, dtype=dtype)
        self.local_batch = check_batch(self.num_samples, self.global_batch, self.world_size)
        self.image_size, self.seed = int(image_size), int(seed)
        self.view = ViewSpec(self.image_size, LINEAR_SCALE, color=False)

    def _steps(self) -> int:
        return steps_per_epoch(self.num_samples, self.global_batch)

    def _build(self, start_epoch: int):
        source = AugmentSource(self.shards_dir, num_samples=self.num_samples, global_batch=self.global_batch,
                               rank=self.rank, world_size=self.world_size, seed=self.seed,
                               start_epoch=start_epoch, anchor_views=(self.view,))
        pipe = augment_graph(source, (self.view,), (), self.device_id is not None, self.dali_dtype,
                             self.workers > 0, **self.pipeline_kwargs(self.local_batch))
        return pipe, ("image", "meta")

    def _batch(self, named: dict) -> dict:
        named = split_meta(named)
        if self.dtype == torch.bfloat16:
            named["image"] = named["image"].to(torch.bfloat16)
        return named


def LinearLoader(shards_dir, *, batch_size: int, image_size: int, train: bool, rank: int = 0, world_size: int = 1,
                 device=torch.device("cpu"), seed: int = 0, workers: int = 2, threads: int = 2,
                 dtype: torch.dtype = torch.float32) -> DaliLoader:
    """Yields `image`, `id`, `label`; `set_epoch(e)` (a no-op for val). `batch_size` is global."""
    if train:
        return _LinearTrainLoader(shards_dir, batch_size=batch_size, image_size=image_size, rank=rank,
                                  world_size=world_size, device=device, seed=seed, workers=workers,
                                  threads=threads, dtype=dtype)
    return CenterCropLoader(shards_dir, batch_size=batch_size, image_size=image_size, rank=rank,
                            world_size=world_size, device=device, workers=workers, threads=threads, dtype=dtype)
