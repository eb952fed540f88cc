"""Training-step throughput: the compute ceiling (synthetic batches) against real DALI batches,
for moco_v2, clim and clim_multires, side by side in one run.

The synthetic batch is built on the device once, with every view the real loader hands out, and
reused for every step: nothing is generated inside the timed loop, so it measures the step alone.
The real rows read shards through the training loader with a same-label neighbour table. Each row
runs `--warmup` steps, then times steps until `--steps` or its time box (`--row-seconds`) ends.
Per row: anchors/s, ms per step, data-wait share; per preset: real / synthetic.

    python bench/train_step.py                      # small: resnet18, 32 px, batch 16, CPU
    python bench/train_step.py --full --shards DIR  # RN50, 224 px, batch 256, bf16, GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from clim_fast.config import make_config  # noqa: E402
from clim_fast.machine import machine_info  # noqa: E402
from clim_fast.method.clim import CLIM  # noqa: E402
from dali_pipelines.names import anchor_view_names, positive_view_names  # noqa: E402
from doubles import label_table  # noqa: E402


def synthetic_batch(cfg, device) -> dict:
    b, s = cfg.batch_size, cfg.image_size
    g = torch.Generator(device=device).manual_seed(0)
    names = anchor_view_names(cfg.multires_sizes)
    if cfg.uses_positives:
        names += positive_view_names(cfg.multires_sizes)
    sizes = {n: (int(n.rsplit("_r", 1)[1]) if "_r" in n else s) for n in names}
    batch = {n: torch.randn(b, 3, sizes[n], sizes[n], generator=g, device=device) for n in names}
    batch["id"] = torch.arange(b, device=device)
    batch["label"] = torch.zeros(b, dtype=torch.int64, device=device)
    return batch


def build(cfg, device):
    torch.manual_seed(0)
    model = CLIM(cfg).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=0.9,
                                weight_decay=1e-4, fused=device.type == "cuda")
    return model, optimizer


def measure(model, optimizer, batches, cfg, device, *, warmup: int, steps: int, seconds: float) -> dict:
    """The loop's step (as train_one_epoch runs it) timed after `warmup`; wall time split into
    waiting for the next batch and the rest."""
    done, timed, wait, start, deadline = 0, 0, 0.0, None, None
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(it)
        if done == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            deadline = start + seconds  # the box covers the timed steps, not the warm-up
        elif done > warmup:
            wait += time.perf_counter() - t0
            timed += 1
        loss, _ = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.enqueue_keys()
        done += 1
        if done > warmup and (timed + 1 >= steps or time.perf_counter() > deadline):
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    timed += 1
    elapsed = time.perf_counter() - start
    return {"anchors_per_s": timed * cfg.batch_size / elapsed, "step_time_ms": 1000 * elapsed / timed,
            "data_wait_share": wait / elapsed, "steps": timed}


def repeat(batch):
    while True:
        yield batch


def real_batches(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def generated_shards(tmp: Path, per_class: int) -> Path:
    from photos import make_photo_folder
    from shards import write_shards

    make_photo_folder(tmp / "photos", classes=4, per_class=per_class, seed=0)
    write_shards(tmp / "photos", tmp / "shards", maxcount=64, workers=1, seed=0)
    return tmp / "shards"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="RN50 / 224 px / batch 256 / bf16 on the GPU")
    ap.add_argument("--shards", help="real shards to read (default: a small generated set)")
    ap.add_argument("--presets", default="moco_v2,clim,clim_multires")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (at most)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--row-seconds", type=float, default=None, help="time box of a row's timed steps")
    ap.add_argument("--variants", default="", help="extra synthetic rows for clim_multires: "
                    "no_cudnn_benchmark, compile (comma-separated)")
    ap.add_argument("--synthetic-only", action="store_true", help="no real rows (no DALI needed)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.full:
        arch, size, batch, workers, threads = "resnet50", 224, 256, 12, 4
        steps, warmup, box = args.steps or 40, args.warmup or 6, args.row_seconds or 10
    else:
        torch.set_num_threads(2)
        arch, size, batch, workers, threads = "resnet18", 32, 16, 1, 1
        steps, warmup, box = args.steps or 3, args.warmup or 1, args.row_seconds or 20
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train_worker sets it
    results = {"machine": machine_info(), "device": str(device), "arch": arch, "image_size": size,
               "batch": batch, "warmup": warmup, "runs": []}
    print(json.dumps(results["machine"]))
    with tempfile.TemporaryDirectory() as tmp:
        data = table = None
        if not args.synthetic_only:
            from clim_fast.training.loop import ShardData  # the real rows need DALI

            shards_dir = Path(args.shards) if args.shards else generated_shards(Path(tmp), max(8, batch // 2))
            data = ShardData(shards_dir)
            table = label_table(np.asarray(data.dataset.labels), k=8, dataset_id=data.dataset_id)
        for preset in args.presets.split(","):
            cfg = make_config(preset, dict(arch=arch, image_size=size, batch_size=batch, queue_size=batch * 16,
                                           workers=workers, dali_threads=threads))
            model, optimizer = build(cfg, device)
            row = {"preset": preset, "synthetic": measure(model, optimizer, repeat(synthetic_batch(cfg, device)), cfg,
                                                          device, warmup=warmup, steps=steps, seconds=box)}
            print(json.dumps(row), flush=True)
            if data is None:
                results["runs"].append(row)
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
                continue
            loader = data.loader(cfg, 0, 1, device, None)
            if cfg.uses_positives:
                loader.set_table(table)
            try:
                row["real"] = measure(model, optimizer, real_batches(loader), cfg, device, warmup=warmup,
                                      steps=steps, seconds=box)
            finally:
                loader.close()
            row["real_over_synthetic"] = row["real"]["anchors_per_s"] / row["synthetic"]["anchors_per_s"]
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        for variant in filter(None, args.variants.split(",")):
            cfg = make_config("clim_multires", dict(arch=arch, image_size=size, batch_size=batch,
                                                    queue_size=batch * 16, compile=variant == "compile"))
            print(f"variant {variant}: building", flush=True)
            if device.type == "cuda":
                torch.backends.cudnn.benchmark = variant != "no_cudnn_benchmark"
            model, optimizer = build(cfg, device)
            row = {"preset": "clim_multires", "variant": variant,
                   "synthetic": measure(model, optimizer, repeat(synthetic_batch(cfg, device)), cfg, device,
                                        warmup=warmup, steps=steps, seconds=box)}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
