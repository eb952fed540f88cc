"""MoCo v2 (He et al. 2020; Chen et al. 2020), after facebookresearch/moco builder.py.

Query and momentum (key) encoders, each a torchvision ResNet plus the v2 MLP head
(dim -> dim -> feat_dim), L2-normalised outputs, a queue of K keys [feat_dim, K] with a pointer,
the momentum update before the key forward, and shuffle BN for the keys.

`forward(batch)` is one whole MoCo v2 step up to the loss; the keys it computed are enqueued by
`enqueue_keys()` after the optimizer step (the loss must see the queue as it was). `CLIM`
(clim.py) adds the mixing path to the same step.

Shuffle BN: across ranks as in builder.py (one seeded permutation shared by every rank, each rank
encodes its slice of the shuffled global batch, gather the keys and un-shuffle), except that each
rank receives only its slice's images instead of gathering all of them. In a single process the
equivalent is to permute the key batch and run the key encoder on `shuffle_bn_groups` equal
chunks, so BatchNorm statistics come from random subsets unrelated to the query batch, which is
what shuffle BN across that many GPUs computes.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from clim_fast import distributed as dist
from clim_fast.config import CUDA_GRAPH_MODES, MINE_FEATURES
from clim_fast.method.backbone import build_backbone
from clim_fast.method.losses import clim_loss
from clim_fast.transfer import to_device


def autocast_dtype(precision: str, device) -> torch.dtype | None:
    """The encoders' autocast dtype for config `precision` (None: fp32). `auto` is fp16 on CUDA:
    PyTorch runs cuDNN's batch norm for fp16 but its own, slower kernels for bf16 (batch norm was
    46% of a bf16 clim_multires step; 1,040 against 910 anchors/s on an H200). fp16 needs the
    loop's loss scaling (`training.step.grad_scaler`)."""
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else None
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]


def image_dtype(precision: str, device) -> torch.dtype:
    """The dtype the loaders hand images in: fp16 straight from DALI when the encoders run in fp16
    (half the bytes); DALI has no bf16, so bf16 and fp32 runs read fp32 (autocast casts at the
    first convolution)."""
    return torch.float16 if autocast_dtype(precision, device) == torch.float16 else torch.float32


def step_generator(seed: int, stream: int = 0) -> torch.Generator:
    """A random stream of the step (shuffle BN: 0; CLIM's mixing: 1 + rank), from the run's seed."""
    return torch.Generator().manual_seed(seed * 7919 + stream)


class Encoder(nn.Module):
    """Backbone + MoCo v2 MLP head. Takes one NCHW batch, or a list of batches (one call, so a
    DDP wrapper sees a single forward per step even with several query views)."""

    def __init__(self, arch: str, image_size: int, feat_dim: int, width: int = 64):
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(arch, image_size, width)
        dim = self.feature_dim
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, feat_dim))

    def forward(self, x):
        if isinstance(x, (list, tuple)):
            return [self.encode(t) for t in x]
        return self.encode(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class MoCo(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.K = cfg.queue_size
        self.m = cfg.ema_momentum
        self.T = cfg.temperature
        self.shuffle_bn = cfg.shuffle_bn
        self.shuffle_bn_groups = max(1, cfg.shuffle_bn_groups)
        self.precision, self.channels_last = cfg.precision, cfg.channels_last
        width = cfg.width
        self.encoder_q = Encoder(cfg.arch, cfg.image_size, cfg.feat_dim, width)
        self.encoder_k = Encoder(cfg.arch, cfg.image_size, cfg.feat_dim, width)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(cfg.feat_dim, self.K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # The shuffle-BN permutation stream is the same on every rank (seeded by cfg.seed only).
        self.shuffle_generator = step_generator(cfg.seed)
        self._keys_to_enqueue = None
        self._ema_params = None  # (key params, query params), listed at the first momentum update
        self.uses_cuda_graphs = False  # compile_encoders with a CUDA-graph mode

    def compile_encoders(self, backend: str = "inductor", mode: str = "default") -> None:
        """torch.compile each encoder's per-view call (config `compile`, `compile_mode`). The views
        go through it one by one, so the query encoder compiles twice, whatever the number of
        multi-resolution views: once for image_size, once more with height and width dynamic at the
        second size (torch's automatic dynamic shapes), which then serves every other size. Mining's
        feature pass (`key_features`) stays eager. With mode `reduce-overhead` (or `max-autotune`)
        each call replays as a CUDA graph (one launch instead of hundreds), and
        `training.step.train_step` marks where each step begins (`uses_cuda_graphs`)."""
        options = {} if mode == "default" else {"mode": mode}
        for encoder in (self.encoder_q, self.encoder_k):
            encoder.encode = torch.compile(encoder.encode, backend=backend, **options)
        self.uses_cuda_graphs = mode in CUDA_GRAPH_MODES

    # -- the step --------------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """MoCo v2: InfoNCE(q, k) against the queue. Returns (loss, detached terms)."""
        with self.autocast(batch["q"]):
            q = F.normalize(self.encoder_q(self.layout(batch["q"])).float(), dim=1)
            self.momentum_update()
            k = self.keys(batch["k"])
        loss, terms = clim_loss(q, k, self.queue, self.T)
        self._keys_to_enqueue = k
        return loss, terms

    @torch.no_grad()
    def enqueue_keys(self) -> None:
        """Enqueue the keys of the last forward (every rank's, rank order). Call after the
        optimizer step."""
        if self._keys_to_enqueue is None:
            raise RuntimeError("enqueue_keys() without a forward since the last enqueue")
        self.dequeue_and_enqueue(self._keys_to_enqueue)
        self._keys_to_enqueue = None

    def autocast_dtype(self, device) -> torch.dtype | None:
        return autocast_dtype(self.precision, device)

    def autocast(self, x: torch.Tensor):
        dtype = self.autocast_dtype(x.device)
        return nullcontext() if dtype is None else torch.autocast(x.device.type, dtype=dtype)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.is_cuda:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    # -- MoCo's parts ------------------------------------------------------------------------------
    @torch.no_grad()
    def momentum_update(self) -> None:
        """param_k = m * param_k + (1 - m) * param_q, as one lerp over all parameters."""
        if self._ema_params is None:  # walking the module tree costs 0.1-0.2 ms a list: list once
            self._ema_params = (list(self.encoder_k.parameters()), list(self.encoder_q.parameters()))
        torch._foreach_lerp_(*self._ema_params, 1.0 - self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Enqueue this step's keys from every rank (rank order), overwriting the oldest."""
        keys = dist.all_gather_cat(keys)
        batch_size = keys.shape[0]
        if self.K % batch_size != 0:
            raise ValueError(f"queue_size {self.K} is not a multiple of the global batch {batch_size}")
        # the pointer stays on the device: reading it would make the CPU wait for the whole step
        columns = self.queue_ptr + torch.arange(batch_size, device=self.queue_ptr.device)
        self.queue.index_copy_(1, columns, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(batch_size).remainder_(self.K)

    @torch.no_grad()
    def keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """L2-normalised momentum-encoder outputs for im_k, with shuffle BN. No gradient."""
        im_k = self.layout(im_k)
        if not self.shuffle_bn:
            return F.normalize(self.encoder_k(im_k).float(), dim=1)
        if dist.is_distributed():
            return self._keys_shuffled_across_ranks(im_k)
        return self._keys_shuffled_in_groups(im_k)

    def _keys_shuffled_across_ranks(self, im_k):
        """Shuffle BN across ranks: rank s encodes samples perm[s*B:(s+1)*B] of the global batch.
        Each rank receives just those images (`dist.shuffled_share`; MoCo's reference gathers the
        whole global batch onto every rank: world size times the traffic); the keys come back by
        an all-gather (B x 128 a rank)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if torch.is_autocast_enabled(im_k.device.type):  # the encoder reads half precision anyway: send that
            im_k = im_k.to(torch.get_autocast_dtype(im_k.device.type))
        # every rank draws the same permutation from the same stream: no broadcast needed
        perm = torch.randperm(world * im_k.shape[0], generator=self.shuffle_generator)
        k = F.normalize(self.encoder_k(dist.shuffled_share(im_k, perm)).float(), dim=1)
        k_all = dist.all_gather_cat(k)
        return k_all[to_device(torch.argsort(perm).view(world, -1)[rank], im_k.device)]

    def _keys_shuffled_in_groups(self, im_k):
        n = im_k.shape[0]
        groups = math.gcd(n, self.shuffle_bn_groups)
        perm = to_device(torch.randperm(n, generator=self.shuffle_generator), im_k.device)
        k = torch.cat([self.encoder_k(chunk) for chunk in im_k[perm].chunk(groups)])
        out = torch.empty_like(k)
        out[perm] = k
        return F.normalize(out.float(), dim=1)

    @torch.no_grad()
    def key_features(self, x: torch.Tensor, kind: str = "head") -> torch.Tensor:
        """L2-normalised momentum-encoder features (eval-mode BN): head output or pooled backbone."""
        if kind not in MINE_FEATURES:
            raise ValueError(f"kind must be head or backbone, got {kind!r}")
        was_training = self.encoder_k.training
        self.encoder_k.eval()
        try:
            feats = self.encoder_k.backbone(x)
            if kind == "head":
                feats = self.encoder_k.head(feats)
            return F.normalize(feats.float(), dim=1)
        finally:
            self.encoder_k.train(was_training)
