"""The CPU side of a training step: what the thread that launches the step spends per step when
the tensors are too small for compute to matter (ResNet-18 of width 8 at 8 px, batch 8, on the
CPU). On a GPU that is the floor of a launch-bound step (ResNet-18 at 32 px: the H200 waited on
Python). Per preset, in one run: milliseconds per step of the baseline (torch's BatchNorm2d, which counts its batches with one more kernel per layer and call,
and a momentum update of per-parameter detach + multiply + add) against ours
(`backbone.BatchNorm2d`, one `_foreach_lerp_`), alternated, best of several rounds.

    python bench/step_overhead.py [--presets moco_v2,clim,clim_multires] [--json out.json]
    python bench/step_overhead.py --device cuda --image-size 32 --batch 128 --width 64   # the GPU's 32 px rows

On a CPU the proxy understates the gain: torch's foreach ops fall back to one operation per
tensor there, and a scalar add costs less than a CUDA kernel launch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "bench")]

import torch  # noqa: E402

from clim_fast.config import make_config  # noqa: E402
from clim_fast.machine import machine_info  # noqa: E402
from clim_fast.method.moco import MoCo  # noqa: E402
from train_step import build, synthetic_batch  # noqa: E402


@torch.no_grad()
def momentum_update_before(self) -> None:
    k_params = list(self.encoder_k.parameters())
    q_params = [p.detach() for p in self.encoder_q.parameters()]
    torch._foreach_mul_(k_params, self.m)
    torch._foreach_add_(k_params, q_params, alpha=1.0 - self.m)


def with_torch_batchnorm(model: torch.nn.Module) -> None:
    """Every backbone.BatchNorm2d becomes torch's own class, keeping its parameters and buffers (the
    optimizer's and the device's)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.__class__ = torch.nn.BatchNorm2d


def step_fn(cfg, device, baseline: bool):
    run_step, model = build(cfg, device, return_model=True)
    if baseline:
        with_torch_batchnorm(model)
        model.momentum_update = momentum_update_before.__get__(model, MoCo)
    batch = synthetic_batch(cfg, device)
    return lambda: run_step(batch)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="moco_v2,clim,clim_multires")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=15, help="steps per timed round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    results = {"machine": machine_info(), "device": str(device), "image_size": args.image_size,
               "batch": args.batch, "width": args.width, "rows": []}
    for preset in args.presets.split(","):
        cfg = make_config(preset, dict(arch="resnet18", image_size=args.image_size, batch_size=args.batch,
                                       queue_size=args.batch * 8, width=args.width, feat_dim=8 if args.width < 64
                                       else 128, workers=0))
        steps = {"baseline": step_fn(cfg, device, True), "ours": step_fn(cfg, device, False)}
        row = {"preset": preset}
        best = {name: float("inf") for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                step()
                sync(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync(device)
                best[name] = min(best[name], (time.perf_counter() - start) / args.steps * 1e3)
        row.update({f"{name}_ms_per_step": round(ms, 3) for name, ms in best.items()})
        row["ratio"] = round(best["baseline"] / best["ours"], 3)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(results["machine"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
