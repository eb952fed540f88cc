"""Linear-evaluation training loader: RandomResizedCrop(0.08-1) + flip over the drop-last epoch
share (the val side is `center.FeatureLoader`)."""

from __future__ import annotations

import torch

from dali_pipelines.augment import LINEAR_SCALE, ViewSpec
from dali_pipelines.external import AugmentSource
from dali_pipelines.loader import BatchStream, EpochLoader
from dali_pipelines.pretrain import augment_graph


class LinearTrainLoader(EpochLoader):
    """Yields `image`, `id`, `label` for one rank; `batch_size` is global. `set_epoch(e,
    start_step=0)` then iterate; the pipeline streams on from one epoch into the next."""

    def __init__(self, dataset, *, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1,
                 device=torch.device("cpu"), seed: int = 0, workers: int = 2, threads: int = 2,
                 dtype: torch.dtype = torch.float32):
        super().__init__(dataset, batch_size=batch_size, image_size=image_size, rank=rank, world_size=world_size,
                         device=device, seed=seed, workers=workers, threads=threads, dtype=dtype)
        self.view = ViewSpec(self.image_size, LINEAR_SCALE, color=False)

    def __iter__(self):
        epoch, step = self.epoch, self.start_step
        target = epoch * self.steps + step
        stream = self._stream
        if stream is None or stream.broken or stream.next_step != target:
            self.close()
            stream = self._stream = self._build(target)
        for _ in range(step, self.steps):
            named = stream.next()
            named["image"] = named.pop("q")
            yield self.settings.finish(named)

    def _build(self, first_step: int) -> BatchStream:
        source = AugmentSource(self._reader, num_samples=self.num_samples, global_batch=self.global_batch,
                               rank=self.rank, world_size=self.world_size, seed=self.seed,
                               start=first_step * self.local_batch, anchor_views=(self.view,))
        s = self.settings
        pipe = augment_graph(source, (self.view,), (), s, **s.pipeline_kwargs(self.local_batch, 2))
        return BatchStream(pipe, ("q", "meta"), s, first_step=first_step, depth=2, source=source,
                           local_batch=self.local_batch, dataset=self.dataset)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
