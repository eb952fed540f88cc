"""Anchors/s of the DALI pretrain graph (with positives, and as plain MoCo v2) against a
torchvision ImageFolder + PIL DataLoader with the same aug_plus augmentations, the same number of
CPU workers and the same images, side by side in one run (and images/s of the centre-crop graph
of mining's feature pass), on two image sets: ImageNet-like JPEGs
(about 110 KB mean, 350-500 px; `tests/photos.py` IMAGENET_LIKE) and small ones. Then the epoch
boundary of one persistent loader (tables swapped every other epoch, announced through
`table_changes`), and the CPU cost per sample of the external source.

    python bench/loader.py                   # small: CPU, 64 px, a few hundred JPEGs, 2 workers
    python bench/loader.py --full            # GPU: 224 px, 4096 JPEGs per set, 14 workers, batch 256
    python bench/loader.py --profile-source  # only the per-sample microseconds of the source
    python bench/loader.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from clim_fast.machine import machine_info  # noqa: E402


def random_table(ds, k: int, seed: int = 0):
    from shards.neighbours import NeighbourTable

    n = ds.num_samples
    rng = np.random.default_rng(seed)
    positives = rng.integers(0, n, (n, k)).astype(np.int32)
    counts = rng.integers(1, k + 1, n).astype(np.int32)
    for i in range(n):
        positives[i, counts[i]:] = -1
    return NeighbourTable(positives, counts, np.zeros(n, np.int32), {"dataset_id": ds.dataset_id})


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_epochs(loader, epochs: int, set_epoch=True) -> tuple[float, int]:
    """Seconds and anchors for `epochs` epochs after one warm-up epoch (pipeline build, workers)."""
    def run(e):
        if set_epoch:
            loader.set_epoch(e)
        count = 0
        for batch in loader:
            first = batch.get("q", batch.get("image")) if isinstance(batch, dict) else batch[0][0]
            count += first.shape[0]
        sync()
        return count

    run(0)
    start = time.perf_counter()
    anchors = sum(run(e) for e in range(1, epochs + 1))
    return time.perf_counter() - start, anchors


def torchvision_loader(folder: Path, image_size: int, batch: int, workers: int):
    from torchvision import datasets, transforms

    from dali_pipelines.ops import IMAGENET_MEAN, IMAGENET_STD

    aug_plus = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([PilBlur()], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = datasets.ImageFolder(str(folder), TwoCrops(aug_plus))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0, pin_memory=False)


class PilBlur:
    """MoCo v2's GaussianBlur: PIL's filter with sigma ~ U[0.1, 2.0]."""

    def __call__(self, image):
        from PIL import ImageFilter

        return image.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))


class TwoCrops:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return [self.transform(image), self.transform(image)]


# --- data ------------------------------------------------------------------------------------------

def image_sets(full: bool, images: int) -> dict[str, dict]:
    from photos import IMAGENET_LIKE

    small = dict(side_range=(400, 500)) if full else dict(side_range=(96, 160))  # q90: ~31 KB at 400-500 px
    return {"imagenet_like": dict(IMAGENET_LIKE), "small": small} if images else {}


def prepare(data: Path, name: str, options: dict, images: int):
    from photos import make_photo_folder
    from shards import ShardDataset, write_shards

    photos, shard_dir = data / name / "photos", data / name / "shards"
    if not (shard_dir / "manifest.json").exists():
        workers = min(10, os.cpu_count() or 1)
        make_photo_folder(photos, classes=10, per_class=-(-images // 10), seed=0, workers=workers, **options)
        write_shards(photos, shard_dir, workers=min(8, os.cpu_count() or 1), seed=0)
    return photos, ShardDataset(shard_dir)


# --- throughput ------------------------------------------------------------------------------------

def throughput(ds, photos: Path, *, image_size: int, batch: int, workers: int, device, epochs: int,
               dali_workers: int, dali_threads: int) -> dict:
    from dali_pipelines import FeatureLoader, PretrainLoader

    rates = {}
    table = random_table(ds, k=8)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for name, kwargs in (("dali_clim_positives", dict(table=table)), ("dali_moco_v2", {})):
        loader = PretrainLoader(ds, batch_size=batch, image_size=image_size, device=device, workers=dali_workers,
                                threads=dali_threads, dtype=dtype, **kwargs)
        seconds, anchors = time_epochs(loader, epochs)
        loader.close()
        rates[name] = anchors / seconds
        print(f"  {name:22s} {rates[name]:9.1f} anchors/s", flush=True)
    # mining's feature pass: one centre crop per JPEG, so the decoder alone sets its pace
    loader = FeatureLoader(ds, batch_size=batch, image_size=image_size, device=device, workers=dali_workers,
                           threads=dali_threads, dtype=dtype)
    seconds, images = time_epochs(loader, epochs)
    loader.close()
    rates["dali_centre_crops"] = images / seconds
    print(f"  {'dali_centre_crops':22s} {rates['dali_centre_crops']:9.1f} images/s (the feature pass)", flush=True)
    tv = torchvision_loader(photos, image_size, batch, workers)
    seconds, anchors = time_epochs(tv, epochs, set_epoch=False)
    del tv
    rates["torchvision_pil"] = anchors / seconds
    print(f"  {'torchvision_pil':22s} {rates['torchvision_pil']:9.1f} anchors/s", flush=True)
    ratios = {"clim_positives_vs_torchvision": rates["dali_clim_positives"] / rates["torchvision_pil"],
              "moco_v2_vs_torchvision": rates["dali_moco_v2"] / rates["torchvision_pil"]}
    for key, value in ratios.items():
        print(f"  ratio {key}: {value:.2f}x", flush=True)
    return {"anchors_per_s": rates, "ratios": ratios}


# --- the epoch boundary ------------------------------------------------------------------------------

def boundary(ds, *, image_size: int, batch: int, dali_workers: int, dali_threads: int, device, epochs: int,
             step_ms: float) -> dict:
    """One persistent loader with positives; a new table before every even epoch (announced by
    `table_changes`, as the training loop does for mining rounds). Each step 'trains' for
    `step_ms` (a sleep: the GPU busy with the model); `wait` is the time spent in the loader."""
    from dali_pipelines import PretrainLoader

    tables = [random_table(ds, k=8, seed=s) for s in range(2)]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    loader = PretrainLoader(ds, batch_size=batch, image_size=image_size, device=device, workers=dali_workers,
                            threads=dali_threads, dtype=dtype, table=tables[0], multires_sizes=(),
                            table_changes=lambda e: e % 2 == 0)
    rows = []
    for epoch in range(epochs):
        if epoch and epoch % 2 == 0:
            loader.set_table(tables[(epoch // 2) % 2])
        loader.set_epoch(epoch)
        waits, it = [], iter(loader)
        while True:
            start = time.perf_counter()
            try:
                next(it)  # the batch is dropped at once: its buffers go back before the simulated step
            except StopIteration:
                break
            sync()
            waits.append(time.perf_counter() - start)
            time.sleep(step_ms / 1000)
        steady = statistics.median(waits[1:]) if len(waits) > 1 else waits[0]
        rows.append({"epoch": epoch, "table_swap": epoch % 2 == 0 and epoch > 0, "first_wait_ms": waits[0] * 1e3,
                     "median_wait_ms": steady * 1e3, "steps": len(waits)})
        print(f"  epoch {epoch}{' (new table)' if rows[-1]['table_swap'] else '':12s} first-step wait "
              f"{waits[0] * 1e3:8.1f} ms, median wait {steady * 1e3:6.1f} ms, step {step_ms:.0f} ms", flush=True)
    rebuilds = loader._streams_built
    loader.close()
    later = [r["first_wait_ms"] for r in rows[1:]]
    out = {"step_ms": step_ms, "epochs": rows, "pipelines_built": rebuilds,
           "boundary_wait_in_steps": max(later) / step_ms if later else None}
    print(f"  pipelines built: {rebuilds} for {epochs} epochs; worst boundary wait = "
          f"{out['boundary_wait_in_steps']:.2f} steps", flush=True)
    return out


# --- CPU cost of the external source -------------------------------------------------------------------

def profile_source(ds, repeats: int = 7) -> dict:
    """Microseconds per sample of `AugmentSource.sample` and of its parts, in this process."""
    from dali_pipelines.augment import RngBank, draw_views, moco_views, sample_rng
    from dali_pipelines.external import AugmentSource, ShardReader, draw_positive
    from test_pipelines import straightforward_view  # the draws as first written, for 'before'

    table = random_table(ds, k=8)

    class Tables:
        def table(self, epoch, wait=True):
            return table.positives, table.counts

    reader = ShardReader(ds)
    n = ds.num_samples
    batch = max(b for b in (256, 64, 16, 8) if b <= n)
    results = {}
    for name, views, positives in (("moco_v2", moco_views(224), ()),
                                   ("clim_multires", moco_views(224, (192, 160, 128, 96)),
                                    moco_views(224, (192, 160, 128, 96)))):
        source = AugmentSource(reader, num_samples=n, global_batch=batch, rank=0, world_size=1, seed=0, start=0,
                               anchor_views=views, positive_views=positives, tables=Tables() if positives else None)
        count = min(1024, source.share_len * 4)
        sids = [source.anchor(*source.locate(i)) for i in range(count)]
        sizes = [reader.size_of(s) for s in sids]

        def best(fn):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times) / count * 1e6

        def call_all():
            for i in range(count):
                source.sample(i)

        share = source.share(0)

        def straightforward_views(rng, w, h, specs):
            params, flips = np.empty((len(specs), 9), np.float32), np.empty(len(specs), np.int32)
            for v, spec in enumerate(specs):
                params[v], flips[v] = straightforward_view(rng, w, h, spec)
            return params, flips

        def call_all_before():
            """The callback as it was before this change: ShardDataset row lookups, the draws as
            first written, the table row read the same way."""
            for i in range(count):
                epoch, pos = divmod(i, source.share_len)
                sid = int(share[pos]) if epoch == 0 else int(source.share(epoch)[pos])
                row = ds.index[sid]
                params, flips = straightforward_views(sample_rng(0, epoch, sid, 0), int(row["width"]),
                                                      int(row["height"]), views)
                out = (ds.jpeg(sid), params, flips, np.array([sid, ds.labels[sid]], np.int64))
                if positives:
                    rng = sample_rng(0, epoch, sid, 1)
                    pid = int(table.positives[sid, rng.integers(int(table.counts[sid]))])
                    prow = ds.index[pid]
                    pparams, pflips = straightforward_views(rng, int(prow["width"]), int(prow["height"]), positives)
                    out += (ds.jpeg(pid), pparams, pflips, np.array([pid], np.int64))

        rngs = [sample_rng(0, 0, s, 0) for s in sids]
        bank = RngBank(0, 0, sids, 0)
        parts = {
            "callback_total_before": best(call_all_before),
            "callback_total": best(call_all),
            "sample_rng": best(lambda: [sample_rng(0, 0, s, 0) for s in sids]),
            "rng_bank": best(lambda: [bank.rng(i) for i in range(count)]),
            "draw_views": best(lambda: [draw_views(r, w, h, views) for r, (w, h) in zip(rngs, sizes)]),
            "draw_views_straightforward": best(lambda: [[straightforward_view(r, w, h, v) for v in views]
                                                        for r, (w, h) in zip(rngs, sizes)]),
            "jpeg_slice": best(lambda: [reader.jpeg(s) for s in sids]),
            "size_and_label": best(lambda: [(reader.size_of(s), reader.label(s)) for s in sids]),
            "meta_array": best(lambda: [np.array([s, 0], np.int64) for s in sids]),
        }
        if positives:
            parts["table_lookup"] = best(lambda: [draw_positive(r, table.positives, table.counts, s)
                                                  for r, s in zip(rngs, sids)])
        results[name] = {k: round(v, 2) for k, v in parts.items()}
        print(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[name].items()) + "  (us/sample)",
              flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="GPU size: 224 px, 4096 JPEGs per set, batch 256")
    parser.add_argument("--images", type=int, help="JPEGs per image set (default 160 small, 4096 full)")
    parser.add_argument("--workers", type=int, help="CPU workers for both loaders (default 2 small, 14 full)")
    parser.add_argument("--dali-workers", type=int, help="DALI's Python source workers (default --workers)")
    parser.add_argument("--dali-threads", type=int, help="DALI's CPU threads (default --workers)")
    parser.add_argument("--batch-size", type=int, help="default 32 small, 256 full")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs after one warm-up epoch")
    parser.add_argument("--sets", default="imagenet_like,small", help="image sets to time (comma-separated)")
    parser.add_argument("--boundary-epochs", type=int, default=4, help="epochs of the boundary test (0: skip)")
    parser.add_argument("--step-ms", type=float, help="simulated training step (default 100 full, 400 small)")
    parser.add_argument("--profile-source", action="store_true", help="only the per-sample source cost")
    parser.add_argument("--data", type=Path, help="reuse/keep the generated images and shards here")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(2 if not args.full else 8)

    full = args.full
    images = args.images or (4096 if full else 160)
    workers = args.workers or (14 if full else 2)
    dali_workers, dali_threads = args.dali_workers or workers, args.dali_threads or workers
    batch = args.batch_size or (256 if full else 32)
    image_size = 224 if full else 64
    device = torch.device("cuda" if full and torch.cuda.is_available() else "cpu")
    step_ms = args.step_ms or (100.0 if full else 400.0)
    data = args.data or Path(tempfile.mkdtemp(prefix="clim-bench-"))
    info = machine_info()
    print(f"machine: {info}", flush=True)
    result = {"bench": "loader", "mode": "full" if full else "small", "machine": info, "image_size": image_size,
              "batch_size": batch, "workers": workers, "dali_workers": dali_workers, "dali_threads": dali_threads,
              "device": str(device), "epochs": args.epochs, "sets": {}}

    sets = image_sets(full, images)
    wanted = [s for s in args.sets.split(",") if s]
    if args.profile_source:
        wanted = wanted[:1]
    for name in wanted:
        photos, ds = prepare(data, name, sets[name], images)
        mean_kb = float(ds.index["size"].mean()) / 1024
        print(f"{name}: {ds.num_samples} JPEGs, mean {mean_kb:.1f} KB; image {image_size} px, batch {batch}, "
              f"{workers} CPU workers (DALI: {dali_workers} source workers, {dali_threads} threads), "
              f"device {device}", flush=True)
        entry = {"images": ds.num_samples, "mean_jpeg_kb": mean_kb}
        if args.profile_source:
            entry["source_us_per_sample"] = profile_source(ds)
        else:
            entry.update(throughput(ds, photos, image_size=image_size, batch=batch, workers=workers, device=device,
                                    epochs=args.epochs, dali_workers=dali_workers, dali_threads=dali_threads))
            if name == wanted[0] and args.boundary_epochs:
                entry["boundary"] = boundary(ds, image_size=image_size, batch=batch, dali_workers=dali_workers,
                                             dali_threads=dali_threads, device=device,
                                             epochs=args.boundary_epochs, step_ms=step_ms)
        result["sets"][name] = entry
        if name == wanted[0]:  # the first set's figures at the top level too (bench/gpu_check_data.py reads them)
            result.update({k: entry[k] for k in ("images", "mean_jpeg_kb", "anchors_per_s", "ratios") if k in entry})
        if args.json:  # rewritten after every set, so a run cut short still leaves figures
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    if len(result["sets"]) > 1 and not args.profile_source:
        print("side by side (anchors/s):", flush=True)
        for name, entry in result["sets"].items():
            r = entry["anchors_per_s"]
            print(f"  {name:14s} {entry['mean_jpeg_kb']:6.1f} KB  DALI+positives {r['dali_clim_positives']:8.1f}  "
                  f"DALI MoCo v2 {r['dali_moco_v2']:8.1f}  torchvision+PIL {r['torchvision_pil']:7.1f}  "
                  f"ratio {entry['ratios']['clim_positives_vs_torchvision']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
