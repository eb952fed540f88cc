"""What a checkpoint costs the training loop, side by side in one run: the baseline serialises and
writes it (twice: epoch file and last.pt, each fsynced) before the loop goes on; ours takes a
snapshot (tensors copied to the CPU) and writes in a background thread
(`training.checkpoint.CheckpointWriter`). The state is an RN50 clim_multires run's (both encoders,
the 65,536-key queue, SGD momentum), on the GPU when there is one. Also: how fast the main thread
runs small torch ops while the background write goes on (the write holds the GIL part of the time).

    python bench/checkpoint.py [--arch resnet50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402

from clim_fast.config import make_config  # noqa: E402
from clim_fast.machine import machine_info  # noqa: E402
from clim_fast.method.clim import CLIM  # noqa: E402
from clim_fast.training.checkpoint import CheckpointWriter, save_checkpoint, snapshot  # noqa: E402


def ops_per_second(x: torch.Tensor, until) -> float:
    """Small matmuls on the main thread until `until()` is true: the loop's launching work."""
    count, start = 0, time.perf_counter()
    while not until() or count == 0:
        torch.mm(x, x)
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = make_config("clim_multires", dict(arch=args.arch, image_size=224, queue_size=65536))
    model = CLIM(cfg).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # momentum buffers, as in a running job

    def state():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": cfg.to_dict(), "epoch": 1}

    x = torch.randn(64, 64)
    result = {"machine": machine_info(), "device": str(device), "arch": args.arch}
    with tempfile.TemporaryDirectory() as tmp:
        paths = (Path(tmp) / "epoch-0001.pt", Path(tmp) / "last.pt")
        alone = ops_per_second(x, lambda start=time.perf_counter(): time.perf_counter() - start > 2)
        t0 = time.perf_counter()
        save_checkpoint(state(), *paths)
        result["baseline_blocking_s"] = time.perf_counter() - t0
        result["checkpoint_mb"] = paths[1].stat().st_size / 1e6
        writer = CheckpointWriter()
        t0 = time.perf_counter()
        writer.write(snapshot(state()), *paths)  # (no earlier write to report)
        result["ours_blocking_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        result["main_thread_ops_share_during_write"] = ops_per_second(
            x, lambda: not writer._thread.is_alive()) / alone
        failed = writer.wait()
        if failed is not None:
            raise failed
        result["ours_background_write_s"] = time.perf_counter() - t1
    result["ratio_blocking"] = result["baseline_blocking_s"] / result["ours_blocking_s"]
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
