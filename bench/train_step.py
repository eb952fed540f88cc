"""Training-step throughput: synthetic tensors vs the real DALI pretrain graph, for moco_v2 and
clim_multires, in one run. Prints anchors/s, step time, the data-wait share and real/synthetic.

    python bench/train_step.py                 # small: resnet18, 32 px, batch 16, CPU
    python bench/train_step.py --full          # RN50, 224 px, batch 256, bf16, GPU
    python bench/train_step.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from clim_fast.config import make_config  # noqa: E402
from doubles import SyntheticPretrainLoader, label_table  # noqa: E402
from clim_fast.training.loop import Trainer, train_step  # noqa: E402
from clim_fast.machine import machine_info  # noqa: E402


def measure(trainer: Trainer, loader, steps: int, warmup: int) -> dict:
    """Time `steps` train steps after `warmup`, splitting wall time into data wait and the rest."""
    cfg, dev = trainer.cfg, trainer.device
    loader.set_epoch(0)
    it, done, wait, start = iter(loader), 0, 0.0, None
    while done < warmup + steps:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            loader.set_epoch(done)
            it = iter(loader)
            continue
        if done == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start, wait = time.perf_counter(), 0.0
        elif done > warmup:
            wait += time.perf_counter() - t0
        train_step(trainer.model, trainer.query_fn, trainer.optimizer, batch, cfg, trainer.gens,
                   autocast=trainer.autocast, channels_last=trainer.channels_last)
        done += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"anchors_per_s": steps * cfg.batch_size / elapsed, "step_time_ms": 1000 * elapsed / steps,
            "data_wait_share": wait / elapsed}


def real_shards(args, tmp: Path) -> Path | None:
    if args.shards:
        return Path(args.shards)
    try:
        from photos import make_photo_folder
        from shards import write_shards
        import dali_pipelines  # noqa: F401
    except ImportError as e:
        print(f"real data skipped ({e})")
        return None
    make_photo_folder(tmp / "photos", classes=4, per_class=max(8, args.batch // 2), seed=0)
    write_shards(tmp / "photos", tmp / "shards", maxcount=64, workers=1, seed=0)
    return tmp / "shards"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="RN50 / 224 px / batch 256 / bf16 on the GPU")
    ap.add_argument("--shards", help="real shards to read (default: a small generated set)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--presets", default="moco_v2,clim_multires")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.full:
        arch, size, args.batch, steps, workers = "resnet50", 224, 256, args.steps or 50, 14
    else:
        torch.set_num_threads(2)
        arch, size, args.batch, steps, workers = "resnet18", 32, 16, args.steps or 3, 1
    results = {"machine": machine_info(), "device": str(device), "arch": arch, "image_size": size,
               "batch": args.batch, "runs": []}
    print(json.dumps(results["machine"]))
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir = real_shards(args, Path(tmp))
        for preset in args.presets.split(","):
            cfg = make_config(preset, dict(arch=arch, image_size=size, batch_size=args.batch,
                                           queue_size=args.batch * 16, workers=workers,
                                           dali_threads=4 if args.full else 1))
            trainer = Trainer(cfg, None, Path(tmp), device, progress=False)
            n = 4 * args.batch
            table = label_table(torch.arange(n).numpy() % 4) if cfg.uses_positives else None
            synth = SyntheticPretrainLoader(n, batch_size=args.batch, image_size=size, device=device, seed=0,
                                            multires_sizes=cfg.multires_sizes, table=table)
            row = {"preset": preset, "synthetic": measure(trainer, synth, steps, warmup=1)}
            if shards_dir is not None:
                from dali_pipelines import PretrainLoader
                from shards import open_shards

                data = open_shards(shards_dir)
                rtable = label_table(data.labels, dataset_id=data.dataset_id) if cfg.uses_positives else None
                loader = PretrainLoader(shards_dir, batch_size=args.batch, image_size=size, device=device, seed=0,
                                        workers=cfg.workers, threads=cfg.dali_threads,
                                        multires_sizes=cfg.multires_sizes, table=rtable)
                try:
                    row["real"] = measure(trainer, loader, steps, warmup=1)
                finally:
                    loader.close()
                row["real_over_synthetic"] = row["real"]["anchors_per_s"] / row["synthetic"]["anchors_per_s"]
            results["runs"].append(row)
            print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
