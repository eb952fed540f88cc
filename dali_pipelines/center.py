"""The centre-crop graph: feature extraction for mining and kNN, and linear-evaluation val.

The view is torchvision's Resize(round(S * 256 / 224)) + CenterCrop(S), done as one resize of the
crop's ROI (the same sampling grid, one pass over the pixels).

Every sample exactly once across ranks: rank r reads ids r, r + W, ... in increasing order, padded
to the same whole number of batches on every rank; padded slots are cut off before a batch is
handed out (only ever at the end of a rank's last batch).
"""

from __future__ import annotations

import torch
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from dali_pipelines.epochs import PAD_ID, eval_share
from dali_pipelines.loader import DaliLoader, split_meta
from dali_pipelines.ops import center_view, decode
from dali_pipelines.external import IdListSource


@pipeline_def
def center_graph(source, image_size, gpu, dali_dtype, parallel):
    jpeg, roi, meta = fn.external_source(source=source, num_outputs=3, batch=False, parallel=parallel,
                                         dtype=[types.UINT8, types.FLOAT, types.INT64])
    return center_view(decode(jpeg, gpu), roi, image_size, dali_dtype), meta


class CenterCropLoader(DaliLoader):
    """Every sample of the rank's share once, resized and centre-cropped: `image`, `id`, `label`.

    `batch_size` is global; each rank reads ceil(batch_size / world_size) per step."""

    epoch_dependent = False

    def __init__(self, shards_dir, *, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1,
                 device=torch.device("cpu"), workers: int = 2, threads: int = 2,
                 dtype: torch.dtype = torch.float32):
        super().__init__(shards_dir, batch_size=batch_size, rank=rank, world_size=world_size, device=device,
                         workers=workers, threads=threads, dtype=dtype)
        self.image_size = int(image_size)
        self.local_batch = max(1, -(-self.global_batch // self.world_size))
        self.ids = eval_share(self.num_samples, self.local_batch, self.rank, self.world_size)
        self.num_valid = int((self.ids != PAD_ID).sum())

    def _steps(self) -> int:
        return len(self.ids) // self.local_batch

    def _build(self, start_epoch: int):
        source = IdListSource(self.shards_dir, self.ids, self.image_size)
        pipe = center_graph(source, self.image_size, self.device_id is not None, self.dali_dtype,
                            self.workers > 0, **self.pipeline_kwargs(self.local_batch))
        return pipe, ("image", "meta")

    def _batch(self, named: dict) -> dict:
        named = split_meta(named)
        valid = int((named["id"] != PAD_ID).sum())  # padding only ever trails
        if valid < len(named["id"]):
            named = {key: value[:valid] for key, value in named.items()}
        if self.dtype == torch.bfloat16:
            named["image"] = named["image"].to(torch.bfloat16)
        return named


class FeatureLoader(CenterCropLoader):
    """Feature extraction: every sample once, in id order within the rank's share."""
