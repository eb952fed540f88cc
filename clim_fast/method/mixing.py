"""The batched mixing op: CutMix (default) and Mixup of anchor views with positive views.

One op over the whole batch, no Python loop over samples: CutMix boxes become a boolean mask
built by comparing row/column aranges with per-sample box edges. The per-sample scalars (lambda,
box centre) are drawn from the given torch.Generator on its device, then moved to the images'
device, so the same code runs on CPU and CUDA tensors and is reproducible from the generator.
"""

from __future__ import annotations

import numpy as np
import torch

from shards.errors import UserError


def sample_beta(n: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """n draws of Beta(alpha, alpha), float32 on the generator's device.

    torch's Beta/Gamma samplers take no generator, so the draws come from a numpy Generator
    seeded by the torch one: still a pure function of the torch generator's state.
    """
    if alpha <= 0:
        raise UserError(f"alpha: must be positive, got {alpha}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=n).astype(np.float32)
    return torch.from_numpy(lam).to(generator.device)


def cutmix_boxes(lam: torch.Tensor, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample boxes [n, 4] as (y1, y2, x1, x2), int64, half-open, following the CutMix paper's
    rand_bbox: cut ratio sqrt(1 - lam), centre uniform over the image, edges clipped to it."""
    n = lam.shape[0]
    cut = torch.sqrt(1.0 - lam.double())
    cut_h = torch.floor(height * cut).long()
    cut_w = torch.floor(width * cut).long()
    cy = torch.randint(0, height, (n,), generator=generator, device=generator.device)
    cx = torch.randint(0, width, (n,), generator=generator, device=generator.device)
    y1 = (cy - cut_h // 2).clamp(0, height)
    y2 = (cy + cut_h // 2).clamp(0, height)
    x1 = (cx - cut_w // 2).clamp(0, width)
    x2 = (cx + cut_w // 2).clamp(0, width)
    return torch.stack([y1, y2, x1, x2], dim=1)


def box_masks(boxes: torch.Tensor, height: int, width: int, device) -> torch.Tensor:
    """Boolean [n, 1, H, W]: True inside each sample's box."""
    boxes = boxes.to(device)
    ys = torch.arange(height, device=device).view(1, height, 1)
    xs = torch.arange(width, device=device).view(1, 1, width)
    y1, y2, x1, x2 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    inside = (ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)
    return inside.unsqueeze(1)


def cutmix(anchor: torch.Tensor, positive: torch.Tensor, alpha: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a box of each positive into its anchor. Returns (mixed, lam) with lam [n] (float32,
    on the images' device) the anchor's true area share after clipping."""
    _check_pair(anchor, positive)
    n, _, h, w = anchor.shape
    lam = sample_beta(n, alpha, generator)
    boxes = cutmix_boxes(lam, h, w, generator)
    mask = box_masks(boxes, h, w, anchor.device)
    mixed = torch.where(mask, positive, anchor)
    area = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).to(anchor.device, torch.float32)
    return mixed, 1.0 - area / (h * w)


def mixup(anchor: torch.Tensor, positive: torch.Tensor, alpha: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """lam * anchor + (1 - lam) * positive, lam ~ Beta(alpha, alpha) per sample."""
    _check_pair(anchor, positive)
    lam = sample_beta(anchor.shape[0], alpha, generator).to(anchor.device)
    w = lam.to(anchor.dtype).view(-1, 1, 1, 1)
    return w * anchor + (1 - w) * positive, lam


def mix_images(method: str, anchor: torch.Tensor, positive: torch.Tensor, alpha: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "cutmix":
        return cutmix(anchor, positive, alpha, generator)
    if method == "mixup":
        return mixup(anchor, positive, alpha, generator)
    raise UserError(f"mix: unknown mixing method {method!r} (cutmix or mixup)")


def _check_pair(anchor: torch.Tensor, positive: torch.Tensor) -> None:
    if anchor.shape != positive.shape or anchor.ndim != 4:
        raise ValueError(f"mixing needs two NCHW batches of one shape, got {tuple(anchor.shape)} "
                         f"and {tuple(positive.shape)}")
