"""Anchors/s of the DALI pretrain graph (with positives, and as plain MoCo v2) against a
torchvision ImageFolder + PIL DataLoader with the same aug_plus augmentations, the same number of
CPU workers and the same images, in one run.

    python bench/loader.py                 # small: CPU, 64 px, a few hundred small JPEGs
    python bench/loader.py --full          # GPU: 224 px, ImageNet-sized JPEGs, 14 workers
    python bench/loader.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
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


def time_epochs(loader, epochs: int, set_epoch=True) -> tuple[float, int]:
    """Seconds and anchors for `epochs` epochs after one warm-up epoch (pipeline build, workers)."""
    def run(e):
        if set_epoch:
            loader.set_epoch(e)
        count = 0
        for batch in loader:
            first = batch["q"] if isinstance(batch, dict) else batch[0][0]
            count += first.shape[0]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="GPU size: 224 px, ImageNet-sized JPEGs")
    parser.add_argument("--images", type=int, help="number of JPEGs (default 240 small, 8192 full)")
    parser.add_argument("--workers", type=int, help="CPU workers for both loaders (default 2 small, 14 full)")
    parser.add_argument("--batch-size", type=int, help="default 32 small, 256 full")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    parser.add_argument("--data", type=Path, help="reuse/keep the generated images and shards here")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    torch.set_num_threads(2 if not args.full else 8)

    from photos import make_photo_folder
    from dali_pipelines import PretrainLoader
    from shards import ShardDataset, write_shards

    full = args.full
    images = args.images or (8192 if full else 240)
    workers = args.workers or (14 if full else 2)
    batch = args.batch_size or (256 if full else 32)
    image_size = 224 if full else 64
    side_range = (400, 500) if full else (96, 160)
    device = torch.device("cuda" if full and torch.cuda.is_available() else "cpu")

    data = args.data or Path(tempfile.mkdtemp(prefix="clim-bench-"))
    photos, shard_dir = data / "photos", data / "shards"
    if not (shard_dir / "manifest.json").exists():
        per_class = -(-images // 10)
        make_photo_folder(photos, classes=10, per_class=per_class, seed=0, side_range=side_range)
        write_shards(photos, shard_dir, workers=min(8, os.cpu_count() or 1), seed=0)
    ds = ShardDataset(shard_dir)
    mean_kb = float(ds.index["size"].mean()) / 1024
    print(f"{ds.num_samples} JPEGs, mean {mean_kb:.1f} KB; image {image_size} px, batch {batch}, "
          f"{workers} CPU workers, device {device}", flush=True)

    results = {}
    table = random_table(ds, k=8)
    for name, kwargs in (("dali_clim_positives", dict(table=table)), ("dali_moco_v2", {})):
        loader = PretrainLoader(shard_dir, batch_size=batch, image_size=image_size, device=device, workers=workers,
                                threads=workers, dtype=torch.float16 if device.type == "cuda" else torch.float32,
                                **kwargs)
        seconds, anchors = time_epochs(loader, args.epochs)
        loader.close()
        results[name] = anchors / seconds
        print(f"{name:22s} {results[name]:9.1f} anchors/s", flush=True)
    tv = torchvision_loader(photos, image_size, batch, workers)
    seconds, anchors = time_epochs(tv, args.epochs, set_epoch=False)
    results["torchvision_pil"] = anchors / seconds
    print(f"{'torchvision_pil':22s} {results['torchvision_pil']:9.1f} anchors/s", flush=True)

    ratios = {"clim_positives_vs_torchvision": results["dali_clim_positives"] / results["torchvision_pil"],
              "moco_v2_vs_torchvision": results["dali_moco_v2"] / results["torchvision_pil"]}
    for key, value in ratios.items():
        print(f"ratio {key}: {value:.2f}x")
    info = machine_info()
    print(f"machine: {info}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "bench": "loader", "mode": "full" if full else "small", "machine": info,
            "images": ds.num_samples, "mean_jpeg_kb": mean_kb, "image_size": image_size, "batch_size": batch,
            "workers": workers, "device": str(device), "epochs": args.epochs,
            "anchors_per_s": results, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
