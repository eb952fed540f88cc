"""The batched mixing op: CutMix (default) and Mixup of anchor views with positive views.

One op over the whole batch, no Python loop over samples: CutMix boxes become a boolean mask
built by comparing row/column aranges with per-sample box edges. The per-sample scalars (lambda,
box centre) and the anchor's area share are drawn and computed on the CPU from the given
torch.Generator (a CPU generator; a generator on another device only seeds a CPU one), then moved
to the images' device: CPU and CUDA batches get bit-identical boxes and lambdas from the same
generator state, whatever the images' dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from clim_fast.transfer import to_device
from shards.errors import UserError


def _cpu_generator(generator: torch.Generator) -> torch.Generator:
    """The generator itself when it lives on the CPU, else a CPU generator seeded by one draw of it."""
    if generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator().manual_seed(seed)


def sample_beta(n: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """n draws of Beta(alpha, alpha), float32 on the CPU.

    torch's Beta/Gamma samplers take no generator, so the draws come from a numpy Generator
    seeded by the torch one: still a pure function of the torch generator's state.
    """
    if alpha <= 0:
        raise UserError(f"alpha: must be positive, got {alpha}")
    generator = _cpu_generator(generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=n).astype(np.float32)
    return torch.from_numpy(lam)


def cutmix_boxes(lam: torch.Tensor, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample boxes [n, 4] as (y1, y2, x1, x2), int64, half-open, following the CutMix paper's
    rand_bbox: cut ratio sqrt(1 - lam), centre uniform over the image, edges clipped to it.
    Computed on the CPU (lam is moved there), returned on the CPU."""
    generator = _cpu_generator(generator)
    lam = lam.cpu()
    n = lam.shape[0]
    cut = torch.sqrt(1.0 - lam.double())
    cut_h = torch.floor(height * cut).long()
    cut_w = torch.floor(width * cut).long()
    cy = torch.randint(0, height, (n,), generator=generator)
    cx = torch.randint(0, width, (n,), generator=generator)
    y1 = (cy - cut_h // 2).clamp(0, height)
    y2 = (cy + cut_h // 2).clamp(0, height)
    x1 = (cx - cut_w // 2).clamp(0, width)
    x2 = (cx + cut_w // 2).clamp(0, width)
    return torch.stack([y1, y2, x1, x2], dim=1)


def box_masks(boxes: torch.Tensor, height: int, width: int, device) -> torch.Tensor:
    """Boolean [n, 1, H, W]: True inside each sample's box."""
    boxes = to_device(boxes, device)
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
    generator = _cpu_generator(generator)
    lam = sample_beta(n, alpha, generator)
    boxes = cutmix_boxes(lam, h, w, generator)  # CPU int64
    mask = box_masks(boxes, h, w, anchor.device)
    mixed = torch.where(mask, positive, anchor)
    # the true share, in float64 on the CPU: no device-specific division (CUDA divides by a
    # scalar as a multiplication by its reciprocal, one ulp off the CPU)
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    share = (1.0 - area.double() / (h * w)).float()
    return mixed, to_device(share, anchor.device)


def mixup(anchor: torch.Tensor, positive: torch.Tensor, alpha: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """lam * anchor + (1 - lam) * positive, lam ~ Beta(alpha, alpha) per sample."""
    _check_pair(anchor, positive)
    lam = to_device(sample_beta(anchor.shape[0], alpha, generator), anchor.device)  # drawn on the CPU
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
