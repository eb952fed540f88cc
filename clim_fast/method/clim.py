"""CLIM (Center-wise Local Image Mixture) on MoCo v2: the whole training step in one forward.

    loss, terms = model(batch)      # DDP wraps this module
    loss.backward(); optimizer.step()
    model.enqueue_keys()            # only k (the anchor's key) enters the queue

With positives in the batch (`pos`, `k_pos`, and per multi-resolution size S `q_r{S}`,
`pos_r{S}`), each anchor view is mixed with its positive's view (batched CutMix or Mixup, one
lambda per sample and view), all query views go through the query encoder in one call, the
momentum update runs, then the keys `k` and `k_pos`, and the loss is

    InfoNCE(q, k) + mix_weight * mean_views[ lam * InfoNCE(q_mix, k) + (1 - lam) * InfoNCE(q_mix, k_pos) ]

Without positives (MoCo v2 epochs, or preset moco_v2) the step is MoCo v2's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clim_fast.method.losses import clim_loss
from clim_fast.method.mixing import mix_images
from clim_fast.method.moco import MoCo, step_generator
from dali_pipelines.names import mixing_pairs


class CLIM(MoCo):
    def __init__(self, cfg, rank: int = 0):
        super().__init__(cfg)
        self.mix, self.alpha, self.mix_weight = cfg.mix, cfg.alpha, cfg.mix_weight
        self.multires_sizes = cfg.multires_sizes
        # lambdas and boxes differ per rank (each rank mixes its own samples)
        self.mix_generator = step_generator(cfg.seed, 1 + rank)

    def generators(self) -> dict[str, torch.Generator]:
        """Every random stream of the step, for checkpoints."""
        return {"mix": self.mix_generator, "shuffle": self.shuffle_generator}

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.mix == "none" or "pos" not in batch:
            return super().forward(batch)
        views, lams = [batch["q"]], []
        for anchor, positive in mixing_pairs(self.multires_sizes):
            mixed, lam = mix_images(self.mix, batch[anchor], batch[positive], self.alpha, self.mix_generator)
            views.append(mixed)
            lams.append(lam)
        with self.autocast(batch["q"]):
            qs = [F.normalize(out.float(), dim=1) for out in self.encoder_q([self.layout(v) for v in views])]
            self.momentum_update()
            k = self.keys(batch["k"])
            k_pos = self.keys(batch["k_pos"])
        loss, terms = clim_loss(qs[0], k, self.queue, self.T, list(zip(qs[1:], lams)), k_pos, self.mix_weight)
        self._keys_to_enqueue = k
        return loss, terms
