"""Small tensors between host and device without a host-device synchronisation: a plain `.to(cuda)`
from pageable memory, or `.item()` / `.tolist()` of a device tensor, waits for the stream, which
empties the GPU's queue (the CPU then launches the next step from an empty queue).

`to_device`: mixing boxes and lambdas, shuffle-BN permutations up, through pinned memory with a
non-blocking copy (the caching host allocator keeps the pinned block until its copy has run).
`HostCopy`: loss terms and stop flags down, read a while later, when the copy has long finished.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """Named scalars of the device copied to pinned host memory without waiting; `values()` returns
    them as floats, waiting only for that copy (by then long done where the caller reads them a few
    steps later)."""

    def __init__(self, values: dict[str, torch.Tensor]):
        self.names = sorted(values)
        stacked = torch.stack([values[n].detach().float().reshape(()) for n in self.names])
        self.event = None
        if stacked.is_cuda:
            self.host = torch.empty(stacked.shape, pin_memory=True)
            self.host.copy_(stacked, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = stacked

    def values(self) -> dict[str, float]:
        if self.event is not None:
            self.event.synchronize()
        return dict(zip(self.names, self.host.tolist()))
