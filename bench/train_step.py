"""Training-step throughput: the compute ceiling (synthetic batches) against real DALI batches,
for moco_v2, clim and clim_multires, side by side in one run.

The synthetic batch is built on the device once, with every view the real loader hands out, and
reused for every step: nothing is generated inside the timed loop, so it measures the step alone.
The real rows read shards through the training loader with a same-label neighbour table. Each row
runs `--warmup` steps, then times steps until `--steps` or its time box (`--row-seconds`) ends.
Per row: anchors/s, ms per step, data-wait share; per preset: real / synthetic.

    python bench/train_step.py                      # small: resnet18, 32 px, batch 16, CPU
    python bench/train_step.py --full --shards DIR  # RN50, 224 px, batch 256, fp16 (precision auto), GPU
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
from clim_fast.training.step import grad_scaler, train_step  # noqa: E402
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


def build(cfg, device, return_model: bool = False):
    """The model and its optimizer as train_worker builds them; returns run_step(batch) (and the
    model, with `return_model`)."""
    torch.manual_seed(0)
    model = CLIM(cfg).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.compile_encoders(mode=cfg.compile_mode)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, momentum=0.9,
                                weight_decay=1e-4, fused=device.type == "cuda")
    scaler = grad_scaler(model, device)
    run_step = lambda batch: train_step(model, model, optimizer, scaler, batch)  # noqa: E731
    return (run_step, model) if return_model else run_step


def measure(run_step, batches, cfg, device, *, warmup: int, steps: int, seconds: float) -> dict:
    """`run_step` timed after `warmup`; wall time split into
    waiting for the next batch and the rest. `warmup_s` (the untimed first steps) holds the
    compile time of a compiled row. The step never synchronises, so the CPU may queue a step
    ahead and a wait for data is an upper bound on the GPU's idle time; anchors/s is exact.
    `main_thread_busy_share`: the main thread's CPU time over the wall time (near 1: the step is
    bound by the Python thread that launches it and feeds DALI, not by the GPU)."""
    done, timed, wait, start, deadline, cpu_start = 0, 0, 0.0, None, None, None
    began = time.perf_counter()
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(it)
        if done == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.thread_time()
            deadline = start + seconds  # the box covers the timed steps, not the warm-up
        elif done > warmup:
            wait += time.perf_counter() - t0
            timed += 1
        run_step(batch)
        done += 1
        if cfg.compile and done <= warmup:  # a compile cut off by its time box still says how far it got
            print(f"warm-up step {done} done after {time.perf_counter() - began:.1f} s", flush=True)
        if done > warmup and (timed + 1 >= steps or time.perf_counter() > deadline):
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    timed += 1
    elapsed = time.perf_counter() - start
    return {"anchors_per_s": timed * cfg.batch_size / elapsed, "step_time_ms": 1000 * elapsed / timed,
            "data_wait_share": wait / elapsed, "main_thread_busy_share": (time.thread_time() - cpu_start) / elapsed,
            "steps": timed, "warmup_s": start - began}


KERNEL_FAMILIES = [  # (family, substrings of kernel names), first match wins
    ("DALI (decode, augmentations)", ("dali", "nvjpeg", "jpeg", "resize", "crop_mirror", "gaussian", "color",
                                      "hwdecode", "idct", "huffman")),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "sm90_xmma", "dgrad", "wgrad", "fprop", "nhwc")),
    ("batch norm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw")),
    ("matmul", ("gemm", "cublas", "cutlass")),
    ("elementwise (relu, add, copies, casts)", ("elementwise", "vectorized", "copy", "fill", "unrolled", "relu")),
    ("reductions", ("reduce", "softmax", "norm", "sum")),
    ("optimizer", ("sgd", "multi_tensor", "foreach")),
]


def profile_steps(run_step, batches, cfg, device, *, warmup: int, steps: int = 3) -> dict:
    """GPU time of `steps` steps after warm-up, by kernel family and the top kernels, and the sum
    of all kernel times against the wall time (torch.profiler, CUDA activity; kernels of DALI's
    stream and torch's may overlap, so the sum can pass the wall time)."""
    from torch.profiler import ProfilerActivity, profile

    measure(run_step, batches, cfg, device, warmup=warmup, steps=1, seconds=1e9)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        measure(run_step, batches, cfg, device, warmup=0, steps=steps, seconds=1e9)
        wall = time.perf_counter() - t0
    synchronises = None
    if device.type == "cuda":  # one more step with any host-device synchronisation made an error
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_step(next(iter(batches)))
            synchronises = False
        except RuntimeError as error:
            synchronises = str(error).splitlines()[0][:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    total_us = sum(e.time_range.elapsed_us() for e in kernels)
    families: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in kernels:
        name = e.name.lower()
        family = next((f for f, keys in KERNEL_FAMILIES if any(k in name for k in keys)), "other")
        us = e.time_range.elapsed_us()
        families[family] = families.get(family, 0.0) + us
        by_name[e.name[:120]] = by_name.get(e.name[:120], 0.0) + us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    return {"steps": steps, "step_synchronises": synchronises, "wall_ms_per_step": 1000 * wall / steps,
            "gpu_busy_ms_per_step": total_us / 1000 / steps, "kernels_per_step": len(kernels) / steps,
            "families_ms_per_step": {f: round(us / 1000 / steps, 2) for f, us in
                                     sorted(families.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_per_step": [[n, round(us / 1000 / steps, 3)] for n, us in top]}


def try_profile(run_step, batches, cfg, device, *, warmup: int) -> dict:
    """{"profile": ...}, or {"profile_error": ...}: a profiler problem must not lose the row."""
    try:
        return {"profile": profile_steps(run_step, batches, cfg, device, warmup=warmup)}
    except Exception as error:  # noqa: BLE001
        return {"profile_error": repr(error)}


def measure_real(run_step, data, table, cfg, device, profile: bool = False, **timing) -> dict:
    """`measure` on the training loader's batches (a same-label neighbour table for positives), then
    the same loader with no step (`loader_alone`: the data's own ceiling); with `profile`, also
    `profile_steps` on them (where the GPU time goes with DALI beside the step)."""
    loader = data.loader(cfg, 0, 1, device, None)
    if cfg.uses_positives:
        loader.set_table(table)
    try:
        batches = real_batches(loader)
        row = measure(run_step, batches, cfg, device, **timing)
        alone = measure(lambda batch: None, batches, cfg, device, warmup=1, steps=timing["steps"],
                        seconds=min(2.0, timing["seconds"] / 2))
        row["loader_alone_anchors_per_s"] = alone["anchors_per_s"]
        if profile:
            row.update(try_profile(run_step, batches, cfg, device, warmup=0))
        return row
    finally:
        loader.close()


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
    ap.add_argument("--full", action="store_true", help="RN50 / 224 px / batch 256 / fp16 (precision auto) on the GPU")
    ap.add_argument("--shards", help="real shards to read (default: a small generated set)")
    ap.add_argument("--presets", default="moco_v2,clim,clim_multires")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (at most)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--row-seconds", type=float, default=None, help="time box of a row's timed steps")
    ap.add_argument("--arch", help="override the mode's architecture (e.g. resnet18 for the small-image rows)")
    ap.add_argument("--image-size", type=int, help="override the mode's image size")
    ap.add_argument("--batch", type=int, help="override the mode's batch size")
    ap.add_argument("--variants", default="", help="extra synthetic rows: no_cudnn_benchmark, compile, "
                    "compile_graphs (torch.compile mode reduce-overhead: CUDA graphs), bf16, profile "
                    "(comma-separated; profile: where the GPU time of a step goes, by kernel family)")
    ap.add_argument("--variant-presets", default="clim_multires", help="presets of the --variants rows")
    ap.add_argument("--loader-variants", default="", help="extra real rows with other loader settings, "
                    "WORKERS:DALI_THREADS:DECODER,... where DECODER is the hardware decoder's share, cpu "
                    "(config cpu_decode) or cpuviews (config cpu_views: the views too) (e.g. 4:12:0.65,4:12:cpu)")
    ap.add_argument("--loader-presets", default="moco_v2", help="presets of the --loader-variants rows")
    ap.add_argument("--profile-real", default="", help="presets whose real rows are also profiled (GPU time by "
                    "kernel family, DALI's kernels included; comma-separated)")
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
    arch, size, batch = args.arch or arch, args.image_size or size, args.batch or batch
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train_worker sets it
    results = {"machine": machine_info(), "device": str(device), "arch": arch, "image_size": size,
               "batch": batch, "warmup": warmup, "runs": []}
    print(json.dumps(results["machine"]))

    def record(row: dict) -> None:  # printed and written at once: a cut-off run keeps its rows
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

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
            run_step = build(cfg, device)
            row = {"preset": preset, "synthetic": measure(run_step, repeat(synthetic_batch(cfg, device)), cfg,
                                                          device, warmup=warmup, steps=steps, seconds=box)}
            if data is None:
                record(row)
                continue
            print(json.dumps(row), flush=True)
            row["real"] = measure_real(run_step, data, table, cfg, device, profile=preset in args.profile_real.split(","),
                                       warmup=warmup, steps=steps, seconds=box)
            row["real_over_synthetic"] = row["real"]["anchors_per_s"] / row["synthetic"]["anchors_per_s"]
            record(row)
        ceiling = {r["preset"]: r["synthetic"]["anchors_per_s"] for r in results["runs"]}
        for setting in filter(None, args.loader_variants.split(",")) if data is not None else []:
            w, t, h = setting.split(":")
            loader = dict(workers=int(w), dali_threads=int(t), cpu_decode=h == "cpu", cpu_views=h == "cpuviews")
            if h not in ("cpu", "cpuviews"):
                loader["hw_decoder_load"] = float(h)
            for preset in args.loader_presets.split(","):
                cfg = make_config(preset, dict(arch=arch, image_size=size, batch_size=batch, queue_size=batch * 16,
                                               **loader))
                row = {"preset": preset, "loader": loader,
                       "real": measure_real(build(cfg, device), data, table, cfg, device, warmup=warmup,
                                            steps=steps, seconds=box)}
                if preset in ceiling:
                    row["real_over_synthetic"] = row["real"]["anchors_per_s"] / ceiling[preset]
                record(row)
        for variant in filter(None, args.variants.split(",")):
            for preset in args.variant_presets.split(","):
                compiled = variant in ("compile", "compile_graphs")
                cfg = make_config(preset, dict(arch=arch, image_size=size, batch_size=batch, queue_size=batch * 16,
                                               compile=compiled,
                                               compile_mode="reduce-overhead" if variant == "compile_graphs" else "default",
                                               precision="bf16" if variant == "bf16" else "auto"))
                print(f"variant {variant} ({preset}): building", flush=True)
                if device.type == "cuda":
                    torch.backends.cudnn.benchmark = variant != "no_cudnn_benchmark"
                run_step = build(cfg, device)
                batches = repeat(synthetic_batch(cfg, device))
                row = {"preset": preset, "variant": variant}
                if variant == "profile":
                    row.update(try_profile(run_step, batches, cfg, device, warmup=warmup))
                else:
                    row["synthetic"] = measure(run_step, batches, cfg, device, warmup=warmup, steps=steps,
                                               seconds=box)
                    if preset in ceiling:
                        row["over_eager"] = row["synthetic"]["anchors_per_s"] / ceiling[preset]
                record(row)


if __name__ == "__main__":
    main()
