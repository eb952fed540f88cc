"""MoCo v2 (He et al. 2020; Chen et al. 2020), transcribed from facebookresearch/moco builder.py.

Query and momentum (key) encoders, each a torchvision ResNet plus the v2 MLP head
(dim -> dim -> feat_dim), L2-normalised outputs, a queue of K keys [feat_dim, K] with a pointer,
the momentum update before the key forward, and shuffle BN for the keys.

Shuffle BN: across ranks exactly as in builder.py (gather the key images, rank 0 draws a
permutation and broadcasts it, each rank encodes its slice, gather and un-shuffle). In a single
process the equivalent is to permute the key batch and run the key encoder on
`shuffle_bn_groups` equal chunks, so BatchNorm statistics come from random subsets unrelated to
the query batch, which is what shuffle BN across that many GPUs computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from clim_fast import distributed as dist
from clim_fast.method.backbone import build_backbone
from clim_fast.method.losses import moco_logits


class Encoder(nn.Module):
    """Backbone + MoCo v2 MLP head. Takes one NCHW batch, or a list of batches (one call, so a
    DDP wrapper sees a single forward per step even with several query views)."""

    def __init__(self, arch: str, image_size: int, feat_dim: int):
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(arch, image_size)
        dim = self.feature_dim
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, feat_dim))

    def forward(self, x):
        if isinstance(x, (list, tuple)):
            return [self.head(self.backbone(t)) for t in x]
        return self.head(self.backbone(x))


class MoCo(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.K = cfg.queue_size
        self.m = cfg.ema_momentum
        self.T = cfg.temperature
        self.shuffle_bn = cfg.shuffle_bn
        self.shuffle_bn_groups = max(1, getattr(cfg, "shuffle_bn_groups", 1))
        self.encoder_q = Encoder(cfg.arch, cfg.image_size, cfg.feat_dim)
        self.encoder_k = Encoder(cfg.arch, cfg.image_size, cfg.feat_dim)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(cfg.feat_dim, self.K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """param_k = m * param_k + (1 - m) * param_q."""
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(k_params, self.m)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Enqueue this step's keys from every rank (rank order), overwriting the oldest."""
        keys = dist.all_gather_cat(keys)
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        if self.K % batch_size != 0:
            raise ValueError(f"queue_size {self.K} is not a multiple of the global batch {batch_size}")
        self.queue[:, ptr:ptr + batch_size] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """L2-normalised momentum-encoder outputs for im_k, with shuffle BN. No gradient."""
        if not self.shuffle_bn:
            return F.normalize(self.encoder_k(im_k).float(), dim=1)
        if dist.is_distributed():
            return self._keys_shuffled_across_ranks(im_k, generator)
        return self._keys_shuffled_in_groups(im_k, generator)

    def _keys_shuffled_across_ranks(self, im_k, generator):
        world, rank = dist.get_world_size(), dist.get_rank()
        x_all = dist.all_gather_cat(im_k)
        perm = torch.randperm(x_all.shape[0], generator=generator)
        perm = dist.broadcast_tensor(perm, 0).to(im_k.device)
        unperm = torch.argsort(perm)
        k = F.normalize(self.encoder_k(x_all[perm.view(world, -1)[rank]]).float(), dim=1)
        k_all = dist.all_gather_cat(k)
        return k_all[unperm.view(world, -1)[rank]]

    def _keys_shuffled_in_groups(self, im_k, generator):
        n = im_k.shape[0]
        groups = math.gcd(n, self.shuffle_bn_groups)
        perm = torch.randperm(n, generator=generator).to(im_k.device)
        k = torch.cat([self.encoder_k(chunk) for chunk in im_k[perm].chunk(groups)])
        out = torch.empty_like(k)
        out[perm] = k
        return F.normalize(out.float(), dim=1)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, generator: torch.Generator | None = None):
        """builder.py's forward: (logits [n, 1+K], labels zeros); enqueues the keys."""
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        self.momentum_update()
        k = self.keys(im_k, generator)
        logits, labels = moco_logits(q, k, self.queue.clone().detach(), self.T)
        self.dequeue_and_enqueue(k)
        return logits, labels

    @torch.no_grad()
    def key_features(self, x: torch.Tensor, kind: str = "head") -> torch.Tensor:
        """L2-normalised momentum-encoder features (eval-mode BN): head output or pooled backbone."""
        was_training = self.encoder_k.training
        self.encoder_k.eval()
        try:
            feats = self.encoder_k.backbone(x)
            if kind == "head":
                feats = self.encoder_k.head(feats)
            elif kind != "backbone":
                raise ValueError(f"kind must be head or backbone, got {kind!r}")
            return F.normalize(feats.float(), dim=1)
        finally:
            self.encoder_k.train(was_training)

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_features(x, kind="backbone")
