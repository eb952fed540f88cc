"""The centre-crop graph and `FeatureLoader`: feature extraction for mining and kNN, and
linear-evaluation val.

The view is torchvision's Resize(round(S * 256 / 224)) + CenterCrop(S), done as one resize of the
crop's ROI (the same sampling grid, one pass over the pixels).

Every sample exactly once across ranks: rank r reads ids r, r + W, ... in increasing order, padded
to the same whole number of batches on every rank; padded slots are cut off before a batch is
handed out (only ever at the end of a rank's last batch).
"""

from __future__ import annotations

import torch
from nvidia.dali import pipeline_def

from dali_pipelines.epochs import PAD_ID, eval_share
from dali_pipelines.external import IdListSource, ShardReader
from dali_pipelines.loader import BatchStream, ClosedOnExit, Settings, as_dataset
from dali_pipelines.ops import center_view, output, source_columns, source_image
from shards.errors import UserError


@pipeline_def
def center_graph(source, image_size, settings):
    c = source_columns(source, settings)
    image = source_image(c, "jpeg", settings)
    return output(center_view(image, c["roi"], image_size, settings.dali_dtype), settings), output(c["meta"], settings)


class FeatureLoader(ClosedOnExit):
    """Every sample of the rank's share once per pass, resized and centre-cropped: `image`, `id`,
    `label`. Also the linear-evaluation val loader. `batch_size` is global; each rank reads
    ceil(batch_size / world_size) per step.

    The pipeline persists across passes (mining runs one every few epochs): the source cycles
    through the same ids, so the next pass is already being prefetched. `set_epoch` is accepted
    (and ignored) so train and val loaders are driven alike.
    """

    def __init__(self, dataset, *, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1,
                 device=torch.device("cpu"), workers: int = 2, threads: int = 2,
                 dtype: torch.dtype = torch.float32, hw_decoder_load: float = 0.65, cpu_decode: bool = False,
                 cpu_views: bool = False):
        self.dataset = as_dataset(dataset)
        self.num_samples = self.dataset.num_samples
        self.global_batch, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {rank}: outside 0..{world_size - 1}")
        if self.global_batch <= 0:
            raise UserError(f"batch size {batch_size} must be positive")
        self.settings = Settings(device, dtype, workers, threads, hw_decoder_load, cpu_decode, cpu_views)
        self.image_size = int(image_size)
        self.local_batch = max(1, -(-self.global_batch // self.world_size))
        self.ids = eval_share(self.num_samples, self.local_batch, self.rank, self.world_size)
        self.num_valid = int((self.ids != PAD_ID).sum())
        self.steps = len(self.ids) // self.local_batch
        # padding only ever trails: the valid count of each step, known without asking the GPU
        self._valid = (self.ids.reshape(self.steps, self.local_batch) != PAD_ID).sum(axis=1).tolist()
        self._reader = ShardReader(self.dataset)
        self._stream: BatchStream | None = None

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass

    def __iter__(self):
        stream = self._stream
        if stream is None or stream.broken or stream.next_step % self.steps:
            self.close()  # a pass abandoned half-way: start a fresh stream at the first id
            stream = self._stream = self._build()
        for step in range(self.steps):
            yield self._finish(stream.next(), self._valid[step])

    def _build(self) -> BatchStream:
        source = IdListSource(self._reader, self.ids, self.image_size, self.local_batch)
        s = self.settings
        pipe = center_graph(source, self.image_size, s, **s.pipeline_kwargs(self.local_batch, 2))
        return BatchStream(pipe, ("image", "meta"), s, first_step=0, depth=2, source=source,
                           local_batch=self.local_batch, dataset=self.dataset)

    def _finish(self, named: dict, valid: int) -> dict:
        named = self.settings.finish(named)
        if valid < len(named["id"]):
            named = {key: value[:valid] for key, value in named.items()}
        return named

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
