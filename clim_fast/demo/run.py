"""`clim-fast demo`: the whole system on an embedded real dataset, MoCo v2 against CLIM.

Steps, all under OUT: data/ (digits as RGB JPEG class folders) -> shards/{train,val} ->
runs/{moco_v2,clim} (same budget; CLIM mines positives online) -> eval/ (features cached per
checkpoint) -> report.md + PNGs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from shards.errors import UserError
from shards.atomic import atomic_write_text
from clim_fast.machine import cpu_name

PRESETS = ("moco_v2", "clim")


@dataclass(frozen=True)
class Budget:
    """What both runs get. `per_class` caps images per digit before the train/val split."""
    per_class: int | None = 200
    val_fraction: float = 0.2
    image_size: int = 16
    arch: str = "resnet18"
    epochs: int = 5
    batch_size: int = 64
    queue_size: int = 1024
    base_lr: float = 0.12
    warmup_epochs: int = 0
    temperature: float = 0.2
    crop_min_scale: float = 0.2
    ema_momentum: float = 0.99
    clusters: int = 20
    knn_k: int = 10
    mine_every: int = 2
    clim_start_epoch: int = 1
    alpha: float = 2.0
    workers: int = 1
    dali_threads: int = 2
    tsne_per_class: int = 100


# tiny: the test's end-to-end run; cpu: the default without a GPU (measured: see README);
# gpu: the default with one (all 5000 MNIST images at 32 px, more epochs).
BUDGETS = {
    "tiny": Budget(per_class=12, val_fraction=0.25, image_size=16, epochs=2, batch_size=30, queue_size=60,
                   clusters=6, knn_k=5, mine_every=1, clim_start_epoch=1, tsne_per_class=8),
    # cpu: the 5-epoch / batch 64 / queue 1024 / T 0.2 setting left the InfoNCE loss at log(K+1) and
    # the trained backbones below an untrained one on kNN; batch 32 doubles the steps per epoch at the
    # same lr (0.03), a queue of 256 (16 % of the 1600 images) and T 0.1 let the loss move. MoCo's
    # crops down to 20 % of a 16 px digit often cut the digit away: crops of 50-100 % gave +10 points kNN.
    "cpu": Budget(epochs=10, batch_size=32, queue_size=256, base_lr=0.24, warmup_epochs=1, temperature=0.1,
                  crop_min_scale=0.5, clim_start_epoch=2),
    # gpu: the queue must stay well below the 4000 training images (else it holds each image's own keys).
    "gpu": Budget(per_class=None, image_size=32, epochs=30, batch_size=128, queue_size=1024, base_lr=0.06,
                  warmup_epochs=2, temperature=0.1, crop_min_scale=0.5,
                  clusters=60, knn_k=20, mine_every=3, clim_start_epoch=3, workers=4, dali_threads=4,
                  tsne_per_class=200),
}


def pick_budget(name: str, device: torch.device) -> Budget:
    if name == "auto":
        name = "gpu" if device.type == "cuda" else "cpu"
    if name not in BUDGETS:
        raise UserError(f"--budget {name}: choose auto, {', '.join(BUDGETS)}")
    return BUDGETS[name]


def train_config(preset: str, budget: Budget, seed: int):
    from clim_fast.config import make_config

    return make_config(preset, dict(
        arch=budget.arch, image_size=budget.image_size, epochs=budget.epochs, batch_size=budget.batch_size,
        queue_size=budget.queue_size, base_lr=budget.base_lr, warmup_epochs=budget.warmup_epochs,
        temperature=budget.temperature, crop_min_scale=budget.crop_min_scale, ema_momentum=budget.ema_momentum,
        clusters=budget.clusters, knn_k=budget.knn_k, mine_every=budget.mine_every,
        clim_start_epoch=budget.clim_start_epoch, alpha=budget.alpha, workers=budget.workers,
        dali_threads=budget.dali_threads, checkpoint_every=budget.epochs, keep_checkpoints=1,
        log_every=5, seed=seed))


def machine_line(device: torch.device) -> str:
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{device.type} ({cpu_name()}, {os.cpu_count()} cores{gpu})"


def positive_purity(table_path: str | Path, labels: np.ndarray) -> dict:
    """How often a mined positive shares its anchor's label (never seen by training)."""
    from shards.neighbours import NeighbourTable

    table = NeighbourTable.load(table_path)
    valid = table.positives >= 0
    same = (labels[np.where(valid, table.positives, 0)] == labels[:, None]) & valid
    per_anchor = same.sum(1) / np.maximum(valid.sum(1), 1)
    return {"table": Path(table_path).name, "positive_label_purity": float(per_anchor.mean()),
            "mean_positives": float(valid.sum(1).mean())}


def _final_loss(rows: list[dict]) -> float | None:
    epochs = [r for r in rows if r.get("kind") == "epoch" and "loss" in r]
    return float(epochs[-1]["loss"]) if epochs else None


def run_demo(out: str | Path = "demo-out", *, budget: str = "auto", data: str | None = None,
             device: str = "auto", seed: int = 0, epochs: int | None = None, image_size: int | None = None,
             per_class: int | None = None, knn_k: int = 200, knn_t: float = 0.07, fresh: bool = False,
             reference: bool = True, log=print) -> Path:
    """Run the demo into `out`; returns the path of report.md."""
    from clim_fast.demo.digits import write_demo_folders
    from clim_fast.evaluation.measures import checkpoint_features, class_similarity, knn_classify, tsne_plot
    from clim_fast.demo.report import plot_bars, plot_loss_curves, read_log, write_report
    from clim_fast.training.loop import run_training
    from shards import ShardDataset, write_shards

    started = time.time()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    chosen = pick_budget(budget, dev)
    chosen = replace(chosen, **{k: v for k, v in dict(epochs=epochs, image_size=image_size,
                                                      per_class=per_class).items() if v is not None})
    if chosen.clim_start_epoch >= chosen.epochs:
        chosen = replace(chosen, clim_start_epoch=max(0, chosen.epochs - 1))
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"demo: budget {asdict(chosen)} on {machine_line(dev)}")

    # 1. data -> shards (redone from scratch each time: cheap, and never stale)
    shutil.rmtree(out / "data", ignore_errors=True)
    summary_data = write_demo_folders(out / "data", source=data, image_size=chosen.image_size,
                                      val_fraction=chosen.val_fraction, per_class=chosen.per_class, seed=seed)
    log(f"demo: {summary_data['source']}: {summary_data['train']} train / {summary_data['val']} val images")
    shard_dirs = {}
    for split in ("train", "val"):
        shard_dirs[split] = out / "shards" / split
        shutil.rmtree(shard_dirs[split], ignore_errors=True)
        write_shards(out / "data" / split, shard_dirs[split], maxcount=1000, workers=1, seed=seed)
    train_set, val_set = ShardDataset(shard_dirs["train"]), ShardDataset(shard_dirs["val"])

    # 2. train both presets with the same budget
    gpus = 1 if dev.type == "cuda" else 0
    runs, logs, checkpoints = {}, {}, {}
    for preset in PRESETS:
        run_dir = out / "runs" / preset
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = train_config(preset, chosen, seed)
        log(f"demo: training {preset} ({cfg.epochs} epochs) -> {run_dir}")
        t0 = time.time()
        checkpoints[preset] = run_training(cfg, shard_dirs["train"], run_dir, gpus=gpus, cpu_procs=1,
                                           progress=False)
        logs[preset] = read_log(run_dir / "log.jsonl")
        runs[preset] = {"checkpoint": str(checkpoints[preset]), "train_seconds": time.time() - t0,
                        "final_loss": _final_loss(logs[preset])}

    # 3. evaluate both the same way (query-encoder backbone, features cached per checkpoint)
    eval_dir = out / "eval"
    feature_kw = dict(batch_size=256, device=dev, workers=chosen.workers, threads=chosen.dali_threads)
    names = [n for n, _ in sorted(train_set.classes.items(), key=lambda kv: kv[1])]
    for preset in PRESETS:
        ckpt = checkpoints[preset]
        train_f, train_y = checkpoint_features(ckpt, shard_dirs["train"], eval_dir, log=log, **feature_kw)
        val_f, val_y = checkpoint_features(ckpt, shard_dirs["val"], eval_dir, log=log, **feature_kw)
        runs[preset]["knn"] = knn_classify(train_f, train_y, val_f, val_y, k=knn_k, t=knn_t,
                                           num_classes=train_set.num_classes)
        runs[preset]["similarity"] = class_similarity(val_f, val_y)
        runs[preset]["tsne"] = tsne_plot(val_f, val_y, out / f"tsne_{preset}.png", classes=10, seed=seed,
                                         per_class=chosen.tsne_per_class, class_names=names,
                                         title=f"{preset}: t-SNE of validation features")
        log(f"demo: {preset}: kNN top-1 {runs[preset]['knn']['top1']:.2f} %, "
            f"intra {runs[preset]['similarity']['intra']:.3f} / inter {runs[preset]['similarity']['inter']:.3f}")

    random_init = _random_init_reference(train_config("moco_v2", chosen, seed), shard_dirs, feature_kw,
                                         train_set.num_classes, knn_k, knn_t, seed) if reference else None
    tables = sorted((out / "runs" / "clim" / "tables").glob("table-epoch-*.npz"))
    mining = positive_purity(tables[-1], train_set.labels) if tables else {}

    # 4. report
    plot_loss_curves(logs, out / "loss.png")
    plot_bars({p: runs[p]["knn"]["top1"] for p in PRESETS}, out / "knn_top1.png",
              f"kNN top-1 on {val_set.num_samples} validation images", "top-1 (%)", ylim=(0, 100))
    plot_bars({p: runs[p]["similarity"]["intra"] for p in PRESETS}, out / "intra_similarity.png",
              "Intra-class cosine similarity", "mean cosine", ylim=(0, 1))
    summary = {"data": summary_data, "budget": asdict(chosen), "device": machine_line(dev), "runs": runs,
               "mining": mining, "knn_k": knn_k, "knn_t": knn_t,
               "seconds": time.time() - started}
    if random_init is not None:
        summary["random_init"] = random_init
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    report = write_report(out, summary)
    log(f"demo: done in {summary['seconds']:.0f} s; report: {report.resolve()}")
    return report


def _random_init_reference(cfg, shard_dirs, feature_kw, num_classes, knn_k, knn_t, seed) -> dict:
    """The same measurements on an untrained network, so the trained numbers have a floor."""
    from clim_fast.evaluation.measures import class_similarity, extract_backbone_features, knn_classify
    from clim_fast.method.moco import MoCo

    torch.manual_seed(seed)
    model = MoCo(cfg)
    kw = dict(image_size=cfg.image_size, batch_size=feature_kw["batch_size"], device=feature_kw["device"],
              workers=feature_kw["workers"], threads=feature_kw["threads"])
    train_f, train_y = extract_backbone_features(model, shard_dirs["train"], **kw)
    val_f, val_y = extract_backbone_features(model, shard_dirs["val"], **kw)
    return {"knn": knn_classify(train_f, train_y, val_f, val_y, k=knn_k, t=knn_t, num_classes=num_classes),
            "similarity": class_similarity(val_f, val_y)}
