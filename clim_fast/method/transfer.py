"""Small host tensors (mixing boxes and lambdas, shuffle-BN permutations) to the device without a
host-device synchronisation: a plain `.to(cuda)` from pageable memory waits for the stream, which
empties the GPU's queue before every step. Pinned memory and a non-blocking copy keep the CPU
ahead; the caching host allocator keeps the pinned block until its copy has run."""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
