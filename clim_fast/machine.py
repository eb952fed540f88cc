"""What machine a figure was measured on (benchmarks and the demo report print it)."""

from __future__ import annotations

import os
import platform

from shards.errors import UserError


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch  # here, not at the top: `clim-fast --help` and option errors answer without loading torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__}


def synchronize(device) -> None:
    """Wait for the GPU's queued work (timings of GPU phases); nothing on the CPU."""
    import torch  # see machine_info

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str):
    """`--device auto|cpu|cuda` as a torch.device; UserError for anything else or a missing GPU."""
    import torch  # see machine_info

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    return torch.device(name)
